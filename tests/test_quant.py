"""FP8 latent cache format: byte layout, quantization rule, and the write kernel vs its reference.

The reference is checked against oracles that share none of its code: the byte layout
against `struct`-packed bytes, scales against exact rational arithmetic (`fractions`),
codes against a nearest-even search over the 253 finite e4m3 values built from the
format's definition. The kernel must then equal the reference byte for byte -- every
byte of the pages, including the ones it must leave untouched.
"""

from __future__ import annotations

import math
import os
import struct
from fractions import Fraction

import pytest
import torch
from mla.kernels import quant as kquant
from mla.reference import quant as rquant
from mla.reference.quant import dequantize_cache, dequantize_latent_fp8, fp8_bytes_per_token, quantize_latent_fp8

from mla.formats import FP8_NAN_CODE, Fp8Format

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
WRITERS = {"triton": kquant.write_latent_fp8, "reference": rquant.write_latent_fp8}


def e4m3_value(code: int) -> float:
    """Value of a positive float8_e4m3fn code from the format's definition (bias 7, 3 mantissa bits)."""
    exponent, mantissa = code >> 3, code & 7
    return mantissa / 8 * 2.0**-6 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7)


# Codes 0..126 are the non-negative finite values in increasing order (0x7F is NaN).
E4M3_GRID = torch.tensor([e4m3_value(c) for c in range(127)], dtype=torch.float64)


