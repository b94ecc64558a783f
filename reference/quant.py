"""Plain PyTorch reference for the FP8 latent cache format (`mla.kernels.quant`).

Byte layout of one token (byte-compatible with FlashMLA's "FP8 with scale" MLA cache,
656 bytes for DeepSeek-V3's kv_lora_rank 512 + rope 64)::

    [0, r)                       r float8_e4m3fn codes of the latent (the NoPE part)
    [r, r + 4 * T)               T = r // tile little-endian float32 scales, one per tile
    [r + 4 * T, r + 4 * T + 2*dr) dr bfloat16 values of k_pe (the RoPE part, not quantized)

    tile = min(128, r); r must be a multiple of tile (so r < 128, or a multiple of 128)
    bytes per token = r + 4 * (r // tile) + 2 * dr

Quantization of one tile x[0:tile] (exact, no float rounding except the final cast):
    amax  = max |x|
    scale = 1                                               if amax == 0
          = max(2 ** ceil(log2(amax / 448)), 2 ** -117)     otherwise
    code  = round_to_nearest_even_e4m3(x / scale)   (|x / scale| <= 448, inside e4m3's range)
    value = float(code) * scale                     (exact in float32 and bfloat16)

The power-of-two scale makes x / scale and code * scale exact. Two edges of float32:
  - the floor 2 ** -117 only touches tiles with amax < 448 * 2 ** -117 (about 2.7e-33): it
    keeps every nonzero dequantized value (at least 2 ** -9 * scale = 2 ** -126) a normal
    float32 / bfloat16 number, so no consumer depends on subnormal support;
  - at the largest scale, 2 ** 120 (amax > 1.75 * 2 ** 127), code 256 would dequantize to
    2 ** 128 = inf, so codes there saturate at +-240 (0x77): |x| >= 248 * 2 ** 120 (about
    3.3e38, the top 3% of float32's range) is stored as 240 * 2 ** 120, one e4m3 step low.
FlashMLA's own quantizer floors amax / 448 at 1e-4 instead (scale >= 2 ** -13); both produce
caches that the same dequantizer reads.

Non-finite input: a tile holding any NaN or +-inf is stored "poisoned" -- scale NaN and every
code 0x7F (the e4m3fn NaN) -- so the whole tile dequantizes to NaN and the corruption reaches
the attention output instead of being hidden; the other tiles of the token are unaffected.
k_pe is rounded to bfloat16 (nearest even); NaN stays NaN (payload unspecified).
"""

from __future__ import annotations

import math

import torch

from .cache import check_slots

FP8_TILE = 128
"""Latent values per scale when kv_lora_rank >= 128."""

MIN_SCALE_EXPONENT = -117
"""Smallest scale is 2 ** -117, so that (smallest e4m3 subnormal 2 ** -9) * scale = 2 ** -126 is normal."""

MAX_SCALE_EXPONENT = 120
"""Largest scale 2 ** 120: amax <= FLT_MAX < 448 * 2 ** 120."""

TOP_SCALE_MAX_CODE = 0x77
"""Codes saturate at +-240 (0x77) under the largest scale: 256 * 2 ** 120 = 2 ** 128 is inf."""

FP8_NAN_CODE = 0x7F
"""float8_e4m3fn NaN (positive), written for every value of a tile with non-finite input."""

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fp8_tile_size(kv_lora_rank: int) -> int:
    """Latent values per float32 scale: min(128, kv_lora_rank).

    Raises ValueError unless kv_lora_rank is positive and a multiple of the tile.
    """
    if not isinstance(kv_lora_rank, int) or isinstance(kv_lora_rank, bool) or kv_lora_rank <= 0:
        raise ValueError(f"kv_lora_rank must be a positive int, got {kv_lora_rank!r}")
    tile = min(FP8_TILE, kv_lora_rank)
    if kv_lora_rank % tile:
        raise ValueError(
            f"kv_lora_rank={kv_lora_rank} is not a multiple of the FP8 scale tile {tile}: "
            f"the FP8 cache needs kv_lora_rank < {FP8_TILE} or a multiple of {FP8_TILE}"
        )
    return tile


