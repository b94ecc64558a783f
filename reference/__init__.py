"""Pure-PyTorch references: the ground truth every kernel in `mla.kernels` is tested against.

Files mirror `mla.kernels` by name and functions keep the kernels' signatures.
"""

from .decode import flash_mla_with_kvcache
from .mla import absorb_query, mla_absorbed, mla_naive, split_kv_b

__all__ = ["flash_mla_with_kvcache", "mla_naive", "mla_absorbed", "absorb_query", "split_kv_b"]
