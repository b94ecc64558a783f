"""Triton kernels. Each file has a twin of the same name in `mla.reference`."""

from .decode import flash_mla_with_kvcache, get_mla_metadata

__all__ = ["flash_mla_with_kvcache", "get_mla_metadata"]
