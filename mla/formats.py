"""Latent cache formats: the one place that knows how a token's row is laid out in a page.

A page tensor of one layer is `[num_pages, page_size, h_kv, row_width]` (h_kv = 1 for MLA);
a row holds one token's latent (kv_lora_rank values, which double as V) and its roped key
k_pe (rope_dim values). Two formats:

`PlainFormat`: `[latent | k_pe]` in one floating dtype (bfloat16, float16 or float32);
row_width = kv_lora_rank + rope_dim elements.

`Fp8Format`: byte-compatible with FlashMLA's "FP8 with scale" MLA cache (656 bytes per token
for DeepSeek-V3's 512 + 64, instead of 1,152 in bf16)::

    [0, r)                          r float8_e4m3fn codes of the latent
    [r, r + 4 * T)                  T = r // tile little-endian float32 scales, one per tile
    [r + 4 * T, r + 4 * T + 2 * dr) dr bfloat16 values of k_pe (not quantized)

    tile = min(128, r); bytes per token = r + 4 * T + 2 * dr

  Quantization of one tile x[0:tile] (exact, no float rounding except the final cast):
    amax  = max |x|
    scale = 1 if amax == 0, else max(2 ** ceil(log2(amax / 448)), 2 ** -117)
    code  = round_to_nearest_even_e4m3(x / scale)    (|x / scale| <= 448)
    value = float(code) * scale                      (exact in float32 and bfloat16)
  Two edges of float32: the floor 2 ** -117 keeps every nonzero dequantized value (at least
  2 ** -9 * scale) a normal number, so no reader depends on subnormal support; under the
  largest scale, 2 ** 120, code 256 would dequantize to inf, so codes there saturate at
  +-240 (0x77). A tile holding NaN or +-inf is stored poisoned (scale NaN, every code 0x7F)
  so the corruption reaches the output instead of hiding. k_pe is rounded to bfloat16.
  FlashMLA's own quantizer floors amax / 448 at 1e-4 instead; the same dequantizer reads both.

Every user asks the format instead of re-deriving it: `MLAConfig.kv_bytes_per_token`,
`LatentCache` (allocation, writes, reads), the PyTorch references, the Triton kernels (the
FP8 offsets and tile reach them as arguments) and the benchmark. A combination a kernel
cannot read fails here, when the config's byte count, the cache or the call is built,
with a message naming the field and the rule.
"""

from __future__ import annotations

import math

import torch

FP8_NAMES = ("fp8", "float8", "float8_e4m3fn")
"""Strings that select the FP8 cache (any case); torch.float8_e4m3fn does too."""

PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

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


def is_fp8_dtype(dtype) -> bool:
    """Whether `dtype` names the FP8 cache: torch.float8_e4m3fn or one of FP8_NAMES."""
    if isinstance(dtype, str):
        return dtype.lower() in FP8_NAMES
    return dtype == torch.float8_e4m3fn