def fp8_bytes_per_token(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes of one token in the FP8 cache: kv_lora_rank + 4 * (kv_lora_rank // tile) + 2 * rope_dim.

    656 for DeepSeek-V3 (512, 64). Raises ValueError for a bad kv_lora_rank (see
    `fp8_tile_size`) or a rope_dim that is not a positive int.
    """
    tile = fp8_tile_size(kv_lora_rank)
    if not isinstance(rope_dim, int) or isinstance(rope_dim, bool) or rope_dim <= 0:
        raise ValueError(f"rope_dim must be a positive int, got {rope_dim!r}")
    return kv_lora_rank + 4 * (kv_lora_rank // tile) + 2 * rope_dim


def _check_latent(kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    for name, t in (("kv", kv), ("k_pe", k_pe)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if kv.shape[:-1] != k_pe.shape[:-1]:
        raise ValueError(f"kv {tuple(kv.shape)} and k_pe {tuple(k_pe.shape)} disagree on the token dimensions")
    if kv.device != k_pe.device:
        raise ValueError(f"kv is on {kv.device} but k_pe is on {k_pe.device}")


def _as_bytes(packed: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 view of an FP8 cache tensor given as uint8 or float8_e4m3fn (FlashMLA allocates the latter)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype == torch.float8_e4m3fn:
        return packed.view(torch.uint8)
    if packed.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 or float8_e4m3fn (raw FP8 cache bytes), got {packed.dtype}")
    return packed


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A row-major copy at storage offset 0, so it can be viewed as a dtype of another width
    (`.contiguous()` may return a view at an unaligned byte offset, e.g. kv_lora_rank 6)."""
    return t.clone(memory_format=torch.contiguous_format)


def tile_scales(amax: torch.Tensor) -> torch.Tensor:
    """Power-of-two scale of each tile from its float32 amax (>= 0, finite): float32, same shape.

    2 ** ceil(log2(amax / 448)) computed exactly: with amax = f * 2 ** k, f in [0.5, 1),
    amax / 448 = (f / 0.875) * 2 ** (k - 9), so the exponent is k - 9, plus 1 when f > 0.875.
    The scale is assembled from its exponent bits, so no floating rounding is involved.
    """
    f, k = torch.frexp(amax)
    exponent = (k - 9 + (f > 0.875).to(k.dtype)).clamp_min(MIN_SCALE_EXPONENT)
    scale = ((exponent + 127) << 23).to(torch.int32).view(torch.float32)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def quantize_latent_fp8(kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Pack tokens into the FP8 cache format.

    Args:
        kv: [..., kv_lora_rank] latent, bfloat16 / float16 / float32.
        k_pe: [..., rope_dim] rotary key part, bfloat16 / float16 / float32 (stored as bfloat16).

    Returns:
        uint8 [..., fp8_bytes_per_token(kv_lora_rank, rope_dim)], layout in the module docstring.
    """
    _check_latent(kv, k_pe)
    r, dr = kv.shape[-1], k_pe.shape[-1]
    fp8_bytes_per_token(r, dr)  # validates both sizes
    tile = fp8_tile_size(r)
    lead = kv.shape[:-1]
    n = math.prod(lead)
    x = kv.reshape(n, r // tile, tile).float()  # [n, T, tile]
    finite = torch.isfinite(x).all(dim=-1)  # [n, T]
    amax = torch.where(finite, x.abs().amax(dim=-1), torch.zeros_like(finite, dtype=torch.float32))
    scale = tile_scales(amax)  # [n, T]
    codes = (x / scale[..., None]).to(torch.float8_e4m3fn).view(torch.uint8)
    overflow = (scale == 2.0**MAX_SCALE_EXPONENT)[..., None] & ((codes & 0x7F) > TOP_SCALE_MAX_CODE)
    codes = torch.where(overflow, (codes & 0x80) | TOP_SCALE_MAX_CODE, codes)
    codes = torch.where(finite[..., None], codes, torch.full_like(codes, FP8_NAN_CODE))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    rope = _fresh(k_pe.reshape(n, dr).to(torch.bfloat16))
    # Byte views of native little-endian float32 / bfloat16 (every platform torch ships on).
    packed = torch.cat([codes.flatten(1), scale.view(torch.uint8), rope.view(torch.uint8)], dim=1)
    return packed.reshape(*lead, packed.shape[-1])


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
    width = fp8_bytes_per_token(kv_lora_rank, rope_dim)
    if packed.dim() < 1 or packed.shape[-1] != width:
        raise ValueError(
            f"packed must end in {width} bytes for kv_lora_rank={kv_lora_rank}, rope_dim={rope_dim}, "
            f"got shape {tuple(packed.shape)}"
        )
    tile = fp8_tile_size(kv_lora_rank)
    n_tiles = kv_lora_rank // tile
    lead = packed.shape[:-1]
    rows = packed.reshape(-1, width)
    codes = rows[:, :kv_lora_rank].view(torch.float8_e4m3fn).float()
    scale = _fresh(rows[:, kv_lora_rank : kv_lora_rank + 4 * n_tiles]).view(torch.float32)
    rope = _fresh(rows[:, kv_lora_rank + 4 * n_tiles :]).view(torch.bfloat16)
    kv = (codes.view(rows.shape[0], n_tiles, tile) * scale[..., None]).reshape(*lead, kv_lora_rank)
    return kv, rope.reshape(*lead, rope_dim)


def _check_pages(pages: torch.Tensor, kv_lora_rank: int, rope_dim: int) -> torch.Tensor:
    pages = _as_bytes(pages, "pages")
    width = fp8_bytes_per_token(kv_lora_rank, rope_dim)
    if pages.dim() != 4 or pages.shape[2] != 1 or pages.shape[3] != width:
        raise ValueError(
            f"pages must be [num_pages, page_size, 1, {width}] (FP8 bytes per token for "
            f"kv_lora_rank={kv_lora_rank}, rope_dim={rope_dim}), got shape {tuple(pages.shape)}"
        )
    return pages


def check_write_args(pages: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Validate `write_latent_fp8` arguments (the reference and the kernel launcher share this).

    Raises TypeError for wrong dtypes and ValueError for wrong ranks, shapes, byte widths and
    devices and, when `slots` is on the CPU, for slots outside the pool or repeated (with
    duplicates the value a parallel write leaves is unspecified). As for the bf16 cache
    (`mla.reference.cache.check_write_args`), slot values on CUDA are not read, since that
    would synchronise the device on every layer's write; the kernel skips out-of-range slots.

    Returns:
        pages as a uint8 view.
    """
    _check_latent(kv, k_pe)
    if kv.dim() != 2 or k_pe.dim() != 2:
        raise ValueError(f"kv and k_pe must be 2-D [n, dim], got {tuple(kv.shape)} and {tuple(k_pe.shape)}")
    pages = _check_pages(pages, kv.shape[1], k_pe.shape[1])
    check_slots(pages, slots, kv=kv, k_pe=k_pe)
    if slots.dim() != 1 or slots.shape[0] != kv.shape[0]:
        raise ValueError(f"slots must be [n] with n = {kv.shape[0]} tokens, got shape {tuple(slots.shape)}")
    return pages


def write_latent_fp8(pages: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Quantize tokens and store them into a paged FP8 cache, in place.

    Args:
        pages: uint8 (or float8_e4m3fn) [num_pages, page_size, 1, fp8_bytes_per_token(r, dr)];
            any strides.
        slots: int64 [n] distinct flat slots (page * page_size + offset).
        kv: [n, r] latent, bfloat16 / float16 / float32.
        k_pe: [n, dr], bfloat16 / float16 / float32.

    Returns:
        pages, modified in place.
    """
    raw = check_write_args(pages, slots, kv, k_pe)
    page_size = raw.shape[1]
    raw[slots // page_size, slots % page_size, 0] = quantize_latent_fp8(kv, k_pe)
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
    pages = _check_pages(pages, kv_lora_rank, rope_dim)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    kv, k_pe = dequantize_latent_fp8(pages, kv_lora_rank, rope_dim)
    return torch.cat([kv.to(dtype), k_pe.to(dtype)], dim=-1)
