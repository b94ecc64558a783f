"""Multi-head latent attention with a compressed (latent) KV cache."""

__version__ = "0.1.0"
from mla.cache import LatentCache  # noqa: E402
from mla.config import MLAConfig  # noqa: E402
from mla.attention import MLAttention  # noqa: E402
from mla.model import MLAForCausalLM, MLAModel  # noqa: E402
