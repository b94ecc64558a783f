"""Multi-head latent attention with a compressed (latent) KV cache."""

__version__ = "0.1.0"
