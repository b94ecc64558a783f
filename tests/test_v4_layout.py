"""DeepSeek-V4 foundations: the MODEL1 FP8 page format, the MXFP4 indexer key, V4Config and the
cache layout's accounting.

Oracles share no code with the formats: e4m3 / e2m1 grids built from their definitions with a
nearest-even search, scales from exact rational arithmetic (`fractions`), byte positions from
hand-built pages, and the memory numbers from the formula written out term by term.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import pytest
import torch
from transformers import DeepseekV4Config

from mla.config import MLAConfig
from mla.formats import E2M1_VALUES, Model1Format, Mxfp4EntryFormat, Mxfp4KeyFormat, page_bytes
from mla.v4 import CSA, HCA, LAYER_TYPES, SLIDING, V4Config
from mla.v4_cache import sequence_bytes_per_token

CONTEXTS = {"128k": 2**17, "1m": 2**20}
PRESETS = {"flash": V4Config.deepseek_v4_flash, "pro": V4Config.deepseek_v4_pro}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def e4m3_grid() -> torch.Tensor:
    """Non-negative finite float8_e4m3fn values of codes 0..126, from the definition (bias 7,
    3 mantissa bits, subnormals below 2 ** -6)."""
    values = [(c & 7) / 8 * 2.0**-6 if c >> 3 == 0 else (1 + (c & 7) / 8) * 2.0 ** ((c >> 3) - 7) for c in range(127)]
    return torch.tensor(values, dtype=torch.float64)


def nearest_even(magnitude: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Code of the grid value nearest each magnitude (float64), ties to the even code; above the
    grid saturates at the last code."""
    upper = torch.searchsorted(grid, magnitude).clamp(max=len(grid) - 1)
    lower = (upper - 1).clamp(min=0)
    d_low, d_up = magnitude - grid[lower], grid[upper] - magnitude
    pick_up = (d_up < d_low) | ((d_up == d_low) & (upper % 2 == 0))
    return torch.where(pick_up, upper, lower)


def exact_scale_exponent(amax: float, divisor: int, floor: Fraction) -> int:
    """Smallest e with 2 ** e >= max(amax / divisor, floor), in rational arithmetic."""
    target = max(Fraction(amax) / divisor, floor)
    e = math.floor(math.log2(target)) - 1
    while Fraction(2) ** e < target:
        e += 1
    return e


