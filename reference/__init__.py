"""Pure-PyTorch references: the ground truth every kernel in `mla.kernels` is tested against.

Files mirror `mla.kernels` by name and functions keep the kernels' signatures.
"""

from .cache import write_latent
from .compressor import compress, write_compressed
from .contract import FlashMLASchedMeta
from .decode import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata
from .indexer import index_scores, index_topk
from .mla import absorb_query, mla_absorbed, mla_naive, split_kv_b
from .quant import dequantize_cache, dequantize_latent_fp8, fp8_bytes_per_token, quantize_latent_fp8, write_latent_fp8

__all__ = [
    "FlashMLASchedMeta",
    "compress",
    "write_compressed",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
    "get_mla_metadata",
    "index_scores",
    "index_topk",
    "write_latent",
    "write_latent_fp8",
    "quantize_latent_fp8",
    "dequantize_latent_fp8",
    "dequantize_cache",
    "fp8_bytes_per_token",
    "mla_naive",
    "mla_absorbed",
    "absorb_query",
    "split_kv_b",
]
