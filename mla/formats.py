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

FP4_NAMES = ("fp4", "mxfp4")
"""Strings that select MXFP4 indexer keys (`index_key_format`, any case); torch.float4_e2m1fn_x2 does too."""

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


def is_fp4_dtype(dtype) -> bool:
    """Whether `dtype` names MXFP4 indexer keys: torch.float4_e2m1fn_x2 or one of FP4_NAMES."""
    if isinstance(dtype, str):
        return dtype.lower() in FP4_NAMES
    return dtype == torch.float4_e2m1fn_x2


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
        is_fp4: whether rows are MXFP4 (False here; `Mxfp4KeyFormat`'s indexer keys are).
        head_dim, head_dim_v: d = r + dr and dv = r of the absorbed query the kernels take.
    """

    kv_lora_rank: int
    rope_dim: int
    dtype: torch.dtype
    storage_dtype: torch.dtype
    row_width: int
    bytes_per_token: int
    is_fp8: bool
    is_fp4 = False

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
    dtypes = PLAIN_DTYPES

    def __init__(self, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype):
        self.kv_lora_rank = _check_dim("kv_lora_rank", kv_lora_rank, 1)
        self.rope_dim = _check_dim("rope_dim", rope_dim, 0)
        if dtype not in self.dtypes:
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


def index_key_format(dtype, index_head_dim: int) -> PlainFormat | Fp8Format | Mxfp4KeyFormat:
    """The row of one cached indexer key (DeepSeek-V3.2's lightning indexer): index_head_dim
    values in bfloat16 / float16 / float32, or in FP8 ("fp8", torch.float8_e4m3fn) the latent
    row's rules without k_pe: index_head_dim e4m3 codes, then one float32 power-of-two scale per
    128 channels (132 bytes for V3.2's 128, as DeepSeek stores them); read those with
    `unpack(rows)[0]`, rope_dim is 0. MXFP4 ("mxfp4", "fp4", torch.float4_e2m1fn_x2):
    DeepSeek-V4's FP4 key, `Mxfp4KeyFormat` (68 bytes for 128; read with `unpack(rows)`)."""
    if is_fp8_dtype(dtype):
        return _Fp8KeyFormat(index_head_dim, 0)
    if is_fp4_dtype(dtype):
        return Mxfp4KeyFormat(index_head_dim)
    return PlainFormat(index_head_dim, 0, dtype)


class _Fp8KeyFormat(Fp8Format):
    """The FP8 row without k_pe (the indexer key)."""

    min_rope_dim = 0


def decode_format(
    k_cache: torch.Tensor, head_dim_v: int, head_dim: int, is_fp8: bool
) -> PlainFormat | Fp8Format | Model1Format:
    """The format a decode call reads k_cache in: from the call's head dims, FP8 flag and the
    cache's last dim. FP8 with head_dim 512 over 584-byte tokens is DeepSeek-V4's MODEL1
    (`Model1Format`, K = V, so head_dim_v must be 512 too); other FP8 calls read V3's row
    (`Fp8Format`, whose 512 + 64 row is 656 bytes, so the two never meet)."""
    model1_row = k_cache.dim() >= 1 and k_cache.shape[-1] == Model1Format.row_width
    if is_fp8 and head_dim == Model1Format.head_dim and model1_row:
        if head_dim_v != Model1Format.head_dim_v:
            raise ValueError(
                f"a {Model1Format.row_width}-byte FP8 cache with d = {head_dim} is {Model1Format()}, whose K = V: "
                f"head_dim_v must be {Model1Format.head_dim_v}"
            )
        return Model1Format()
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


def page_bytes(fmt, page_size: int) -> int:
    """Bytes of one page of `page_size` tokens in format `fmt`: the format's own `page_bytes`
    when its layout is per page (`Model1Format` pads its pages), else page_size rows."""
    page_size = _check_dim("page_size", page_size, 1)
    own = getattr(fmt, "page_bytes", None)
    return own(page_size) if own is not None else page_size * fmt.bytes_per_token


def _check_values(values: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> None:
    """The rows of a write: a 16- or 32-bit float tensor, one row per slot, on the pages' device."""
    if values.dtype not in PLAIN_DTYPES:
        raise TypeError(f"values must be bfloat16, float16 or float32, got {values.dtype}")
    if values.shape[:1] != slots.shape or values.device != pages.device:
        raise ValueError(
            f"values [{values.shape[0]} rows, on {values.device}] must match slots [{slots.numel()}] on {pages.device}"
        )


def _check_slots(slots: torch.Tensor, num_slots: int, device: torch.device, distinct: bool) -> torch.Tensor:
    """Validate a 1-D int32 / int64 tensor of token slots (page * page_size + row) on `device`.
    Slot values are read only on the CPU (as `check_write_args` does: reading them on CUDA would
    synchronise every layer's write): in [0, num_slots), and without repeats for a write."""
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slots must be a 1-D int32 or int64 tensor, got {getattr(slots, 'dtype', type(slots))}")
    if slots.device != device:
        raise ValueError(f"slots are on {slots.device} but pages are on {device}")
    if slots.numel() and slots.device.type == "cpu":
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi >= num_slots:
            raise ValueError(f"slots must lie in [0, {num_slots}), got values in [{lo}, {hi}]")
        if distinct and slots.unique().numel() != slots.numel():
            raise ValueError("slots of one write must be distinct")
    return slots.long()


def _check_pages_2d(pages: torch.Tensor, row_bytes: int, name: str) -> torch.Tensor:
    if not isinstance(pages, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pages).__name__}")
    if pages.dtype == torch.float8_e4m3fn:
        pages = pages.view(torch.uint8)
    if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] != row_bytes:
        raise ValueError(
            f"{name} must be uint8 [num_pages, {row_bytes}] for this page size, got {pages.dtype} {tuple(pages.shape)}"
        )
    return pages


class Model1Format:
    """FlashMLA's DeepSeek-V4 FP8 KV cache ("MODEL1"), byte for byte.

    Source: deepseek-ai/FlashMLA tests/quant.py (`FP8KVCacheLayout.MODEL1_FP8Sparse`,
    `quantize_k_cache` / `dequantize_k_cache`). A V4 token is one K = V vector of 512 values
    whose last 64 channels carry RoPE. Per token: 448 float8_e4m3fn codes of the unroped
    channels, 64 bfloat16 rope values (not quantized), 7 UE8M0 scales (one per 64 unroped
    channels, the byte is the exponent + 127) and 1 pad byte: 584 bytes. Unlike the V3 row
    (`Fp8Format`) the layout is per PAGE of page_size tokens, a flat uint8 [page_bytes]::

        [t * 576, t * 576 + 448)                       token t's e4m3 codes, channels 0..447
        [t * 576 + 448, t * 576 + 576)                 token t's 64 bfloat16 rope values
        [page_size * 576 + t * 8, ... + 7)             token t's 7 UE8M0 scales
        page_size * 576 + t * 8 + 7                    pad byte (written 0)
        [page_size * 584, page_bytes)                  page padding, page_bytes =
                                                       ceil(page_size * 584 / 576) * 576

    Quantization of one tile x[0:64] (FlashMLA's rule, reproduced with the same float32 torch
    operations so the bytes agree):
        scale = 2 ** ceil(log2(max(amax(|x|) / 448, 1e-4)))   (float32 division and log2)
        code  = round_to_nearest_even_e4m3(float32(x) / scale) (saturating at +-448)
    so scales lie in [2 ** -13, 2 ** 120]. A tile with NaN or +-inf gets scale byte 0xFF
    (UE8M0 NaN), so it reads back as NaN instead of hiding the corruption. Rope values are
    rounded to bfloat16. Reading multiplies code by scale in float32 (exact; FlashMLA's test
    dequantizer does it in bfloat16, also exact, except that code * 2 ** 120 may overflow
    bfloat16 and float32 alike for |x| within 1/32 of float32's maximum).

    Slots: token slot s = page * page_size + row, as in a block table.
    """

    head_dim = 512
    rope_dim = 64
    nope_dim = 448
    tile = 64
    num_tiles = 7
    data_bytes = 576
    """Codes plus rope values of one token: 448 + 2 * 64."""
    scale_bytes = 8
    """Seven scales and a pad byte per token."""
    bytes_per_token = row_width = 584
    """The last dim of a decode call's k_cache (`kvcache_view`)."""
    page_align = 576
    """Pages are padded to a multiple of this many bytes."""
    scale_floor = 1e-4
    """FlashMLA floors amax / 448 at 1e-4 (so the smallest scale is 2 ** -13)."""
    dtype = torch.float8_e4m3fn
    storage_dtype = torch.uint8
    is_fp8 = True
    head_dim_v = 512
    """K = V: a decode call's output has all 512 channels, the rope ones included."""

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page: page_size * 584 rounded up to a multiple of 576."""
        page_size = _check_dim("page_size", page_size, 1)
        return -(-page_size * self.bytes_per_token // self.page_align) * self.page_align

    def allocate(self, num_pages: int, page_size: int, device) -> torch.Tensor:
        """Zeroed pages, uint8 [num_pages, page_bytes(page_size)]. A never-written token reads
        as zeros (codes 0, scales 2 ** -127)."""
        num_pages = _check_dim("num_pages", num_pages, 0)
        return torch.zeros(num_pages, self.page_bytes(page_size), dtype=torch.uint8, device=device)

    def pack(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize values [n, 512] (bfloat16 / float16 / float32; the last 64 channels are the
        rope part) -> (data uint8 [n, 576], scales uint8 [n, 8]): each token's two byte runs."""
        if values.dim() != 2 or values.shape[1] != self.head_dim:
            raise ValueError(f"values must be [n, {self.head_dim}], got shape {tuple(values.shape)}")
        n = values.shape[0]
        x = values[:, : self.nope_dim].float().reshape(n, self.num_tiles, self.tile)  # [n, 7, 64]
        amax = x.abs().amax(dim=-1)  # NaN propagates; +-inf gives inf
        scale = torch.pow(2, torch.clamp_min(amax / 448.0, self.scale_floor).log2().ceil())  # [n, 7]
        codes = (x / scale[..., None]).to(torch.float8_e4m3fn).view(torch.uint8).reshape(n, self.nope_dim)
        # UE8M0 of a finite power of two is exact; inf and NaN both become 0xFF (NaN)
        scale_bits = scale.to(torch.float8_e8m0fnu).view(torch.uint8)
        rope = _fresh(values[:, self.nope_dim :].to(torch.bfloat16)).view(torch.uint8)  # [n, 128]
        data = torch.cat([codes, rope], dim=1)
        scales = torch.cat([scale_bits, scale_bits.new_zeros(n, 1)], dim=1)
        return data, scales

    def unpack(self, data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """data uint8 [n, 576], scales uint8 [n, 8] -> values [n, 512] in `dtype`."""
        n = data.shape[0]
        codes = _fresh(data[:, : self.nope_dim]).view(torch.float8_e4m3fn).float()
        scale = _fresh(scales[:, : self.num_tiles]).view(torch.float8_e8m0fnu).float()  # [n, 7]
        nope = (codes.reshape(n, self.num_tiles, self.tile) * scale[..., None]).reshape(n, self.nope_dim)
        rope = _fresh(data[:, self.nope_dim :]).view(torch.bfloat16).float()
        return torch.cat([nope, rope], dim=1).to(dtype)

    def write(self, pages: torch.Tensor, page_size: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize values [n, 512] into pages uint8 [num_pages, page_bytes(page_size)] at token
        slots [n] (int32 / int64, page * page_size + row), in place."""
        pages = _check_pages_2d(pages, self.page_bytes(page_size), "pages")
        slots = _check_slots(slots, pages.shape[0] * page_size, pages.device, distinct=True)
        _check_values(values, slots, pages)
        data, scales = self.pack(values)
        data_at, scale_at = self._offsets(page_size, slots)
        flat = pages.view(-1)
        flat[data_at[:, None] + torch.arange(self.data_bytes, device=flat.device)] = data
        flat[scale_at[:, None] + torch.arange(self.scale_bytes, device=flat.device)] = scales

    def read(
        self, pages: torch.Tensor, page_size: int, slots: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Dequantized values [n, 512] in `dtype` of the tokens at slots [n]."""
        pages = _check_pages_2d(pages, self.page_bytes(page_size), "pages")
        slots = _check_slots(slots, pages.shape[0] * page_size, pages.device, distinct=False)
        data_at, scale_at = self._offsets(page_size, slots)
        flat = pages.view(-1)
        data = flat[data_at[:, None] + torch.arange(self.data_bytes, device=flat.device)]
        scales = flat[scale_at[:, None] + torch.arange(self.scale_bytes, device=flat.device)]
        return self.unpack(data, scales, dtype)

    def kvcache_view(self, pages: torch.Tensor, page_size: int) -> torch.Tensor:
        """pages uint8 [num_pages, page_bytes(page_size)] as the k_cache a decode call takes:
        uint8 [num_pages, page_size, 1, 584] over the same memory, FlashMLA's view (its
        tests/quant.py). Only the shape and the page stride (stride(0) = page_bytes) mean
        anything: readers find a token's bytes by the per-page layout above, not by stride(1)."""
        pages = _check_pages_2d(pages, self.page_bytes(page_size), "pages")
        # narrow, not [:, :n]: indexing needs a device guard, which the compile-only report
        # (bench.compiled, fake CUDA tensors on a CPU-only torch) does not have
        tokens = pages.narrow(1, 0, page_size * self.bytes_per_token)
        return tokens.view(pages.shape[0], page_size, 1, self.bytes_per_token)

    def check_pages(self, pages: torch.Tensor, name: str = "k_cache") -> torch.Tensor:
        """Validate a decode call's k_cache, `kvcache_view`'s form uint8 (or float8_e4m3fn, as
        FlashMLA passes it) [num_pages, page_size, 1, 584], and return it as uint8. What makes
        its bytes readable by the page layout: the page stride (stride(0)) holds a whole page
        (page_bytes, or more), tokens are 584-byte steps of the page's first page_size * 584
        bytes (which the view covers, so nothing read lies outside it), bytes are contiguous,
        and pages start on 4-byte boundaries (readers load the codes as 32-bit words)."""
        if not isinstance(pages, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(pages).__name__}")
        if pages.dtype == torch.float8_e4m3fn:
            pages = pages.view(torch.uint8)
        if pages.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 or float8_e4m3fn (raw MODEL1 cache bytes), got {pages.dtype}")
        if pages.dim() != 4 or pages.shape[-1] != self.row_width:
            raise ValueError(
                f"{name} must be [num_pages, page_size, 1, {self.row_width}] for {self} (kvcache_view), "
                f"got shape {tuple(pages.shape)}"
            )
        num_pages, page_size, h_kv = pages.shape[:3]
        if h_kv != 1:
            raise ValueError(f"{name} in {self} holds one KV head (K = V, MQA): h_kv must be 1, got {h_kv}")
        if page_size < 1:
            raise ValueError(f"{name} needs page_size >= 1, got shape {tuple(pages.shape)}")
        if pages.stride(-1) != 1 or (page_size > 1 and pages.stride(1) != self.row_width):
            raise ValueError(
                f"{name} in {self} must be a view of whole pages (kvcache_view): stride(-1) = 1 and "
                f"stride(1) = {self.row_width}, got strides {pages.stride()}"
            )
        if pages.storage_offset() % 4:
            raise ValueError(
                f"{name} in {self} must start on a 4-byte boundary, got byte offset {pages.storage_offset()}"
            )
        need = self.page_bytes(page_size)
        if num_pages > 1 and (pages.stride(0) < need or pages.stride(0) % 4):
            raise ValueError(
                f"{name} in {self} needs stride(0) (the page stride, bytes) >= page_bytes = {need} for "
                f"page_size {page_size} and a multiple of 4, got {pages.stride(0)}"
            )
        return pages

    def kvcache_read(
        self, k_cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Dequantized values [*slots.shape, 512] in `dtype` of the tokens at slots (any shape,
        page * page_size + row, all within the cache: not checked) of a decode call's k_cache
        (`kvcache_view`'s form, checked by `check_pages`; any page stride)."""
        k_cache = k_cache.view(torch.uint8) if k_cache.dtype == torch.float8_e4m3fn else k_cache
        num_pages, page_size = k_cache.shape[:2]
        # each page's first page_size * 584 bytes, the extent the view covers
        pages = k_cache.as_strided((num_pages, page_size * self.bytes_per_token), (k_cache.stride(0), 1))
        flat = slots.reshape(-1).long()
        page = (flat // page_size)[:, None]
        data_at, scale_at = self.token_offsets(page_size, flat % page_size)
        data = pages[page, data_at[:, None] + torch.arange(self.data_bytes, device=pages.device)]
        scales = pages[page, scale_at[:, None] + torch.arange(self.scale_bytes, device=pages.device)]
        return self.unpack(data, scales, dtype).reshape(*slots.shape, self.head_dim)

    def token_offsets(self, page_size: int, row):
        """Byte offsets in its page of the data run and the scale run of the token in row `row`
        (an int or an integer tensor)."""
        return row * self.data_bytes, page_size * self.data_bytes + row * self.scale_bytes

    def _offsets(self, page_size: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat byte offsets (int64) of each slot's data run and scale run."""
        page, row = slots // page_size, slots % page_size
        base = page * self.page_bytes(page_size)
        data_at, scale_at = self.token_offsets(page_size, row)
        return base + data_at, base + scale_at

    def __repr__(self) -> str:
        return "Model1Format()"


E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitudes of the float4 e2m1 codes 0..7 (bit 3 of a nibble is the sign)."""

_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIE_UP = (False, True, False, True, False, True, False)
"""At the midpoint between codes k and k + 1, round to the even code: up when k + 1 is even."""


class Mxfp4KeyFormat:
    """DeepSeek-V4's lightning-indexer key stored as FP4: float4 e2m1 values with one UE8M0
    (power-of-two) scale per 32 channels, MXFP4-style.

    Source of the rule: DeepSeek-V4's reference inference code (inference/model.py and
    kernel.py `fp4_act_quant(x, 32)`, read in the Nicooo-Wang/DeepSeek-V4-Pro-code copy): the
    indexer's compressed keys are Hadamard-rotated, then quantized per block of 32 with
        scale = 2 ** ceil(log2(max(amax, 6 * 2 ** -126) / 6)),  q = clamp(x / scale, -6, 6)
    rounded to e2m1. (DeepSeek's reference then keeps the dequantized keys in bfloat16; the
    byte layout below is ours, as deployments store FP4.) This differs from the OCP MX rule
    (scale 2 ** (floor(log2 amax) - 2), which can clip); we follow DeepSeek.

    Row of one key, uint8 [bytes_per_token] (68 bytes for index_head_dim 128)::

        [0, d / 2)            e2m1 nibbles: channel 2i in the low nibble of byte i,
                              channel 2i + 1 in the high nibble (PyTorch float4_e2m1fn_x2 order)
        [d / 2, d / 2 + d / 32)  UE8M0 scales (exponent + 127), one per 32 channels

    Rounding is to the nearest e2m1 value, ties to the even code; |x / scale| > 6 saturates.
    A block holding NaN or +-inf gets scale byte 0xFF (NaN) and reads back as NaN.
    """

    block = 32
    dtype = torch.float4_e2m1fn_x2
    storage_dtype = torch.uint8
    is_fp8 = False
    is_fp4 = True
    amax_floor = 6 * 2.0**-126
    """DeepSeek's floor on a block's amax, so the smallest scale is 2 ** -126."""

    def __init__(self, index_head_dim: int):
        d = _check_dim("index_head_dim", index_head_dim, 1)
        if d % self.block:
            raise ValueError(f"index_head_dim={d} must be a multiple of {self.block} for MXFP4 keys (one scale per 32)")
        self.index_head_dim = d
        self.num_blocks = d // self.block
        self.scale_offset = d // 2
        self.row_width = self.bytes_per_token = d // 2 + self.num_blocks

    def allocate(self, num_pages: int, page_size: int, device) -> torch.Tensor:
        """Zeroed pages, uint8 [num_pages, page_size, bytes_per_token]."""
        num_pages = _check_dim("num_pages", num_pages, 0)
        page_size = _check_dim("page_size", page_size, 1)
        return torch.zeros(num_pages, page_size, self.row_width, dtype=torch.uint8, device=device)

    def check_pages(self, pages: torch.Tensor, name: str = "pages") -> torch.Tensor:
        """Validate pages uint8 [num_pages, page_size, h_kv, bytes_per_token] (the 4-d form
        `index_scores` reads; `allocate(...).unsqueeze(2)`) and return them."""
        if not isinstance(pages, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(pages).__name__}")
        if pages.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 (raw MXFP4 key bytes), got {pages.dtype}")
        if pages.dim() != 4 or pages.shape[-1] != self.row_width:
            raise ValueError(
                f"{name} must be [num_pages, page_size, h_kv, {self.row_width}] for {self}, got shape {tuple(pages.shape)}"
            )
        return pages

    def pack(self, keys: torch.Tensor) -> torch.Tensor:
        """Quantize keys [..., d] (bfloat16 / float16 / float32) -> rows uint8 [..., bytes_per_token]."""
        if keys.shape[-1] != self.index_head_dim:
            raise ValueError(f"keys must be [..., {self.index_head_dim}], got shape {tuple(keys.shape)}")
        lead = keys.shape[:-1]
        x = keys.reshape(-1, self.num_blocks, self.block).float()  # [n, B, 32]
        amax = x.abs().amax(dim=-1).clamp_min(self.amax_floor)  # NaN propagates
        scale = torch.pow(2, (amax / 6.0).log2().ceil())  # [n, B]
        q = x / scale[..., None]
        mag = q.abs()
        code = torch.zeros_like(mag, dtype=torch.uint8)
        for mid, up in zip(_E2M1_MIDPOINTS, _E2M1_TIE_UP):
            code += ((mag > mid) | ((mag == mid) & up)).to(torch.uint8)
        code = torch.where(torch.isnan(q), torch.zeros_like(code), code) | (torch.signbit(q).to(torch.uint8) << 3)
        code = code.reshape(-1, self.index_head_dim // 2, 2)
        nibbles = code[..., 0] | (code[..., 1] << 4)
        scale_bits = scale.to(torch.float8_e8m0fnu).view(torch.uint8)
        return torch.cat([nibbles, scale_bits], dim=1).reshape(*lead, self.row_width)

    def unpack(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """rows uint8 [..., bytes_per_token] -> keys [..., d] in `dtype` (code value * scale)."""
        lead = rows.shape[:-1]
        flat = rows.reshape(-1, self.row_width)
        nibbles = flat[:, : self.scale_offset]
        code = torch.stack([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(-1, self.index_head_dim).long()
        table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=rows.device)
        value = torch.where(code >= 8, -table[code & 7], table[code & 7])
        scale = _fresh(flat[:, self.scale_offset :]).view(torch.float8_e8m0fnu).float()  # [n, B]
        keys = value.reshape(-1, self.num_blocks, self.block) * scale[..., None]
        return keys.reshape(*lead, self.index_head_dim).to(dtype)

    def __repr__(self) -> str:
        return f"Mxfp4KeyFormat(index_head_dim={self.index_head_dim})"


class Mxfp4EntryFormat:
    """An optional MXFP4 row for DeepSeek-V4 window tokens and compressed entries, 368 bytes, as
    SGLang proposes (sgl-project/sglang pull requests 32741 / 37138, "MXFP4 KV cache for DSV4 on
    Hopper"): row-major per token, no page padding::

        [0, 224)      448 e2m1 values of the unroped channels (the `Mxfp4KeyFormat` nibbles)
        [224, 238)    14 UE8M0 scales, one per 32 unroped channels
        [238, 240)    2 pad bytes (written 0; they make the row 16-byte aligned)
        [240, 368)    64 bfloat16 rope values (not quantized)

    The unroped channels are quantized by `Mxfp4KeyFormat`'s rule (DeepSeek's FP4 rule); the
    proposal does not pin its own rounding, so this owner's is the one rule for both FP4 rows.
    Slots: token slot s = page * page_size + row.
    """

    head_dim = 512
    rope_dim = 64
    nope_dim = 448
    rope_offset = 240
    bytes_per_token = row_width = 368
    storage_dtype = torch.uint8
    is_fp8 = False

    def __init__(self):
        self.nope = Mxfp4KeyFormat(self.nope_dim)

    def allocate(self, num_pages: int, page_size: int, device) -> torch.Tensor:
        """Zeroed pages, uint8 [num_pages, page_size, 368]."""
        num_pages = _check_dim("num_pages", num_pages, 0)
        page_size = _check_dim("page_size", page_size, 1)
        return torch.zeros(num_pages, page_size, self.row_width, dtype=torch.uint8, device=device)

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """Quantize values [n, 512] (the last 64 channels roped) -> rows uint8 [n, 368]."""
        if values.dim() != 2 or values.shape[1] != self.head_dim:
            raise ValueError(f"values must be [n, {self.head_dim}], got shape {tuple(values.shape)}")
        nope = self.nope.pack(values[:, : self.nope_dim])  # [n, 238]
        rope = _fresh(values[:, self.nope_dim :].to(torch.bfloat16)).view(torch.uint8)  # [n, 128]
        return torch.cat([nope, nope.new_zeros(len(values), self.rope_offset - nope.shape[1]), rope], dim=1)

    def unpack(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """rows uint8 [n, 368] -> values [n, 512] in `dtype`."""
        nope = self.nope.unpack(rows[:, : self.nope.row_width])
        rope = _fresh(rows[:, self.rope_offset :]).view(torch.bfloat16).float()
        return torch.cat([nope, rope], dim=1).to(dtype)

    def write(self, pages: torch.Tensor, page_size: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize values [n, 512] into pages uint8 [num_pages, page_size, 368] at slots [n]."""
        rows = self._rows(pages, page_size)
        slots = _check_slots(slots, rows.shape[0], pages.device, distinct=True)
        _check_values(values, slots, pages)
        rows[slots] = self.pack(values)

    def read(
        self, pages: torch.Tensor, page_size: int, slots: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Dequantized values [n, 512] in `dtype` of the tokens at slots [n]."""
        rows = self._rows(pages, page_size)
        return self.unpack(rows[_check_slots(slots, rows.shape[0], pages.device, distinct=False)], dtype)

    def _rows(self, pages: torch.Tensor, page_size: int) -> torch.Tensor:
        if not isinstance(pages, torch.Tensor):
            raise TypeError(f"pages must be a torch.Tensor, got {type(pages).__name__}")
        if pages.dtype != torch.uint8 or pages.dim() != 3 or tuple(pages.shape[1:]) != (page_size, self.row_width):
            raise ValueError(
                f"pages must be uint8 [num_pages, {page_size}, {self.row_width}], "
                f"got {pages.dtype} {tuple(pages.shape)}"
            )
        return pages.view(-1, self.row_width)

    def __repr__(self) -> str:
        return "Mxfp4EntryFormat()"