def tile_values(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, 512] with each 64-channel tile at its own magnitude (2 ** -20 .. 2 ** 20; float16:
    2 ** -10 .. 2 ** 10, its range), a few exact zeros and a zero tile: scales, subnormal codes
    and the 1e-4 floor all get exercised."""
    g = torch.Generator().manual_seed(seed)
    reach = 10 if dtype == torch.float16 else 20
    x = torch.randn(n, 8, 64, generator=g, dtype=torch.float64)
    x = x * 2.0 ** torch.randint(-reach, reach + 1, (n, 8, 1), generator=g)
    x[:, :, ::17] = 0
    x[0, 3] = 0
    return x.reshape(n, 512).to(dtype)


# --- MODEL1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "page_size, expected",
    [
        pytest.param(1, 1152, id="page1-padded-to-2x576"),
        pytest.param(64, 37440, id="page64-65x576"),
        pytest.param(72, 72 * 584, id="page72-no-padding"),
        pytest.param(3, 2304, id="page3-4x576"),
    ],
)
def test_model1_page_bytes(page_size, expected):
    fmt = Model1Format()
    assert fmt.bytes_per_token == 584 == 448 + 2 * 64 + 7 + 1
    assert fmt.page_bytes(page_size) == expected == page_bytes(fmt, page_size)
    assert expected % 576 == 0 and expected >= page_size * 584 > expected - 576
    pages = fmt.allocate(5, page_size, "meta")
    assert pages.dtype == torch.uint8 and tuple(pages.shape) == (5, expected)


def test_model1_bytes_of_a_hand_built_token():
    """Token at slot 4 of 3-token pages is row 1 of page 1: its 576 data bytes at page offset
    576, its 8 scale bytes at 3 * 576 + 8, everything else left exactly as it was."""
    fmt, page_size = Model1Format(), 3
    pages = torch.full((3, fmt.page_bytes(page_size)), 0xAB, dtype=torch.uint8)
    before = pages.clone()
    x = torch.zeros(1, 512)
    for k in range(7):  # tile k holds +-2 ** (k - 3): amax / 448 = 2 ** (k - 3) / 448 -> scale 2 ** (k - 11)
        x[0, 64 * k : 64 * (k + 1)] = 2.0 ** (k - 3)
        x[0, 64 * k + 1] = -(2.0 ** (k - 3))
        x[0, 64 * k + 2] = 2.0 ** (k - 3) * 1.125  # code 288: amax grows to 1.125 * 2 ** (k - 3), same scale
    x[0, 448:] = torch.arange(64) * 0.5 - 16  # exact in bfloat16
    fmt.write(pages, page_size, torch.tensor([4]), x)

    base = fmt.page_bytes(page_size)
    data = pages[1, 576 : 576 + 576]
    scales = pages[1, 3 * 576 + 8 : 3 * 576 + 16]
    codes = [0x78] * 64  # 256 = 2 ** 8 -> exponent 15, mantissa 0
    codes[1], codes[2] = 0xF8, 0x79  # -256; 288 = 1.125 * 2 ** 8
    assert data[:448].tolist() == codes * 7
    rope_bits = [int(v) for v in (torch.arange(64) * 0.5 - 16).to(torch.bfloat16).view(torch.int16).tolist()]
    assert data[448:].tolist() == list(struct.pack("<64h", *rope_bits))
    assert scales.tolist() == [k - 11 + 127 for k in range(7)] + [0]  # UE8M0 exponents, pad byte 0

    changed = (pages != before).nonzero()
    offsets = (changed[:, 0] * base + changed[:, 1]).tolist()
    assert set(offsets) <= set(range(base + 576, base + 1152)) | set(range(base + 1736, base + 1744))
    assert pages[1, 3 * 584 :].eq(0xAB).all(), "page padding must not be written"
    assert torch.equal(fmt.read(pages, page_size, torch.tensor([4])), x)


@pytest.mark.parametrize("dtype", [pytest.param(v, id=k) for k, v in DTYPES.items()])
@pytest.mark.parametrize("n", [1, 5, 67])
def test_model1_quantization_matches_the_rule(n, dtype):
    """Scales are 2 ** ceil(log2(max(amax / 448, 1e-4))) (exact rationals), codes the nearest
    e4m3 value to x / scale with ties to even, rope the bfloat16 rounding; reading gives code *
    scale exactly."""
    fmt = Model1Format()
    x = tile_values(n, seed=n, dtype=dtype)
    data, scales = fmt.pack(x)
    assert data.shape == (n, 576) and scales.shape == (n, 8) and data.dtype == scales.dtype == torch.uint8
    assert scales[:, 7].eq(0).all()

    nope = x[:, :448].double().reshape(n, 7, 64)
    exponents = torch.tensor(
        [[exact_scale_exponent(float(t.abs().max()), 448, Fraction(1e-4)) for t in row] for row in nope]
    )
    assert torch.equal(scales[:, :7].long() - 127, exponents)
    scale = 2.0 ** exponents.double()
    q = nope / scale[..., None]
    expected_codes = nearest_even(q.abs(), e4m3_grid()) | (q < 0).long() * 0x80
    assert torch.equal(data[:, :448].long(), expected_codes.reshape(n, 448))
    assert torch.equal(data[:, 448:].contiguous().view(torch.bfloat16), x[:, 448:].to(torch.bfloat16))

    values = fmt.unpack(data, scales)
    grid = e4m3_grid()
    expected = (grid[expected_codes & 0x7F] * torch.where(expected_codes >= 0x80, -1.0, 1.0)) * scale[..., None]
    assert torch.equal(values[:, :448].double(), expected.reshape(n, 448))
    # and the error is e4m3 rounding: half a step of the grid at |x / scale|
    err = (values[:, :448].double() - x[:, :448].double()).reshape(n, 7, 64).abs()
    binade = torch.floor(torch.log2(q.abs().clamp_min(2.0**-6)))  # subnormals share the lowest step
    half_step = 2.0 ** (binade - 4)
    assert (err <= half_step * scale[..., None]).all()


def test_model1_scale_edges():
    """amax exactly 448 * 2 ** e uses scale 2 ** e (codes reach 448); one step above, 2 ** (e + 1);
    a zero or tiny tile gets FlashMLA's floor 2 ** -13."""
    fmt = Model1Format()
    amax = [448.0, 448.0 * 2**-10, 448.0 * (1 + 2**-7), 0.0, 1e-3, 2.0**100]
    x = torch.zeros(1, 512)
    for k, a in enumerate(amax):
        x[0, 64 * k] = a
    x[0, 64 * 6] = -3.0
    _, scales = fmt.pack(x)
    assert (scales[0, :7].long() - 127).tolist() == [0, -10, 1, -13, -13, 100 - 8, -7]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "neg-inf"])
