"""Triton kernels. Each file has a twin of the same name in `mla.reference`."""

from .cache import write_latent
from .compressor import compress, write_compressed
from .decode import FlashMLASchedMeta, flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata
from .indexer import index_scores, index_topk
from .quant import write_latent_fp8

__all__ = [
    "FlashMLASchedMeta",
    "compress",
    "write_compressed",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "index_scores",
    "index_topk",
    "write_latent",
    "write_latent_fp8",
]