def _check_dim(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class CacheFormat:
    """What every format provides.

    Attributes:
        kv_lora_rank: r, latent channels (the first r channels of a row are also V).
        rope_dim: dr, roped key channels.
        dtype: the dtype a cache of this format reports (torch.float8_e4m3fn for FP8).
        storage_dtype: element dtype of the page tensor (uint8 for FP8).
        row_width: elements of storage_dtype per token.
        bytes_per_token: bytes of one token in one layer.
        is_fp8: whether rows are FP8 (`flash_mla_with_kvcache(..., is_fp8_kvcache=True)`).
        head_dim, head_dim_v: d = r + dr and dv = r of the absorbed query the kernels take.
    """

    kv_lora_rank: int
    rope_dim: int
    dtype: torch.dtype
    storage_dtype: torch.dtype
    row_width: int
    bytes_per_token: int
    is_fp8: bool

    @property
    def head_dim(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def head_dim_v(self) -> int:
        return self.kv_lora_rank

    def allocate(self, num_pages: int, page_size: int, device) -> torch.Tensor:
        """Zeroed pages [num_pages, page_size, 1, row_width]. Zeros, not empty: a never-written
        row then reads as zeros (FP8: codes 0 with scale 0.0) instead of NaN."""
        return torch.zeros(num_pages, page_size, 1, self.row_width, dtype=self.storage_dtype, device=device)

    def check_pages(self, pages: torch.Tensor, name: str = "pages") -> torch.Tensor:
        """Validate a page tensor [num_pages, page_size, h_kv, row_width] of this format and
        return it as storage_dtype (FP8 pages may be allocated as float8_e4m3fn, as FlashMLA does)."""
        if not isinstance(pages, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(pages).__name__}")
        storage = self._storage_view(pages, name)
        if pages.dim() != 4 or pages.shape[-1] != self.row_width:
            raise ValueError(
                f"{name} must be [num_pages, page_size, h_kv, {self.row_width}] for {self}, got shape {tuple(pages.shape)}"
            )
        return storage

    def _storage_view(self, pages: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def store_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype values of `dtype` are converted to before a write."""
        raise NotImplementedError

    def pack(self, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """latent [..., r], k_pe [..., dr] -> rows [..., row_width] in storage_dtype."""
        raise NotImplementedError

    def unpack(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [..., row_width] -> (latent [..., r], k_pe [..., dr]); in `dtype` when given.
        FP8 without dtype: float32 (exact for the dequantized latent and the bfloat16 k_pe)."""
        raise NotImplementedError

    def values(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """rows [..., row_width] -> [..., r + dr] in `dtype`: the plain row the decode math reads."""
        return torch.cat(self.unpack(rows, dtype), dim=-1)


class PlainFormat(CacheFormat):
    """`[latent | k_pe]` in bfloat16, float16 or float32."""

    is_fp8 = False

    def __init__(self, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype):
        self.kv_lora_rank = _check_dim("kv_lora_rank", kv_lora_rank, 1)
        self.rope_dim = _check_dim("rope_dim", rope_dim, 0)
        if dtype not in PLAIN_DTYPES:
            raise ValueError(
                f"dtype must be one of {PLAIN_DTYPES}, torch.float8_e4m3fn or one of the strings {FP8_NAMES} "
                f"(FP8 cache), got {dtype!r}"
            )
        self.dtype = self.storage_dtype = dtype
        self.row_width = kv_lora_rank + rope_dim
        self.bytes_per_token = self.row_width * dtype.itemsize

    def _storage_view(self, pages, name):
        if pages.dtype != self.dtype:
            raise TypeError(f"{name} dtype {pages.dtype} does not match the cache format's {self.dtype}")
        return pages

    def store_dtype(self, dtype):
        return self.dtype

    def pack(self, latent, k_pe):
        return torch.cat([latent, k_pe], dim=-1).to(self.dtype)

    def unpack(self, rows, dtype=None):
        latent, k_pe = rows[..., : self.kv_lora_rank], rows[..., self.kv_lora_rank :]
        return (latent, k_pe) if dtype is None else (latent.to(dtype), k_pe.to(dtype))

    def values(self, rows, dtype):
        return rows.to(dtype)  # the row is already [latent | k_pe]

    def __repr__(self) -> str:
        return f"PlainFormat(kv_lora_rank={self.kv_lora_rank}, rope_dim={self.rope_dim}, dtype={self.dtype})"


class Fp8Format(CacheFormat):
    """FlashMLA's FP8 MLA row (layout and quantization rule in the module docstring).

    Attributes beyond CacheFormat's:
        tile: latent values per float32 scale, min(128, r).
        num_tiles: r // tile.
        scale_offset: byte offset of the first scale (r).
        rope_offset: byte offset of k_pe (r + 4 * num_tiles).

    Rules, checked here: r is a whole number of tiles (r < 128 or a multiple of 128); r is a
    multiple of 4 and dr is even, so that in every row the scales start on a 4-byte boundary and
    k_pe on a 2-byte one (readers load them as float32 / bfloat16 words); dr >= 1 (dr = 0 only
    for the indexer key row, `index_key_format`).
    """

    is_fp8 = True
    dtype = torch.float8_e4m3fn
    storage_dtype = torch.uint8
    input_dtypes = PLAIN_DTYPES
    min_rope_dim = 1

    def __init__(self, kv_lora_rank: int, rope_dim: int):
        r = _check_dim("kv_lora_rank", kv_lora_rank, 1)
        dr = _check_dim("rope_dim", rope_dim, self.min_rope_dim)
        tile = min(FP8_TILE, r)
        if r % tile:
            raise ValueError(
                f"kv_lora_rank={r} is not a multiple of the FP8 scale tile {tile}: "
                f"the FP8 cache needs kv_lora_rank < {FP8_TILE} or a multiple of {FP8_TILE}"
            )
        if r % 4:
            raise ValueError(
                f"kv_lora_rank={r} does not suit the FP8 cache: its float32 scales start at byte "
                "kv_lora_rank, which must be a multiple of 4"
            )
        if dr % 2:
            raise ValueError(
                f"rope_dim={dr} does not suit the FP8 cache: rows are r + 4 * tiles + 2 * rope_dim bytes, "
                "and rope_dim must be even so that every row's scales stay 4-byte aligned"
            )
        self.kv_lora_rank, self.rope_dim, self.tile = r, dr, tile
        self.num_tiles = r // tile
        self.scale_offset = r
        self.rope_offset = r + 4 * self.num_tiles
        self.row_width = self.bytes_per_token = self.rope_offset + 2 * dr

    def _storage_view(self, pages, name):
        if pages.dtype == torch.float8_e4m3fn:
            return pages.view(torch.uint8)
        if pages.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 or float8_e4m3fn (raw FP8 cache bytes), got {pages.dtype}")
        return pages

    def store_dtype(self, dtype):
        # the quantizer reads these as they are; anything else (float64) goes through float32
        return dtype if dtype in self.input_dtypes else torch.float32

    def pack(self, latent, k_pe):
        """Quantize: latent [..., r], k_pe [..., dr] in bfloat16 / float16 / float32 -> uint8 [..., bytes]."""
        lead = latent.shape[:-1]
        n = math.prod(lead)
        x = latent.reshape(n, self.num_tiles, self.tile).float()  # [n, T, tile]
        finite = torch.isfinite(x).all(dim=-1)  # [n, T]
        amax = torch.where(finite, x.abs().amax(dim=-1), torch.zeros_like(finite, dtype=torch.float32))
        scale = tile_scales(amax)  # [n, T]
        codes = (x / scale[..., None]).to(torch.float8_e4m3fn).view(torch.uint8)
        overflow = (scale == 2.0**MAX_SCALE_EXPONENT)[..., None] & ((codes & 0x7F) > TOP_SCALE_MAX_CODE)
        codes = torch.where(overflow, (codes & 0x80) | TOP_SCALE_MAX_CODE, codes)
        codes = torch.where(finite[..., None], codes, torch.full_like(codes, FP8_NAN_CODE))
        scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
        rope = _fresh(k_pe.reshape(n, self.rope_dim).to(torch.bfloat16))
        # byte views of native little-endian float32 / bfloat16 (every platform torch ships on)
        packed = torch.cat([codes.flatten(1), scale.view(torch.uint8), rope.view(torch.uint8)], dim=1)
        return packed.reshape(*lead, self.row_width)

    def unpack(self, rows, dtype=None):
        """Dequantize rows [..., bytes] (uint8 or float8_e4m3fn): latent code * scale (exact;
        NaN for a poisoned tile) and k_pe as stored; float32 unless `dtype` is given."""
        rows = rows.view(torch.uint8) if rows.dtype == torch.float8_e4m3fn else rows
        lead = rows.shape[:-1]
        flat = rows.reshape(-1, self.row_width)
        codes = flat[:, : self.scale_offset].view(torch.float8_e4m3fn).float()
        scale = _fresh(flat[:, self.scale_offset : self.rope_offset]).view(torch.float32)
        latent = (codes.view(-1, self.num_tiles, self.tile) * scale[..., None]).reshape(*lead, self.kv_lora_rank)
        if self.rope_dim:
            k_pe = _fresh(flat[:, self.rope_offset :]).view(torch.bfloat16).reshape(*lead, self.rope_dim)
        else:
            k_pe = latent.new_zeros(*lead, 0)
        dtype = dtype or torch.float32
        return latent.to(dtype), k_pe.to(dtype)

    def __repr__(self) -> str:
        return f"Fp8Format(kv_lora_rank={self.kv_lora_rank}, rope_dim={self.rope_dim})"


def cache_format(dtype, kv_lora_rank: int, rope_dim: int) -> PlainFormat | Fp8Format:
    """The format of a cache of `dtype`: bfloat16 / float16 / float32, or FP8 ("fp8",
    torch.float8_e4m3fn). Raises ValueError for a dtype or dimensions the format cannot hold."""
    if is_fp8_dtype(dtype):
        return Fp8Format(kv_lora_rank, rope_dim)
    return PlainFormat(kv_lora_rank, rope_dim, dtype)


def index_key_format(dtype, index_head_dim: int) -> PlainFormat | Fp8Format:
    """The row of one cached indexer key (DeepSeek-V3.2's lightning indexer): index_head_dim
    values in bfloat16 / float16 / float32, or in FP8 ("fp8", torch.float8_e4m3fn) the latent
    row's rules without k_pe: index_head_dim e4m3 codes, then one float32 power-of-two scale per
    128 channels (132 bytes for V3.2's 128, as DeepSeek stores them). Read it with
    `unpack(rows)[0]`; rope_dim is 0."""
    if is_fp8_dtype(dtype):
        return _Fp8KeyFormat(index_head_dim, 0)
    return PlainFormat(index_head_dim, 0, dtype)


class _Fp8KeyFormat(Fp8Format):
    """The FP8 row without k_pe (the indexer key)."""

    min_rope_dim = 0


def decode_format(k_cache: torch.Tensor, head_dim_v: int, head_dim: int, is_fp8: bool) -> PlainFormat | Fp8Format:
    """The format a decode call reads k_cache in: from the call's head dims and FP8 flag."""
    if is_fp8:
        return Fp8Format(head_dim_v, head_dim - head_dim_v)
    return PlainFormat(head_dim_v, head_dim - head_dim_v, k_cache.dtype)


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


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A row-major copy at storage offset 0, so it can be viewed as a dtype of another width."""
    return t.clone(memory_format=torch.contiguous_format)