def test_model1_non_finite_tile_reads_nan(bad):
    fmt = Model1Format()
    x = tile_values(2, seed=3, dtype=torch.float32)
    x[1, 64 * 2 + 5] = bad
    data, scales = fmt.pack(x)
    assert scales[1, 2] == 0xFF
    values = fmt.unpack(data, scales)
    assert values[1, 128:192].isnan().all()
    assert not values[1, :128].isnan().any() and not values[1, 192:].isnan().any()
    assert torch.equal(values[0], fmt.unpack(*fmt.pack(x[:1]))[0])


@pytest.mark.parametrize("page_size", [1, 3, 64])
def test_model1_write_read_at_shuffled_slots(page_size):
    fmt = Model1Format()
    num_pages = 5
    g = torch.Generator().manual_seed(page_size)
    slots = torch.randperm(num_pages * page_size, generator=g)[: min(11, num_pages * page_size)]
    x = tile_values(len(slots), seed=7, dtype=torch.bfloat16)
    pages = fmt.allocate(num_pages, page_size, "cpu")
    fmt.write(pages, page_size, slots, x)
    assert torch.equal(fmt.read(pages, page_size, slots, torch.bfloat16), fmt.unpack(*fmt.pack(x), torch.bfloat16))
    untouched = sorted(set(range(num_pages * page_size)) - set(slots.tolist()))
    if untouched:
        assert fmt.read(pages, page_size, torch.tensor(untouched)).eq(0).all()


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(
            lambda f, p: f.write(p, 4, torch.tensor([20]), torch.zeros(1, 512)),
            r"slots must lie in \[0, 20\)",
            id="slot-past-end",
        ),
        pytest.param(lambda f, p: f.read(p, 4, torch.tensor([-1])), r"slots must lie", id="negative-slot"),
        pytest.param(
            lambda f, p: f.read(p, 8, torch.tensor([0])),
            r"pages must be uint8 \[num_pages, 5184\]",
            id="wrong-page-size",
        ),
        pytest.param(
            lambda f, p: f.write(p, 4, torch.tensor([0, 1]), torch.zeros(1, 512)),
            r"1 rows.*slots \[2\]",
            id="row-count",
        ),
        pytest.param(
            lambda f, p: f.write(p, 4, torch.tensor([3, 3]), torch.zeros(2, 512)),
            r"must be distinct",
            id="repeated-slot",
        ),
        pytest.param(lambda f, p: f.pack(torch.zeros(2, 576)), r"values must be \[n, 512\]", id="width-576"),
    ],
)
def test_model1_rejects_bad_arguments(call, match):
    fmt = Model1Format()
    with pytest.raises(ValueError, match=match):
        call(fmt, fmt.allocate(5, 4, "cpu"))


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(
            lambda f, p: f.read(p, 4, torch.tensor([0.0])), r"slots must be a 1-D int32 or int64", id="float-slots"
        ),
        pytest.param(
            lambda f, p: f.write(p, 4, torch.tensor([0]), torch.zeros(1, 512, dtype=torch.float64)),
            r"values must be bfloat16, float16 or float32",
            id="float64-values",
        ),
    ],
)
def test_model1_rejects_bad_types(call, match):
    fmt = Model1Format()
    with pytest.raises(TypeError, match=match):
        call(fmt, fmt.allocate(1, 4, "cpu"))


# --- MXFP4 indexer keys ---------------------------------------------------------------------


@pytest.mark.parametrize("dim, expected", [(128, 68), (64, 34), (32, 17)])
def test_mxfp4_row_bytes(dim, expected):
    fmt = Mxfp4KeyFormat(dim)
    assert fmt.bytes_per_token == expected == dim // 2 + dim // 32
    assert fmt.allocate(2, 3, "meta").shape == (2, 3, expected)


@pytest.mark.parametrize("dim", [0, 48, 100])
def test_mxfp4_rejects_dims_off_the_block(dim):
    with pytest.raises(ValueError, match="index_head_dim"):
        Mxfp4KeyFormat(dim)


