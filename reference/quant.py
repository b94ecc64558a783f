"""Plain PyTorch reference for the FP8 latent cache (`mla.kernels.quant`).

The byte layout and the quantization rule belong to `mla.formats.Fp8Format` (documented
there); these are the functions the kernels are tested against, in the kernels' signatures.
"""

from __future__ import annotations

import torch

from mla.formats import Fp8Format

from .cache import check_write_args, write_rows


def fp8_bytes_per_token(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes of one token in the FP8 cache: kv_lora_rank + 4 * (kv_lora_rank // tile) + 2 * rope_dim.

    656 for DeepSeek-V3 (512, 64). ValueError for sizes the format cannot hold (`mla.formats.Fp8Format`).
    """
    return Fp8Format(kv_lora_rank, rope_dim).bytes_per_token


def _check_latent(kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    for name, t in (("kv", kv), ("k_pe", k_pe)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in Fp8Format.input_dtypes:
            raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if kv.shape[:-1] != k_pe.shape[:-1]:
        raise ValueError(f"kv {tuple(kv.shape)} and k_pe {tuple(k_pe.shape)} disagree on the token dimensions")
    if kv.device != k_pe.device:
        raise ValueError(f"kv is on {kv.device} but k_pe is on {k_pe.device}")


def quantize_latent_fp8(kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Pack tokens into the FP8 cache format.

    Args:
        kv: [..., kv_lora_rank] latent, bfloat16 / float16 / float32.
        k_pe: [..., rope_dim] rotary key part, bfloat16 / float16 / float32 (stored as bfloat16).

    Returns:
        uint8 [..., fp8_bytes_per_token(kv_lora_rank, rope_dim)] (`mla.formats.Fp8Format`).
    """
    _check_latent(kv, k_pe)
    return Fp8Format(kv.shape[-1], k_pe.shape[-1]).pack(kv, k_pe)


def _as_bytes(packed: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise TypeError(f"{name} must be uint8 or float8_e4m3fn (raw FP8 cache bytes), got {packed.dtype}")
    return packed.view(torch.uint8)


def dequantize_latent_fp8(
    packed: torch.Tensor, kv_lora_rank: int, rope_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack FP8 cache tokens.

    Args:
        packed: uint8 or float8_e4m3fn [..., fp8_bytes_per_token(kv_lora_rank, rope_dim)].

    Returns:
        kv: float32 [..., kv_lora_rank], code * scale (exact: a power of two times at most 4
            significant bits; finite); NaN for a poisoned tile.
        k_pe: bfloat16 [..., rope_dim], exactly as stored.
    """
    packed = _as_bytes(packed, "packed")
    fmt = Fp8Format(kv_lora_rank, rope_dim)
    if packed.dim() < 1 or packed.shape[-1] != fmt.bytes_per_token:
        raise ValueError(
            f"packed must end in {fmt.bytes_per_token} bytes for kv_lora_rank={kv_lora_rank}, rope_dim={rope_dim}, "
            f"got shape {tuple(packed.shape)}"
        )
    kv, _ = fmt.unpack(packed)
    return kv, fmt.unpack(packed, torch.bfloat16)[1]


def write_latent_fp8(pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Quantize tokens and store them into a paged FP8 cache, in place.

    Args:
        pages: uint8 (or float8_e4m3fn) [num_pages, page_size, 1, fp8_bytes_per_token(r, dr)];
            any strides.
        slots: int64 [n] distinct flat slots (page * page_size + offset).
        latent: [n, r] latent, bfloat16 / float16 / float32.
        k_pe: [n, dr], bfloat16 / float16 / float32.

    Returns:
        pages, modified in place.
    """
    fmt, raw = check_write_args(pages, slots, latent, k_pe, fp8=True)
    write_rows(fmt, raw, slots, latent, k_pe)
    return pages


def dequantize_cache(
    pages: torch.Tensor, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The FP8 cache as a plain k_cache for `flash_mla_with_kvcache`.

    Args:
        pages: uint8 (or float8_e4m3fn) [num_pages, page_size, 1, fp8_bytes_per_token(r, dr)].
        dtype: output dtype. bfloat16 and float32 hold every latent value exactly; float16
            overflows beyond 65504 and loses values below 2 ** -24.

    Returns:
        [num_pages, page_size, 1, kv_lora_rank + rope_dim] in `dtype`: latent then k_pe.
    """
    fmt = Fp8Format(kv_lora_rank, rope_dim)
    pages = fmt.check_pages(pages)
    if pages.shape[2] != 1:
        raise ValueError(f"pages must be [num_pages, page_size, 1, {fmt.row_width}], got {tuple(pages.shape)}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return fmt.values(pages, dtype)
