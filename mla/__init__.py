"""Multi-head latent attention with a compressed (latent) KV cache.

`MLAConfig` -> `MLAttention` / `MLAForCausalLM` on a paged `LatentCache`; the kernels are in
`mla.kernels` (Triton), their PyTorch twins in `mla.reference`, the transformers integration in
`mla.hf` and speculative decoding in `mla.speculative`.
"""

from mla.attention import MLAttention
from mla.cache import CacheFullError, LatentCache
from mla.config import MLAConfig
from mla.model import MLAForCausalLM, MLAModel

__version__ = "0.1.0"
__all__ = ["MLAConfig", "LatentCache", "CacheFullError", "MLAttention", "MLAModel", "MLAForCausalLM"]