def test_mxfp4_grid_values_survive_exactly():
    """Every signed e2m1 value times a block scale 2 ** e comes back exactly when the block's
    amax is 6 * 2 ** e (so the scale is 2 ** e)."""
    fmt = Mxfp4KeyFormat(128)
    grid = [s * v for v in E2M1_VALUES for s in (1, -1)]  # 16 values
    block = torch.tensor(grid * 2, dtype=torch.float32)  # 32
    exps = [-126, -3, 0, 40]
    keys = torch.cat([block * 2.0**e for e in exps]).reshape(1, 128)
    rows = fmt.pack(keys)
    assert rows[0, 64:].tolist() == [e + 127 for e in exps]
    assert torch.equal(fmt.unpack(rows), keys)


def test_mxfp4_nibble_order_and_ties_to_even():
    """Channel 2i in the low nibble; midpoints round to the even code (0.25 -> 0, 0.75 -> 1,
    1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), sign in bit 3."""
    fmt = Mxfp4KeyFormat(32)
    x = torch.zeros(32)
    x[:10] = torch.tensor([0.5, 6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0])
    row = fmt.pack(x)
    assert row[0] == 0x71  # 0.5 (code 1) low, 6 (code 7) high
    assert row[16] == 127  # amax 6 -> scale 1
    assert fmt.unpack(row)[:10].tolist() == [0.5, 6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0]


@pytest.mark.parametrize("dtype", [pytest.param(v, id=k) for k, v in DTYPES.items()])
def test_mxfp4_round_trip_matches_deepseeks_rule(dtype):
    """Scale 2 ** ceil(log2(max(amax, 6 * 2 ** -126) / 6)) per 32 (exact rationals); values the
    nearest e2m1 of x / scale, ties to even."""
    fmt = Mxfp4KeyFormat(128)
    g = torch.Generator().manual_seed(11)
    reach = 10 if dtype == torch.float16 else 30
    magnitude = 2.0 ** torch.randint(-reach, reach, (9, 4, 1), generator=g)
    keys = torch.randn(9, 4, 32, generator=g, dtype=torch.float64) * magnitude
    keys = keys.reshape(9, 128).to(dtype)
    rows = fmt.pack(keys)
    blocks = keys.double().reshape(9, 4, 32)
    exponents = torch.tensor(
        [[exact_scale_exponent(float(b.abs().max()), 6, Fraction(6, 2**126) / 6) for b in row] for row in blocks]
    )
    assert torch.equal(rows[:, 64:].long() - 127, exponents)
    scale = 2.0 ** exponents.double()[..., None]
    q = blocks / scale
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    expected = grid[nearest_even(q.abs(), grid)] * torch.where(q < 0, -1.0, 1.0) * scale
    assert torch.equal(fmt.unpack(rows).double().reshape(9, 4, 32), expected)


def test_mxfp4_non_finite_block_reads_nan():
    fmt = Mxfp4KeyFormat(64)
    keys = torch.ones(64)
    keys[40] = float("inf")
    rows = fmt.pack(keys)
    assert rows[33] == 0xFF
    out = fmt.unpack(rows)
    assert out[32:].isnan().all() and out[:32].eq(1).all()


def test_mxfp4_entry_bytes_of_a_hand_built_token():
    """[224 B e2m1 | 14 B UE8M0 | 2 pad | 128 B bfloat16 rope]: the unroped part is exactly the
    448-channel key row, the rope part the bfloat16 bytes."""
    fmt = Mxfp4EntryFormat()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 512, generator=g) * 2.0 ** torch.randint(-8, 8, (3, 1), generator=g)
    rows = fmt.pack(x)
    assert rows.shape == (3, 368) == (3, fmt.bytes_per_token)
    assert torch.equal(rows[:, :238], Mxfp4KeyFormat(448).pack(x[:, :448]))
    assert rows[:, 238:240].eq(0).all()
    assert torch.equal(rows[:, 240:].contiguous().view(torch.bfloat16), x[:, 448:].to(torch.bfloat16))
    expected = torch.cat([Mxfp4KeyFormat(448).unpack(rows[:, :238]), x[:, 448:].to(torch.bfloat16).float()], dim=1)
    assert torch.equal(fmt.unpack(rows), expected)