def oracle_codes(y: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn bits of y (|y| <= 448) by nearest-even search over the value grid: int64."""
    a = y.double().abs()
    hi = torch.searchsorted(E4M3_GRID, a).clamp(1, 126)
    lo = hi - 1
    d_lo, d_hi = a - E4M3_GRID[lo], E4M3_GRID[hi] - a
    code = torch.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    return code | (torch.signbit(y).long() << 7)


def oracle_scale(amax: float) -> float:
    """max(smallest power of two 2**e with amax <= 448 * 2**e, 2**-117); 1 for amax == 0. Exact."""
    if amax == 0:
        return 1.0
    e = math.floor(math.log2(amax / 448)) - 2
    while Fraction(448) * Fraction(2) ** e < Fraction(amax):
        e += 1
    return 2.0 ** max(e, -117)


def unpack(packed: torch.Tensor, r: int, dr: int):
    """uint8 [n, bytes] -> codes uint8 [n, r], scales float32 [n, tiles], k_pe bfloat16 [n, dr]."""
    tiles = r // min(128, r)
    codes = packed[:, :r]
    scales = packed[:, r : r + 4 * tiles].clone(memory_format=torch.contiguous_format).view(torch.float32)
    k_pe = packed[:, r + 4 * tiles :].clone(memory_format=torch.contiguous_format).view(torch.bfloat16)
    return codes, scales, k_pe


def random_pages(num_pages, page_size, width, gen, padded=False, dtype=torch.uint8) -> torch.Tensor:
    """Pages of random bytes. `padded` leaves a spare row per page, as FlashMLA's tests do,
    so the page stride is not page_size * width."""
    rows = page_size + 1 if padded else page_size
    pages = torch.randint(0, 256, (num_pages, rows, 1, width), generator=gen, dtype=torch.uint8)
    return pages[:, :page_size].view(dtype)


def quantize_via_kernel(kv: torch.Tensor, k_pe: torch.Tensor, page_size: int = 16, seed: int = 0) -> torch.Tensor:
    """The kernel's packed bytes for each token: write to shuffled slots, read the rows back."""
    g = torch.Generator().manual_seed(seed)
    n, width = kv.shape[0], fp8_bytes_per_token(kv.shape[1], k_pe.shape[1])
    num_pages = -(-n // page_size) + 1
    pages = random_pages(num_pages, page_size, width, g)
    slots = torch.randperm(num_pages * page_size, generator=g)[:n]
    kquant.write_latent_fp8(pages, slots, kv, k_pe)
    return pages[slots // page_size, slots % page_size, 0]


QUANTIZERS = {"reference": quantize_latent_fp8, "triton": quantize_via_kernel}


def tie_values() -> torch.Tensor:
    """float32 values on and around every e4m3 rounding decision, both signs, at scale 1:
    every finite e4m3 value, every midpoint (a tie), the float32 neighbours of each
    midpoint, the subnormal ties 2**-10 (to 0) and 3 * 2**-10 (to 2**-8), and values far
    below the smallest subnormal."""
    grid = E4M3_GRID.float()
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    tiny = torch.tensor([2.0**-10, 3 * 2.0**-10, 2.0**-11, 2.0**-30, 2.0**-126, 2.0**-149])
    pos = torch.cat([grid, mids, torch.nextafter(mids, up), torch.nextafter(mids, down), tiny])
    return torch.cat([pos, -pos])


def make_latent(kind: str, n: int, r: int, dr: int, dtype: torch.dtype, gen: torch.Generator):
    """(kv [n, r], k_pe [n, dr]) in `dtype` for one adversarial data kind."""
    tile = min(128, r)
    info = torch.finfo(dtype)
    kv = torch.randn(n, r, generator=gen)
    k_pe = torch.randn(n, dr, generator=gen)
    if kind == "scaled":  # token magnitudes spread over 8 decades
        kv = kv * 10.0 ** (torch.rand(n, 1, generator=gen) * 8 - 4)
    elif kind == "huge":  # up to the dtype's largest finite value
        kv = (kv.sign() * info.max * torch.rand(n, r, generator=gen)).to(dtype)
        kv[:, ::tile] = info.max
    elif kind == "tiny":  # around the smallest normal: subnormal inputs and floored scales
        kv = kv * info.tiny
        kv[:, 1::tile] = info.tiny * info.eps  # the smallest subnormal
    elif kind == "zeros":  # exact zeros, some negative
        kv = torch.where(kv > 0, 0.0, -0.0)
    elif kind == "outlier":  # one large value per tile, the rest are flushed towards 0
        kv = kv * 0.01
        pos = torch.randint(0, tile, (n, r // tile), generator=gen) + torch.arange(0, r, tile)
        kv.scatter_(1, pos, 1000.0 * torch.randn(n, r // tile, generator=gen).sign())
    elif kind == "ties":  # values at scale 1 (anchor 448 per tile) on every rounding decision
        values = tie_values()
        kv = values[torch.randint(0, values.numel(), (n, r), generator=gen)]
        kv[:, ::tile] = 448.0
        # k_pe on bfloat16 ties too: halfway between a value and its bfloat16 neighbour.
        base = k_pe.to(torch.bfloat16).float()
        k_pe = base + base.sign() * torch.exp2(torch.floor(torch.log2(base.abs())) - 8)
    elif kind == "bits":  # arbitrary bit patterns: NaN, inf, subnormals, -0.0
        ints = torch.iinfo(BITS[dtype])
        kv = torch.randint(ints.min, ints.max, (n, r), generator=gen, dtype=BITS[dtype]).view(dtype)
        k_pe = torch.randint(ints.min, ints.max, (n, dr), generator=gen, dtype=BITS[dtype]).view(dtype)
    elif kind != "randn":
        raise ValueError(kind)
    return kv.to(dtype), k_pe.to(dtype)


KINDS = ["randn", "scaled", "huge", "tiny", "zeros", "outlier", "ties", "bits"]


def assert_same_bytes(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = actual != expected
    if bad.any():
        idx = torch.nonzero(bad)
        first = tuple(idx[0].tolist())
        pytest.fail(
            f"{name}: {bad.sum().item()}/{bad.numel()} bytes differ, first at {first}: "
            f"{actual[first].item():#04x} vs {expected[first].item():#04x}"
        )


# ----- format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "r, dr, width",
    [
        pytest.param(512, 64, 656, id="deepseek-v3"),
        pytest.param(256, 32, 256 + 8 + 64, id="r256"),
        pytest.param(384, 64, 384 + 12 + 128, id="r384-3tiles"),
        pytest.param(128, 64, 128 + 4 + 128, id="r128"),
        pytest.param(64, 16, 64 + 4 + 32, id="r64-tile64"),
        pytest.param(12, 2, 12 + 4 + 4, id="r12-tile12"),
    ],
)
def test_bytes_per_token(r, dr, width):
    assert fp8_bytes_per_token(r, dr) == width


@pytest.mark.parametrize(
    "r, dr, match",
    [
        pytest.param(200, 64, "multiple of the FP8 scale tile 128", id="r200"),
        pytest.param(129, 64, "multiple of the FP8 scale tile 128", id="r129"),
        pytest.param(0, 64, "kv_lora_rank must be an int >= 1", id="r0"),
        pytest.param(512, 0, "rope_dim must be an int >= 1", id="dr0"),
        pytest.param(512.0, 64, "kv_lora_rank must be an int", id="r-float"),
        pytest.param(6, 2, "must be a multiple of 4", id="r6-scales-unaligned"),
        pytest.param(512, 3, "rope_dim must be even", id="dr3-rows-unaligned"),
    ],
)
def test_bytes_per_token_rejects(r, dr, match):
    with pytest.raises(ValueError, match=match):
        fp8_bytes_per_token(r, dr)


@pytest.mark.parametrize("impl", QUANTIZERS)
def test_byte_layout_hand_built_token(impl):
    """One DeepSeek-V3 token whose bytes are known by hand: codes at [0, 512), four
    little-endian float32 scales at [512, 528), 64 little-endian bfloat16 at [528, 656)."""
    kv = torch.zeros(1, 512)
    codes = [0] * 512
    # tile 0: amax 448 -> scale 1, values land on codes unchanged.
    for i, (x, code) in enumerate([(448.0, 0x7E), (-448.0, 0xFE), (1.0, 0x38), (-0.5, 0xB0), (2.0**-9, 0x01)]):
        kv[0, i], codes[i] = x, code
    # tile 1: amax 1 -> scale 2**-8: 1 -> 256 (0x78), -0.75 -> -192 (0xF4).
    kv[0, 128], codes[128] = 1.0, 0x78
    kv[0, 129], codes[129] = -0.75, 0xF4
    # tile 2: all zero -> scale 1, codes 0.
    # tile 3: amax 3000 -> scale 8: 3000 -> 375, nearest e4m3 384 (0x7C); -8 -> -1 (0xB8).
    kv[0, 384], codes[384] = 3000.0, 0x7C
    kv[0, 385], codes[385] = -8.0, 0xB8
    k_pe = torch.tensor([[(j - 32) * 0.25 for j in range(64)]])  # exact in bfloat16
    rope = b"".join(struct.pack("<f", v)[2:] for v in k_pe[0].tolist())  # bf16 = high half of fp32
    expected = bytes(codes) + struct.pack("<4f", 1.0, 2.0**-8, 1.0, 8.0) + rope
    packed = QUANTIZERS[impl](kv, k_pe)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 656)
    assert bytes(packed[0].tolist()) == expected


# ----- the quantization rule against oracles --------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", QUANTIZERS)
def test_quantization_matches_oracles(impl, kind, dtype):
    """Every scale is the exact power of two of the rule; every code is the nearest-even
    e4m3 of x / scale (saturated at 240 under the top scale 2**120); k_pe is the bfloat16
    rounding of the input; non-finite tiles are poisoned (scale NaN, codes 0x7F) and leave
    the other tiles alone."""
    r, dr, n = 512, 64, 6
    g = torch.Generator().manual_seed(10 * KINDS.index(kind) + list(DTYPES.values()).index(dtype))
    kv, k_pe = make_latent(kind, n, r, dr, dtype, g)
    codes, scales, rope = unpack(QUANTIZERS[impl](kv, k_pe), r, dr)

    x = kv.float().view(n, 4, 128)
    finite = torch.isfinite(x).all(-1)  # [n, 4]
    amax = torch.where(finite, x.abs().amax(-1), 0.0)
    expected_scales = torch.tensor([oracle_scale(a) for a in amax.flatten().tolist()]).view(n, 4)
    expected_scales = torch.where(finite, expected_scales, math.nan)
    assert torch.equal(scales.isnan(), ~finite), "NaN scales must mark exactly the non-finite tiles"
    assert torch.equal(scales[finite], expected_scales[finite]), "scales differ from the exact rule"

    y = torch.where(finite[..., None], x / expected_scales[..., None], 0.0)
    expected_codes = oracle_codes(y).view(n, 4, 128)
    # Saturation under the largest scale 2**120: code 256 would dequantize to inf.
    top = (expected_scales == 2.0**120)[..., None] & ((expected_codes & 0x7F) > 0x77)
    expected_codes = torch.where(top, (expected_codes & 0x80) | 0x77, expected_codes)
    expected_codes = torch.where(finite[..., None], expected_codes, FP8_NAN_CODE)
    assert_same_bytes("codes", codes.long().view(n, 4, 128), expected_codes)

    expected_rope = k_pe.to(torch.bfloat16)
    nan = expected_rope.isnan()
    assert torch.equal(rope.isnan(), nan)
    assert torch.equal(rope.view(torch.int16)[~nan], expected_rope.view(torch.int16)[~nan])


@pytest.mark.parametrize(
    "amax, scale",
    [
        pytest.param(448.0, 1.0, id="448"),
        pytest.param(float(torch.nextafter(torch.tensor(448.0), torch.tensor(1e9))), 2.0, id="448+ulp"),
        pytest.param(224.0, 0.5, id="224"),
        pytest.param(float(torch.nextafter(torch.tensor(224.0), torch.tensor(1e9))), 1.0, id="224+ulp"),
        pytest.param(448.0 * 2.0**-40, 2.0**-40, id="448x2^-40"),
        pytest.param(1.0, 2.0**-8, id="1"),
        pytest.param(float(torch.finfo(torch.float32).max), 2.0**120, id="fp32-max"),
        pytest.param(448.0 * 2.0**-117, 2.0**-117, id="floor-exact"),
        pytest.param(448.0 * 2.0**-116, 2.0**-116, id="above-floor"),
        pytest.param(1e-38, 2.0**-117, id="below-floor"),
        pytest.param(2.0**-149, 2.0**-117, id="subnormal"),
        pytest.param(0.0, 1.0, id="zero"),
        pytest.param(-0.0, 1.0, id="neg-zero"),
    ],
)
@pytest.mark.parametrize("impl", QUANTIZERS)
def test_scale_boundaries(impl, amax, scale):
    """Scales at the edges of the rule: exact 448 * 2**k, one float32 ulp above, the 2**-117
    floor, subnormal and zero amax. Also checks every code is within 448 and each value
    comes back to within half an e4m3 step."""
    kv = torch.zeros(1, 128)
    kv[0, 0] = amax
    kv[0, 1:] = torch.linspace(-1, 1, 127) * abs(amax)
    packed = QUANTIZERS[impl](kv, torch.zeros(1, 2))
    _, scales, _ = unpack(packed, 128, 2)
    assert scales.item() == scale == oracle_scale(abs(amax))
    value, _ = dequantize_latent_fp8(packed, 128, 2)
    assert torch.isfinite(value).all() and value.abs().max().item() <= 448 * scale
    assert math.copysign(1, value[0, 0].item()) == math.copysign(1, amax)


@pytest.mark.parametrize("impl", QUANTIZERS)
def test_top_scale_saturates_instead_of_overflowing(impl):
    """Under scale 2**120 values from 248 * 2**120 up round to code 256, i.e. 2**128 = inf in
    float32; they are stored as +-240 * 2**120 instead. Just below the tie, nearest rounding."""
    top = float(torch.finfo(torch.float32).max)
    tie = 248 * 2.0**120
    below = float(torch.nextafter(torch.tensor(tie), torch.tensor(0.0)))
    kv = torch.tensor([[top, -top, tie, -tie, below, 224 * 2.0**120] + [0.0] * 122])
    value, _ = dequantize_latent_fp8(QUANTIZERS[impl](kv, torch.zeros(1, 2)), 128, 2)
    assert value[0, :6].tolist() == [x * 2.0**120 for x in (240, -240, 240, -240, 240, 224)]


def half_step(y: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at |y|: 2**(max(floor(log2|y|), -6) - 4); the spacing is 2**-9
    in the subnormal range |y| < 2**-6 and 2**(e - 3) in binade [2**e, 2**(e + 1))."""
    binade = torch.floor(torch.log2(y.double().abs())).clamp_min(-6)
    return torch.exp2(binade - 4)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["randn", "scaled", "outlier", "ties", "tiny"])
@pytest.mark.parametrize("impl", QUANTIZERS)
def test_round_trip_within_half_step(impl, kind, dtype):
    """|dequantized - x| <= scale * half_step(x / scale): nearest rounding, never more.
    k_pe comes back exactly as its bfloat16 rounding; dequantized latents are float32."""
    r, dr, n = 256, 32, 8
    g = torch.Generator().manual_seed(7)
    kv, k_pe = make_latent(kind, n, r, dr, dtype, g)
    packed = QUANTIZERS[impl](kv, k_pe)
    value, rope = dequantize_latent_fp8(packed, r, dr)
    assert value.dtype == torch.float32 and rope.dtype == torch.bfloat16
    _, scales, _ = unpack(packed, r, dr)
    assert (scales < 2.0**120).all(), "saturation under the top scale is tested separately"
    scale = scales.double().repeat_interleave(128, dim=1)
    x = kv.double()
    bound = scale * half_step(x / scale)
    err = (value.double() - x).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    assert torch.equal(rope.view(torch.int16), k_pe.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("impl", QUANTIZERS)
def test_non_finite_tile_is_poisoned(impl, bad):
    """One non-finite value poisons its own tile (dequantizes to all NaN) and no other."""
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(2, 512, generator=g)
    k_pe = torch.randn(2, 64, generator=g)
    clean = QUANTIZERS[impl](kv, k_pe)
    kv[1, 300] = bad
    k_pe[1, 5] = math.nan
    packed = QUANTIZERS[impl](kv, k_pe)
    codes, scales, rope = unpack(packed, 512, 64)
    assert scales[1, 2].isnan() and (codes[1, 256:384] == FP8_NAN_CODE).all()
    value, _ = dequantize_latent_fp8(packed, 512, 64)
    assert value[1, 256:384].isnan().all() and not value[1, :256].isnan().any() and not value[1, 384:].isnan().any()
    unchanged = torch.ones(656, dtype=torch.bool)
    unchanged[256:384] = False  # codes of tile 2
    unchanged[512 + 8 : 512 + 12] = False  # scale of tile 2
    unchanged[528 + 10 : 528 + 12] = False  # k_pe[5]
    assert_same_bytes("token 0", packed[0], clean[0])
    assert_same_bytes("rest of token 1", packed[1, unchanged], clean[1, unchanged])
    assert rope[1, 5].isnan()


# ----- the kernel against the reference ---------------------------------------------------


def run_both(pages, slots, kv, k_pe):
    expected = pages.clone()
    rquant.write_latent_fp8(expected, slots, kv, k_pe)
    kquant.write_latent_fp8(pages, slots, kv, k_pe)
    return pages, expected


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_matches_reference_data(kind, dtype):
    """Whole pages bit-exact (untouched bytes included) on every data kind. k_pe NaNs from
    float16 / float32 inputs may differ in payload (torch itself writes 0x7FC0 or 0xFFFF
    depending on the code path), so those bytes are compared as NaN-ness."""
    r, dr, n, page_size, num_pages = 512, 64, 21, 16, 3
    g = torch.Generator().manual_seed(11)
    kv, k_pe = make_latent(kind, n, r, dr, dtype, g)
    pages = random_pages(num_pages, page_size, 656, g)
    slots = torch.randperm(num_pages * page_size, generator=g)[:n]
    actual, expected = run_both(pages, slots, kv, k_pe)
    page, row = slots // page_size, slots % page_size
    rows_a, rows_e = actual[page, row, 0], expected[page, row, 0]
    if dtype != torch.bfloat16 and k_pe.isnan().any():
        _, _, rope_a = unpack(rows_a, r, dr)
        _, _, rope_e = unpack(rows_e, r, dr)
        assert torch.equal(rope_a.isnan(), rope_e.isnan())
        nan_bytes = k_pe.isnan().repeat_interleave(2, dim=1)
        rows_a[:, 528:][nan_bytes] = rows_e[:, 528:][nan_bytes]
        actual[page, row, 0] = rows_a
    assert_same_bytes("pages", actual, expected)


@pytest.mark.parametrize(
    "r, dr, page_size, order, layout",
    [
        pytest.param(512, 64, 64, "shuffled", "contiguous", id="r512-dr64-page64-shuffled"),
        pytest.param(512, 64, 1, "reversed", "contiguous", id="r512-dr64-page1-reversed"),
        pytest.param(512, 64, 16, "sorted", "padded", id="r512-dr64-page16-padded-pages"),
        pytest.param(512, 64, 16, "shuffled", "strided", id="r512-dr64-page16-strided-inputs"),
        pytest.param(384, 64, 16, "shuffled", "fp8-pages", id="r384-dr64-page16-float8-pages"),
        pytest.param(128, 32, 3, "shuffled", "contiguous", id="r128-dr32-page3"),
        pytest.param(64, 16, 5, "shuffled", "contiguous", id="r64-dr16-page5-tile64"),
        pytest.param(48, 6, 7, "reversed", "padded", id="r48-dr6-page7-tile48"),
        pytest.param(12, 2, 4, "shuffled", "strided", id="r12-dr2-page4-small-tile"),
    ],
)
def test_kernel_matches_reference_shapes(r, dr, page_size, order, layout):
    """Shapes (non-power-of-two tiles, unaligned scale offsets), page sizes, slot orders and
    layouts: padded pages (page stride != page_size * width), strided kv / k_pe / slots,
    pages allocated as float8_e4m3fn the way FlashMLA does."""
    g = torch.Generator().manual_seed(r * 1000 + page_size)
    n = 2 * page_size + 3
    num_pages = -(-n // page_size) + 2
    kv, k_pe = make_latent("scaled", n, r, dr, torch.float32, g)
    k_pe = k_pe.to(torch.bfloat16)
    slots = torch.randperm(num_pages * page_size, generator=g)[:n]
    slots = {"shuffled": slots, "sorted": slots.sort().values, "reversed": slots.sort(descending=True).values}[order]
    width = fp8_bytes_per_token(r, dr)
    pages = random_pages(num_pages, page_size, width, g, padded=layout == "padded")
    if layout == "strided":
        kv = torch.cat([kv, kv], dim=1)[:, ::2]
        k_pe = k_pe.t().contiguous().t()
        slots = torch.stack([slots, slots], dim=1).flatten()[::2]
    if layout == "fp8-pages":
        pages = pages.view(torch.float8_e4m3fn)
    actual, expected = run_both(pages, slots, kv, k_pe)
    assert_same_bytes("pages", actual.view(torch.uint8), expected.view(torch.uint8))


def test_kernel_skips_out_of_range_slots(monkeypatch):
    """On CUDA slot values are not checked on the host (no sync); the kernel itself must then
    drop out-of-range slots rather than write outside the pages. Bypass the host check to see it."""
    g = torch.Generator().manual_seed(2)
    pages = random_pages(2, 4, 656, g)
    kv, k_pe = make_latent("randn", 4, 512, 64, torch.float32, g)
    slots = torch.tensor([5, -1, 8, 2])
    expected = pages.clone()
    rquant.write_latent_fp8(expected, slots[[0, 3]], kv[[0, 3]], k_pe[[0, 3]])
    monkeypatch.setattr(kquant, "check_write_args", lambda pages, *args, fp8: (Fp8Format(512, 64), pages))
    kquant.write_latent_fp8(pages, slots, kv, k_pe)
    assert_same_bytes("pages", pages, expected)


@pytest.mark.parametrize("writer", WRITERS)
def test_empty_write_is_a_no_op(writer):
    g = torch.Generator().manual_seed(0)
    pages = random_pages(2, 4, 656, g)
    before = pages.clone()
    out = WRITERS[writer](pages, torch.empty(0, dtype=torch.int64), torch.empty(0, 512), torch.empty(0, 64))
    assert out is pages and torch.equal(pages, before)


# ----- dequantized cache for the decode reference -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dequantize_cache(dtype, nan_empty):
    """dequantize_cache is [num_pages, page_size, 1, r + dr]: every token's dequantized latent
    then k_pe, exact in bfloat16 as in float32 (codes have 4 significant bits, scales are
    powers of two >= 2**-117)."""
    r, dr, page_size, num_pages = 512, 64, 4, 3
    g = torch.Generator().manual_seed(5)
    kv, k_pe = make_latent("scaled", num_pages * page_size, r, dr, torch.float32, g)
    pages = random_pages(num_pages, page_size, fp8_bytes_per_token(r, dr), g)
    rquant.write_latent_fp8(pages, torch.arange(num_pages * page_size), kv, k_pe)
    cache = dequantize_cache(pages, r, dr, dtype)
    assert cache.shape == (num_pages, page_size, 1, r + dr) and cache.dtype == dtype
    value, rope = dequantize_latent_fp8(pages, r, dr)
    assert value.shape == (num_pages, page_size, 1, r) and rope.shape == (num_pages, page_size, 1, dr)
    assert torch.equal(cache[..., :r].float(), value)
    assert torch.equal(cache[..., r:].float(), rope.float())
    flat = cache.view(-1, r + dr)
    assert torch.equal(flat[:, :r].float(), dequantize_latent_fp8(quantize_latent_fp8(kv, k_pe), r, dr)[0])


# ----- bad inputs -------------------------------------------------------------------------


def good_write_args():
    return {
        "pages": torch.zeros(2, 4, 1, 656, dtype=torch.uint8),
        "slots": torch.tensor([0, 5], dtype=torch.int64),
        "latent": torch.randn(2, 512),
        "k_pe": torch.randn(2, 64),
    }


BAD_WRITES = [
    pytest.param({"latent": torch.randn(2, 200)}, ValueError, "multiple of the FP8 scale tile", id="r200"),
    pytest.param({"pages": torch.zeros(2, 4, 1, 655, dtype=torch.uint8)}, ValueError, "656", id="byte-width"),
    pytest.param({"pages": torch.zeros(2, 4, 1, 1152, dtype=torch.uint8)}, ValueError, "656", id="bf16-width"),
    pytest.param({"pages": torch.zeros(2, 4, 2, 656, dtype=torch.uint8)}, ValueError, "pages must be", id="h_kv2"),
    pytest.param({"pages": torch.zeros(8, 1, 656, dtype=torch.uint8)}, ValueError, "pages must be", id="pages-3d"),
    pytest.param({"pages": torch.zeros(2, 4, 1, 164, dtype=torch.float32)}, TypeError, "pages", id="pages-fp32"),
    pytest.param({"slots": torch.tensor([0, 5], dtype=torch.int32)}, TypeError, "int64", id="slots-int32"),
    pytest.param({"slots": torch.tensor([0, 8])}, ValueError, "slot 8 is outside", id="slot-past-end"),
    pytest.param({"slots": torch.tensor([-1, 3])}, ValueError, "slot -1 is outside", id="slot-negative"),
    pytest.param({"slots": torch.tensor([3, 3])}, ValueError, "more than once", id="slot-duplicate"),
    pytest.param({"slots": torch.tensor([0, 1, 2])}, ValueError, r"must be \[n=3", id="slots-length"),
    pytest.param({"latent": torch.randn(2, 512, dtype=torch.float64)}, TypeError, "latent must be", id="kv-fp64"),
    pytest.param({"latent": torch.ones(2, 512, dtype=torch.int32)}, TypeError, "latent must be", id="kv-int"),
    pytest.param({"k_pe": torch.randn(2, 64).to(torch.float8_e4m3fn)}, TypeError, "k_pe must be", id="k_pe-fp8"),
    pytest.param({"k_pe": torch.randn(3, 64)}, ValueError, r"k_pe must be \[n=2", id="k_pe-rows"),
    pytest.param({"latent": torch.randn(2, 1, 512)}, ValueError, r"latent must be \[n=2", id="kv-3d"),
]


@pytest.mark.parametrize("change, error, match", BAD_WRITES)
@pytest.mark.parametrize("writer", WRITERS)
def test_write_rejects(writer, change, error, match):
    args = good_write_args()
    if "latent" in change and change["latent"].dim() == 3:
        args["k_pe"] = args["k_pe"][:, None]
    args.update(change)
    with pytest.raises(error, match=match):
        WRITERS[writer](**args)


def test_quantize_rejects():
    with pytest.raises(ValueError, match="multiple of the FP8 scale tile"):
        quantize_latent_fp8(torch.randn(2, 320), torch.randn(2, 64))
    with pytest.raises(ValueError, match="disagree"):
        quantize_latent_fp8(torch.randn(2, 512), torch.randn(3, 64))
    with pytest.raises(TypeError, match="kv must be"):
        quantize_latent_fp8(torch.randn(2, 512, dtype=torch.float64), torch.randn(2, 64))


def test_dequantize_rejects():
    packed = torch.zeros(3, 656, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must end in 1184 bytes"):
        dequantize_latent_fp8(packed, 1024, 64)
    with pytest.raises(ValueError, match="multiple of the FP8 scale tile"):
        dequantize_latent_fp8(packed, 500, 64)
    with pytest.raises(TypeError, match="uint8 or float8_e4m3fn"):
        dequantize_latent_fp8(packed.float(), 512, 64)
    with pytest.raises(ValueError, match="pages must be"):
        dequantize_cache(packed, 512, 64)
    with pytest.raises(TypeError, match="floating"):
        dequantize_cache(packed.view(3, 1, 1, 656), 512, 64, dtype=torch.int32)