@pytest.mark.parametrize("page_size", [1, 3, 64])
def test_mxfp4_entry_write_read_at_shuffled_slots(page_size):
    fmt = Mxfp4EntryFormat()
    assert page_bytes(fmt, page_size) == 368 * page_size
    g = torch.Generator().manual_seed(page_size)
    slots = torch.randperm(4 * page_size, generator=g)[: min(9, 4 * page_size)]
    x = tile_values(len(slots), seed=1, dtype=torch.bfloat16)
    pages = fmt.allocate(4, page_size, "cpu")
    fmt.write(pages, page_size, slots, x)
    assert torch.equal(fmt.read(pages, page_size, slots), fmt.unpack(fmt.pack(x)))
    assert pages.view(-1, 368).count_nonzero(dim=1).nonzero().flatten().sort().values.tolist() == sorted(slots.tolist())


def test_mxfp4_entry_rejects_pages_of_another_page_size():
    fmt = Mxfp4EntryFormat()
    with pytest.raises(ValueError, match=r"pages must be uint8 \[num_pages, 8, 368\]"):
        fmt.read(fmt.allocate(2, 4, "cpu"), 8, torch.tensor([0]))


# --- V4Config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, counts, heads, topk",
    [
        pytest.param("flash", {SLIDING: 2, CSA: 21, HCA: 20}, 64, 512, id="flash-2-21-20"),
        pytest.param("pro", {SLIDING: 0, CSA: 30, HCA: 31}, 128, 1024, id="pro-0-30-31"),
    ],
)
def test_presets_follow_deepseeks_configs(preset, counts, heads, topk):
    config = PRESETS[preset]()
    assert {kind: len(config.layers_of(kind)) for kind in LAYER_TYPES} == counts
    assert config.num_hidden_layers == sum(counts.values())
    assert (config.num_heads, config.index_topk, config.index_n_heads, config.index_head_dim) == (heads, topk, 64, 128)
    assert (config.head_dim, config.rope_dim, config.sliding_window) == (512, 64, 128)
    assert config.compress_rates == {CSA: 4, HCA: 128}
    assert config.layer_types[2] == CSA  # DeepSeek's compress_ratios[2] == 4 in both
    assert [config.compress_rate(i) for i in range(4)] == ([0, 0, 4, 128] if preset == "flash" else [128, 128, 4, 128])


def test_pro_from_deepseeks_compress_ratios_through_transformers():
    """transformers folds a checkpoint's legacy compress_ratios (with the MTP layer's trailing 0)
    into layer_types; from_hf of that equals the preset."""
    ratios = [128] + [128, 4] * 30 + [0]
    hf = DeepseekV4Config(
        num_hidden_layers=61, compress_ratios=ratios, num_attention_heads=128, index_topk=1024, hidden_size=7168,
        q_lora_rank=1536, o_groups=16,
        rope_parameters={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536},
    )  # fmt: skip
    assert V4Config.from_hf(hf) == V4Config.deepseek_v4_pro()


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_from_hf_round_trip_of_presets(preset):
    config = PRESETS[preset]()
    assert V4Config.from_hf(DeepseekV4Config(**config.hf_kwargs())) == config


def test_from_hf_tiny_config():
    hf = DeepseekV4Config(
        num_hidden_layers=4,
        layer_types=[SLIDING, CSA, HCA, CSA],
        compress_rates={CSA: 2, HCA: 8},
        head_dim=64,
        partial_rotary_factor=0.25,
        num_attention_heads=2,
        sliding_window=8,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=4,
    )
    config = V4Config.from_hf(hf)
    assert config == V4Config(
        num_hidden_layers=4,
        layer_types=(SLIDING, CSA, HCA, CSA),
        compress_rates={CSA: 2, HCA: 8},
        head_dim=64,
        rope_dim=16,
        num_heads=2,
        sliding_window=8,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=4,
    )
    again = DeepseekV4Config(**config.hf_kwargs())
    assert (again.layer_types, again.compress_rates, again.qk_rope_head_dim) == (hf.layer_types, hf.compress_rates, 16)
    assert V4Config.from_hf(again) == config


def test_from_hf_rejects_other_models():
    with pytest.raises(ValueError, match="DeepseekV4Config"):
        V4Config.from_hf(MLAConfig())


def _config(**changes):
    fields = dict(num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA))
    return V4Config(**{**fields, **changes})


@pytest.mark.parametrize(
    "changes, match",
    [
        pytest.param(
            dict(layer_types=(SLIDING, "full_attention", HCA)),
            r"unknown entries \['full_attention'\]",
            id="unknown-layer-type",
        ),
        pytest.param(dict(layer_types=(SLIDING, CSA)), r"2 entries for num_hidden_layers=3", id="schedule-too-short"),
        pytest.param(dict(layer_types="sliding_attention"), r"layer_types must be a sequence", id="layer-types-string"),
        pytest.param(
            dict(compress_rates={CSA: 1, HCA: 128}),
            r"compress_rates\['compressed_sparse_attention'\] must be an int >= 2",
            id="csa-rate-1",
        ),
        pytest.param(
            dict(compress_rates={CSA: 4, HCA: 0}), r"compress_rates\['heavily_compressed_attention'\]", id="hca-rate-0"
        ),
        pytest.param(
            dict(compress_rates={CSA: 4}), r"no rate for 'heavily_compressed_attention'", id="hca-rate-missing"
        ),
        pytest.param(
            dict(compress_rates={CSA: 4, HCA: 128, SLIDING: 2}),
            r"compress_rates has keys \['sliding_attention'\]",
            id="sliding-rate",
        ),
        pytest.param(dict(sliding_window=0), r"sliding_window must be an int >= 1, got 0", id="window-0"),
        pytest.param(dict(num_hidden_layers=True), r"num_hidden_layers must be an int", id="layers-bool"),
        pytest.param(dict(rope_dim=63), r"rope_dim=63 must be even", id="rope-odd"),
        pytest.param(dict(rope_dim=512), r"rope_dim=512 must be even and below head_dim=512", id="rope-whole-head"),
        pytest.param(
            dict(index_head_dim=32), r"index_head_dim=32 must hold the rope_dim=64", id="index-dim-below-rope"
        ),
        pytest.param(dict(index_topk=0), r"index_topk must be an int >= 1", id="topk-0"),
    ],
)
def test_config_rejects(changes, match):
    with pytest.raises(ValueError, match=match):
        _config(**changes)


def test_config_from_compress_ratios_rejects_three_rates():
    with pytest.raises(ValueError, match="at most one other rate"):
        V4Config.from_compress_ratios([0, 4, 8, 16])


# --- layout and accounting -----------------------------------------------------------------


def test_v32_baseline_is_61_layers_of_788_bytes():
    v32 = MLAConfig.deepseek_v32()
    assert v32.num_hidden_layers * v32.kv_bytes_per_token("fp8") == 61 * 788 == 48068


def expected_fp8_bytes(counts: dict, context: int, page_size: int = 64) -> float:
    """One sequence of a compact FP8 V4Cache after a prefill of context - 1 tokens and one decode
    step, written out: the token pages from the page of token context - 1 - 127 on (each token row:
    a 585 B share of a 64-row MODEL1 page per layer, bf16 raw rows: CSA 2 x 2 x 512 kv / gate and
    2 x 2 x 128 indexer ones, HCA 2 x 512); whole entry pages of 64 rows (MODEL1 585 B per entry,
    MXFP4 68 B keys)."""
    first = (context - 1 - 127) // page_size * page_size
    token_pages = -(-context // page_size) - first // page_size
    row = sum(counts.values()) * 37440 / 64 + counts[CSA] * (2 * 1024 + 2 * 256) * 2 + counts[HCA] * 2 * 512 * 2
    csa_pages, hca_pages = -(-(context // 4) // page_size), -(-(context // 128) // page_size)
    entries = counts[CSA] * csa_pages * page_size * (585 + 68) + counts[HCA] * hca_pages * 37440
    return (token_pages * page_size * row + entries) / context


@pytest.mark.parametrize("context", [pytest.param(v, id=k) for k, v in CONTEXTS.items()] + [pytest.param(1000, id="1000")])
@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_sequence_bytes_is_the_formula(preset, context):
    """The memory report's V4 figures come from a cache built on the meta device; they equal the
    arithmetic of what it holds."""
    config = PRESETS[preset]()
    counts = {kind: len(config.layers_of(kind)) for kind in LAYER_TYPES}
    assert sequence_bytes_per_token(config, context, "fp8") == pytest.approx(expected_fp8_bytes(counts, context), rel=1e-12)


@pytest.mark.parametrize("preset, low, high", [("pro", 0.1054, 0.1055), ("flash", 0.0736, 0.0737)])
def test_fp8_ratio_vs_v32_at_1m(preset, low, high):
    """DeepSeek: about 10% (Pro) and 7% (Flash) of V3.2's 61 x 788 B at 1M tokens; ours, with
    the raw rows of exact rollback: 10.55% and 7.37%."""
    assert low < sequence_bytes_per_token(PRESETS[preset](), 2**20, "fp8") / 48068 < high
