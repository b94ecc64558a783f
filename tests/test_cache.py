"""mla.LatentCache bookkeeping and errors, and the write kernel against its reference.

A cache write is a pure copy, so kernel and reference must agree bit for bit (random bit
patterns, NaN payloads included) and read-back must equal what was written exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from mla.kernels import cache as kcache
from mla.reference import cache as rcache
from mla.reference import flash_mla_with_kvcache

import mla.cache
import mla.ops
from mla.cache import CacheFullError, LatentCache

from .utils import assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
WRITERS = {"triton": kcache.write_latent, "reference": rcache.write_latent}


def random_bits(shape, dtype, gen) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs, infs, subnormals, -0.0 included) viewed as `dtype`."""
    info = torch.iinfo(BITS[dtype])
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=BITS[dtype]).view(dtype)


def assert_same_bits(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert_close(name, actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype]), atol=0)


def pages_for(length: int, page_size: int) -> int:
    return -(-length // page_size)


def write_inputs(num_pages, page_size, r, dr, n, dtype, strided, seed):
    """Pages full of random bits and n rows for n distinct shuffled slots. `strided` gives
    every tensor non-unit or transposed strides: pages skip a row per page and every other
    channel of a wider buffer, latent skips every other column, k_pe is a transpose, slots
    a stride-2 slice."""
    g = torch.Generator().manual_seed(seed)
    d = r + dr
    slots = torch.randperm(num_pages * page_size, generator=g)[:n]
    if strided:
        pages = random_bits((num_pages, page_size + 1, 1, 2 * d + 3), dtype, g)[:, 1:, :, 3::2]
        latent = random_bits((n, 2 * r), dtype, g)[:, ::2]
        k_pe = random_bits((dr, n), dtype, g).t()
        slots = torch.stack([slots, torch.zeros_like(slots)], dim=1).flatten()[::2]
    else:
        pages = random_bits((num_pages, page_size, 1, d), dtype, g)
        latent = random_bits((n, r), dtype, g)
        k_pe = random_bits((n, dr), dtype, g)
    return [t.to(DEVICE) for t in (pages, slots, latent, k_pe)]


WRITE_CASES = [
    pytest.param(dtype, page, r, dr, strided, id=f"{name}-page{page}-r{r}-dr{dr}-{'strided' if strided else 'contig'}")
    for name, dtype in DTYPES.items()
    for page in (1, 16, 64)
    for strided in (False, True)
    for r, dr in ((512, 64), (13, 6))
    if (r, dr) == (512, 64) or page == 16
]


@pytest.mark.parametrize("dtype, page_size, r, dr, strided", WRITE_CASES)
def test_write_kernel_matches_reference(dtype, page_size, r, dr, strided):
    # 37 tokens: two full blocks of 16 and a masked tail
    pages, slots, latent, k_pe = write_inputs(96 // page_size + 2, page_size, r, dr, 37, dtype, strided, seed=page_size)
    expected = pages.clone()
    rcache.write_latent(expected, slots, latent, k_pe)
    out = kcache.write_latent(pages, slots, latent, k_pe)
    assert out is pages
    assert_same_bits("pages", pages, expected)


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_write_places_rows_at_page_and_offset(writer):
    """Ground truth for both: slot s is row s % page_size of page s // page_size, latent first."""
    pages = torch.zeros(3, 4, 1, 5, device=DEVICE)
    slots = torch.tensor([9, 0, 4], device=DEVICE)
    latent = torch.arange(9.0, device=DEVICE).view(3, 3) + 1
    k_pe = -torch.arange(6.0, device=DEVICE).view(3, 2) - 1
    writer(pages, slots, latent, k_pe)
    expected = torch.zeros(3, 4, 1, 5)
    expected[2, 1, 0] = torch.tensor([1.0, 2, 3, -1, -2])
    expected[0, 0, 0] = torch.tensor([4.0, 5, 6, -3, -4])
    expected[1, 0, 0] = torch.tensor([7.0, 8, 9, -5, -6])
    assert torch.equal(pages.cpu(), expected)


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
@pytest.mark.parametrize("n", [0, 1], ids=["n0", "n1"])
def test_write_tiny_batches(writer, n):
    pages, slots, latent, k_pe = write_inputs(2, 16, 512, 64, n, torch.bfloat16, False, seed=n)
    expected = pages.clone()
    if n:
        expected[slots // 16, slots % 16, 0] = torch.cat([latent, k_pe], dim=1)
    writer(pages, slots, latent, k_pe)
    assert_same_bits("pages", pages, expected)


def bad_write(pages=None, slots=None, latent=None, k_pe=None):
    """Valid write arguments (4 pages of 4 slots, r=6, dr=2, fp32) with some replaced."""
    base = {
        "pages": torch.zeros(4, 4, 1, 8),
        "slots": torch.tensor([3, 15, 0]),
        "latent": torch.zeros(3, 6),
        "k_pe": torch.zeros(3, 2),
    }
    given = {"pages": pages, "slots": slots, "latent": latent, "k_pe": k_pe}
    return {k: given[k] if given[k] is not None else v for k, v in base.items()}


BAD_WRITES = [
    pytest.param(bad_write(pages=torch.zeros(4, 4, 8)), ValueError, r"pages must be \[num_pages", id="pages-3d"),
    pytest.param(bad_write(pages=torch.zeros(4, 4, 2, 8)), ValueError, r"pages must be", id="pages-two-heads"),
    pytest.param(
        bad_write(slots=torch.tensor([3, 15, 0], dtype=torch.int32)), TypeError, "slots must be int64", id="slots-int32"
    ),
    pytest.param(bad_write(slots=torch.tensor([[3, 15, 0]])), ValueError, "slots must be 1-D", id="slots-2d"),
    pytest.param(
        bad_write(slots=torch.tensor([3, 16, 0])), ValueError, "slot 16 is outside the pool of 16", id="slot-past-pool"
    ),
    pytest.param(bad_write(slots=torch.tensor([3, -1, 0])), ValueError, "slot -1 is outside", id="slot-negative"),
    pytest.param(
        bad_write(slots=torch.tensor([3, 15, 3])), ValueError, "slot 3 appears more than once", id="slot-repeated"
    ),
    pytest.param(bad_write(latent=torch.zeros(2, 6)), ValueError, r"latent must be \[n=3", id="latent-rows"),
    pytest.param(bad_write(latent=torch.zeros(3, 6, 1)), ValueError, r"latent must be \[n=3", id="latent-3d"),
    pytest.param(bad_write(k_pe=torch.zeros(4, 2)), ValueError, r"k_pe must be \[n=3", id="k_pe-rows"),
    pytest.param(
        bad_write(k_pe=torch.zeros(3, 3)), ValueError, r"6 \+ k_pe channels 3 != page row width 8", id="width"
    ),
    pytest.param(
        bad_write(latent=torch.zeros(3, 6, dtype=torch.float16)), TypeError, "latent dtype", id="latent-dtype"
    ),
    pytest.param(bad_write(k_pe=torch.zeros(3, 2, dtype=torch.float64)), TypeError, "k_pe dtype", id="k_pe-dtype"),
    pytest.param(
        bad_write(latent=torch.zeros(3, 6, device="meta")), ValueError, "latent is on meta", id="latent-device"
    ),
    pytest.param(
        bad_write(slots=torch.zeros(3, dtype=torch.int64, device="meta")),
        ValueError,
        "slots is on meta",
        id="slots-device",
    ),
]


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
@pytest.mark.parametrize("args, error, match", BAD_WRITES)
def test_write_rejects_bad_arguments(writer, args, error, match):
    before = args["pages"].clone()
    with pytest.raises(error, match=match):
        writer(**args)
    assert torch.equal(args["pages"], before)


def test_kernel_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need CUDA tensors or TRITON_INTERPRET=1"):
        kcache.write_latent(**bad_write())


def test_pages_layout_and_sizes():
    cache = LatentCache(3, 5, 4, 512, 64, dtype=torch.bfloat16, device=DEVICE)
    assert len(cache.pages) == 3
    for p in cache.pages:
        assert p.shape == (5, 4, 1, 576) and p.dtype == torch.bfloat16 and p.device.type == DEVICE
        assert not p.any()
    assert cache.pages[0].data_ptr() != cache.pages[1].data_ptr()
    assert cache.bytes_per_token == 576 * 2  # DeepSeek-V3: 1152 bytes per token per layer in bf16
    assert cache.bytes_used() == 0 and cache.num_free_pages == 5
    sid = cache.add_sequence()
    cache.reserve([sid], 5)  # 2 pages of 4 tokens
    assert cache.bytes_used() == 2 * 4 * 576 * 2 * 3 and cache.num_free_pages == 3
    assert "free_pages=3" in repr(cache)


@pytest.mark.parametrize("dtype, itemsize", [(torch.float32, 4), (torch.float16, 2)], ids=["fp32", "fp16"])
def test_bytes_per_token_follows_dtype(dtype, itemsize):
    assert LatentCache(1, 1, 1, 512, 64, dtype=dtype).bytes_per_token == 576 * itemsize


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"num_layers": 0}, ValueError, "num_layers must be positive, got 0", id="layers-0"),
        pytest.param({"num_pages": -1}, ValueError, "num_pages must be positive, got -1", id="pages-neg"),
        pytest.param({"page_size": 0}, ValueError, "page_size must be positive", id="page-size-0"),
        pytest.param({"page_size": 2.5}, TypeError, "page_size must be an integer", id="page-size-float"),
        pytest.param({"kv_lora_rank": 0}, ValueError, "kv_lora_rank must be positive", id="rank-0"),
        pytest.param({"rope_dim": -2}, ValueError, "rope_dim must be positive", id="rope-neg"),
        pytest.param({"dtype": torch.int8}, ValueError, "dtype must be one of", id="dtype-int8"),
        pytest.param({"dtype": torch.float64}, ValueError, "dtype must be one of", id="dtype-fp64"),
        pytest.param({"backend": "cuda"}, ValueError, "backend must be one of", id="backend"),
    ],
)
def test_constructor_rejects_bad_config(kwargs, error, match):
    args = {"num_layers": 2, "num_pages": 4, "page_size": 4, "kv_lora_rank": 8, "rope_dim": 4} | kwargs
    with pytest.raises(error, match=match):
        LatentCache(**args)


def test_reserve_block_table_and_slot_mapping():
    cache = LatentCache(1, 8, 4, 8, 4, device=DEVICE)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    assert (a, b, c) == (0, 1, 2)
    cache.reserve([a, b], [5, 3])  # a: pages 0, 1; b: page 2; c: empty
    cache.reserve(torch.tensor([b, a, c]), torch.tensor([2, 2, 2]))  # b grows into page 3; a fits in page 1
    assert [cache.length(s) for s in (a, b, c)] == [7, 5, 2]
    table, lens = cache.block_table([a, b, c]), cache.seqlens([c, a])
    assert table.dtype == torch.int32 and table.device.type == DEVICE
    assert table.tolist() == [[0, 1], [2, 3], [4, 0]]
    assert lens.dtype == torch.int32 and lens.device.type == DEVICE and lens.tolist() == [2, 7]
    slots = cache.slot_mapping([b, a], torch.tensor([[0, 4], [6, 3]]))
    assert slots.dtype == torch.int64 and slots.device.type == DEVICE
    assert slots.tolist() == [2 * 4 + 0, 3 * 4 + 0, 1 * 4 + 2, 0 * 4 + 3]
    assert cache.slot_mapping([c], [[1]]).tolist() == [4 * 4 + 1]
    assert cache.slot_mapping([], []).numel() == 0
    assert cache.block_table([]).shape == (0, 1)


def test_empty_sequences_get_a_one_column_table():
    cache = LatentCache(1, 2, 4, 8, 4)
    ids = [cache.add_sequence(), cache.add_sequence()]
    assert cache.block_table(ids).tolist() == [[0], [0]]
    assert cache.seqlens(ids).tolist() == [0, 0]


def test_truncate_returns_pages_for_reuse():
    cache = LatentCache(2, 4, 4, 8, 4)
    a = cache.add_sequence()
    cache.reserve([a], 12)  # pages 0, 1, 2
    cache.truncate(a, 5)  # keeps 0, 1
    assert cache.num_free_pages == 2 and cache.block_table([a]).tolist() == [[0, 1]]
    cache.truncate(a, 4)  # exactly one full page
    assert cache.num_free_pages == 3 and cache.block_table([a]).tolist() == [[0]]
    cache.truncate(a, 4)  # no-op
    b = cache.add_sequence()
    cache.reserve([b], 12)
    assert sorted(cache.block_table([b])[0].tolist()) == [1, 2, 3]
    cache.truncate(a, 0)
    assert cache.num_free_pages == 1 and cache.length(a) == 0
    cache.free(b)
    assert cache.num_free_pages == 4 and cache.bytes_used() == 0


def snapshot(cache: LatentCache, ids) -> tuple:
    return (
        [cache.length(s) for s in ids],
        [cache.block_table([s]).tolist() for s in ids],
        cache.num_free_pages,
        cache.bytes_used(),
        [p.clone() for p in cache.pages],
    )


def assert_unchanged(before, after):
    assert before[:4] == after[:4]
    for i, (p, q) in enumerate(zip(before[4], after[4])):
        assert_same_bits(f"pages[{i}]", q, p)


def test_cache_full_is_all_or_nothing():
    cache = LatentCache(2, 6, 4, 8, 4, dtype=torch.float32, device=DEVICE)
    ids = [cache.add_sequence() for _ in range(3)]
    cache.reserve(ids, [3, 4, 0])  # 2 pages used, 4 free
    g = torch.Generator().manual_seed(0)
    slots = cache.slot_mapping(ids[:2], [[0, 1, 2], [3, 1, 0]])
    cache.write(1, slots, torch.randn(6, 8, generator=g).to(DEVICE), torch.randn(6, 4, generator=g).to(DEVICE))
    before = snapshot(cache, ids)
    # first two would fit (1 + 2 pages), the third tips it over (+2 pages = 5 > 4)
    with pytest.raises(CacheFullError, match="needs 5 new pages, only 4 of 6 are free"):
        cache.reserve(ids, [2, 8, 5])
    assert_unchanged(before, snapshot(cache, ids))
    assert issubclass(CacheFullError, RuntimeError)
    cache.reserve(ids, [2, 8, 4])  # exactly the 4 free pages
    assert cache.num_free_pages == 0 and [cache.length(s) for s in ids] == [5, 12, 4]


@pytest.mark.parametrize("backend", [None, "triton", "reference"], ids=["auto", "triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_write_then_read_back(backend, dtype):
    cache = LatentCache(2, 6, 3, 16, 8, dtype=dtype, device=DEVICE, backend=backend)
    a, b = cache.add_sequence(), cache.add_sequence()
    g = torch.Generator().manual_seed(1)
    rows = {a: random_bits((7, 24), dtype, g), b: random_bits((4, 24), dtype, g)}
    cache.reserve([a, b], [4, 4])
    # prefill a's first 4 and b's 4 out of order, then a decode-like step of 3 more for a
    slots = cache.slot_mapping([a, b], [[0, 1, 2, 3], [3, 0, 2, 1]])
    new = torch.cat([rows[a][:4], rows[b][[3, 0, 2, 1]]]).to(DEVICE)
    cache.write(1, slots, new[:, :16], new[:, 16:])
    cache.reserve([a], 3)
    new = rows[a][4:].to(DEVICE)
    cache.write(1, cache.slot_mapping([a], [[4, 5, 6]]), new[:, :16], new[:, 16:])
    for sid in (a, b):
        latent, k_pe = cache.read(1, sid)
        assert_same_bits(f"latent of {sid}", latent.cpu(), rows[sid][:, :16])
        assert_same_bits(f"k_pe of {sid}", k_pe.cpu(), rows[sid][:, 16:])
        assert not cache.read(0, sid)[0].any(), "writing layer 1 touched layer 0"


@pytest.mark.parametrize(
    "backend, interpret, expected",
    [(None, "1", "triton"), (None, None, "reference"), ("reference", "1", "reference"), ("triton", "1", "triton")],
    ids=["auto-interpreter", "auto-cpu", "forced-reference", "forced-triton"],
)
def test_write_backend_selection(monkeypatch, backend, interpret, expected):
    calls = []
    monkeypatch.setattr(kcache, "launch", lambda *a: calls.append("triton"))
    monkeypatch.setattr(mla.ops.reference_cache, "write_rows", lambda *a: calls.append("reference"))
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    cache = LatentCache(1, 2, 2, 4, 2, dtype=torch.float32, backend=backend)
    cache.write(0, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), torch.zeros(0, 2))
    assert calls == [expected]


def test_pages_feed_the_decode_reference():
    """The cache's pages, block table and lengths are the decode kernel's k_cache inputs:
    attention through them equals attention over the rows written, computed directly."""
    r, dr, h = 16, 8, 3
    cache = LatentCache(1, 9, 4, r, dr, dtype=torch.float32, device=DEVICE)
    g = torch.Generator().manual_seed(2)
    ids = [cache.add_sequence() for _ in range(3)]
    lens = [9, 1, 4]
    kv = [torch.randn(n, r + dr, generator=g) for n in lens]
    cache.reserve(ids[::-1], lens[::-1])  # so page order differs from sequence order
    for sid, rows in zip(ids, kv):
        rows = rows.to(DEVICE)
        cache.write(
            0, cache.slot_mapping([sid], [list(range(len(rows)))[::-1]]), rows.flip(0)[:, :r], rows.flip(0)[:, r:]
        )
    q = torch.randn(3, 1, h, r + dr, generator=g)
    out, _ = flash_mla_with_kvcache(q.to(DEVICE), cache.pages[0], cache.block_table(ids), cache.seqlens(ids), r)
    for i, rows in enumerate(kv):
        p = torch.softmax(q[i, 0] @ rows.T * (r + dr) ** -0.5, dim=-1)  # [h, n]
        # fp32 both ways, summation order differs only
        assert_close(f"out[{i}]", out[i, 0].cpu(), p @ rows[:, :r], atol=1e-5, rtol=1e-5)


def make_error_cache():
    """Sequence 0 of length 5 (pages of 4, so slots 5..7 of its second page are allocated
    but not reserved), sequence 1 freed, sequence 2 empty."""
    cache = LatentCache(2, 4, 4, 6, 2, dtype=torch.float32)
    s0, s1, _ = (cache.add_sequence() for _ in range(3))
    cache.reserve([s0], 5)
    cache.free(s1)
    return cache


ERRORS = [
    pytest.param(lambda c: c.length(7), ValueError, "unknown sequence id 7", id="length-unknown"),
    pytest.param(lambda c: c.length(1), ValueError, "sequence 1 was already freed", id="length-freed"),
    pytest.param(lambda c: c.free(1), ValueError, "sequence 1 was already freed", id="double-free"),
    pytest.param(lambda c: c.free(-1), ValueError, "unknown sequence id -1", id="free-negative-id"),
    pytest.param(lambda c: c.free("0"), TypeError, "sequence id must be an integer", id="free-str-id"),
    pytest.param(lambda c: c.reserve([0, 7], 1), ValueError, "unknown sequence id 7", id="reserve-unknown"),
    pytest.param(lambda c: c.reserve([2, 1], 1), ValueError, "sequence 1 was already freed", id="reserve-freed"),
    pytest.param(
        lambda c: c.reserve([0, 2], [1, -1]), ValueError, "n must be >= 0, got -1 for sequence 2", id="reserve-negative"
    ),
    pytest.param(lambda c: c.reserve([0, 2], [1]), ValueError, "n has 1 counts for 2 sequences", id="reserve-counts"),
    pytest.param(
        lambda c: c.reserve([0, 2, 0], 1), ValueError, r"seq_ids \[0, 2, 0\] lists a sequence more", id="reserve-dup"
    ),
    pytest.param(lambda c: c.reserve([0], 1.5), TypeError, "n must be an integer, got 1.5", id="reserve-float"),
    pytest.param(lambda c: c.reserve(0, 1), TypeError, "seq_ids must be a sequence of ints", id="reserve-int-ids"),
    pytest.param(lambda c: c.reserve("02", 1), TypeError, "seq_ids must be a sequence", id="reserve-str-ids"),
    pytest.param(lambda c: c.reserve([0], 12), CacheFullError, "needs 3 new pages, only 2", id="reserve-full"),
    pytest.param(
        lambda c: c.truncate(0, 6), ValueError, "cannot truncate sequence 0 of length 5 to 6", id="truncate-beyond"
    ),
    pytest.param(lambda c: c.truncate(0, -1), ValueError, "of length 5 to -1", id="truncate-negative"),
    pytest.param(lambda c: c.truncate(1, 0), ValueError, "sequence 1 was already freed", id="truncate-freed"),
    pytest.param(
        lambda c: c.slot_mapping([0], [[5]]),
        ValueError,
        r"position 5 of sequence 0 is outside its reservation \[0, 5\)",
        id="map-past-length",
    ),
    pytest.param(
        lambda c: c.slot_mapping([0], [[7]]), ValueError, "position 7 of sequence 0", id="map-allocated-not-reserved"
    ),
    pytest.param(
        lambda c: c.slot_mapping([0, 2], [[1], [0]]), ValueError, "position 0 of sequence 2", id="map-empty-seq"
    ),
    pytest.param(lambda c: c.slot_mapping([0], [[2, -1]]), ValueError, "position -1 of sequence 0", id="map-negative"),
    pytest.param(
        lambda c: c.slot_mapping([0], [[1], [2]]),
        ValueError,
        r"positions must be \[b=1, n\], got shape \(2, 1\)",
        id="map-rows",
    ),
    pytest.param(lambda c: c.slot_mapping([0], torch.tensor([1, 2])), ValueError, r"got shape \(2,\)", id="map-1d"),
    pytest.param(lambda c: c.slot_mapping([0, 2], [[1, 2], [0]]), ValueError, "rectangular", id="map-ragged"),
    pytest.param(lambda c: c.slot_mapping([0], torch.tensor([[1.0]])), TypeError, "integer tensor", id="map-float"),
    pytest.param(lambda c: c.slot_mapping([1], [[0]]), ValueError, "already freed", id="map-freed"),
    pytest.param(lambda c: c.block_table([0, 9]), ValueError, "unknown sequence id 9", id="table-unknown"),
    pytest.param(lambda c: c.seqlens([1]), ValueError, "already freed", id="seqlens-freed"),
    pytest.param(lambda c: c.read(0, 3), ValueError, "unknown sequence id 3", id="read-unknown"),
    pytest.param(
        lambda c: c.read(2, 0), ValueError, "layer 2 is out of range for a cache of 2 layers", id="read-layer"
    ),
    pytest.param(
        lambda c: c.write(-1, torch.tensor([0]), torch.zeros(1, 6), torch.zeros(1, 2)),
        ValueError,
        "layer -1",
        id="write-layer",
    ),
    pytest.param(
        lambda c: c.write(0, torch.tensor([0]), torch.zeros(1, 6).half(), torch.zeros(1, 2).half()),
        TypeError,
        "latent dtype",
        id="write-dtype",
    ),
    pytest.param(
        lambda c: c.write(0, torch.tensor([0]), torch.zeros(1, 5), torch.zeros(1, 3)),
        ValueError,
        r"latent must be \[n, 6\], got shape \(1, 5\)",
        id="write-split",
    ),
    pytest.param(
        lambda c: c.write(0, torch.tensor([0, 1]), torch.zeros(1, 6), torch.zeros(1, 2)),
        ValueError,
        r"latent must be \[n=2",
        id="write-rows",
    ),
    pytest.param(
        lambda c: c.write(0, torch.tensor([16]), torch.zeros(1, 6), torch.zeros(1, 2)),
        ValueError,
        "slot 16 is outside the pool",
        id="write-slot",
    ),
    pytest.param(
        lambda c: c.write(0, torch.tensor([0]), torch.zeros(1, 6, device="meta"), torch.zeros(1, 2)),
        ValueError,
        "latent is on meta",
        id="write-device",
    ),
]


@pytest.mark.parametrize("call, error, match", ERRORS)
def test_errors_are_clear_and_change_nothing(call, error, match):
    cache = make_error_cache()
    before = snapshot(cache, [0, 2])
    with pytest.raises(error, match=match):
        call(cache)
    assert_unchanged(before, snapshot(cache, [0, 2]))


NUM_LAYERS, NUM_PAGES, RANK, ROPE, INDEX_DIM = 2, 10, 8, 4, 6


class CacheMachine(RuleBasedStateMachine):
    """Random add/reserve/write/truncate/free programs against a model of lengths and rows.

    The model knows each sequence's length and the rows written at each (layer, position)
    still inside it (with DeepSeek-V3.2 index keys, the row carries its key); from it the
    machine predicts free page counts and CacheFullError.
    """

    backend = "reference"

    @initialize(
        page_size=st.sampled_from([1, 3, 4]),
        dtype=st.sampled_from([torch.bfloat16, torch.float32]),
        index_dim=st.sampled_from([None, INDEX_DIM]),
    )
    def make_cache(self, page_size, dtype, index_dim):
        self.page_size, self.dtype, self.index_dim = page_size, dtype, index_dim
        self.cache = LatentCache(
            NUM_LAYERS, NUM_PAGES, page_size, RANK, ROPE, dtype=dtype, device=DEVICE, backend=self.backend,
            index_head_dim=index_dim,
        )  # fmt: skip
        self.lengths: dict[int, int] = {}
        self.rows: dict[tuple[int, int, int], torch.Tensor] = {}  # (sid, layer, position) -> row
        self.freed: list[int] = []
        self.gen = torch.Generator().manual_seed(0)

    def expected_free(self) -> int:
        return NUM_PAGES - sum(pages_for(n, self.page_size) for n in self.lengths.values())

    @rule(data=st.data())
    def reserve(self, data):
        """Add 0-2 new sequences, then reserve for them and a random subset of the others."""
        new = []
        for _ in range(data.draw(st.integers(0 if self.lengths else 1, 2), label="new sequences")):
            sid = self.cache.add_sequence()
            assert sid not in self.lengths and sid not in self.freed and self.cache.length(sid) == 0
            self.lengths[sid] = 0
            new.append(sid)
        old = sorted(set(self.lengths) - set(new))
        ids = new + data.draw(
            st.lists(st.sampled_from(old), min_size=0 if new else 1, unique=True) if old else st.just([]), label="ids"
        )
        same = data.draw(st.booleans(), label="one count for all")
        counts = data.draw(
            st.lists(
                st.integers(0, 2 * self.page_size + 1),
                min_size=1 if same else len(ids),
                max_size=1 if same else len(ids),
            ),
            label="counts",
        )
        counts = counts * len(ids) if same else counts
        need = sum(
            pages_for(self.lengths[s] + c, self.page_size) - pages_for(self.lengths[s], self.page_size)
            for s, c in zip(ids, counts)
        )
        if need > self.expected_free():
            before = snapshot(self.cache, sorted(self.lengths))
            with pytest.raises(CacheFullError):
                self.cache.reserve(ids, counts[0] if same else counts)
            assert_unchanged(before, snapshot(self.cache, sorted(self.lengths)))
        else:
            self.cache.reserve(ids, counts[0] if same else counts)
            starts = [self.lengths[s] for s in ids]
            for s, c in zip(ids, counts):
                self.lengths[s] += c
            if data.draw(st.booleans(), label="write the new tokens in every layer"):
                # what a prefill or decode step does: each layer stores the tokens just reserved
                positions = [list(range(a, a + c)) for a, c in zip(starts, counts)]
                keep = [i for i, c in enumerate(counts) if c]
                self.write_rows([ids[i] for i in keep], [positions[i] for i in keep], range(NUM_LAYERS))

    def write_rows(self, ids, positions, layers):
        """Write fresh random rows at `positions` (a list per sequence) of each layer; record them."""
        flat = [(s, p) for s, ps in zip(ids, positions) for p in ps]
        if not flat:
            return
        slots = (
            self.cache.slot_mapping(ids, positions)
            if len({len(ps) for ps in positions}) == 1
            else torch.cat([self.cache.slot_mapping([s], [ps]) for s, ps in zip(ids, positions)])
        )
        for layer in layers:
            rows = torch.randn(len(flat), RANK + ROPE + (self.index_dim or 0), generator=self.gen).to(self.dtype)
            latent, k_pe, keys = rows.to(DEVICE).split([RANK, ROPE, self.index_dim or 0], dim=1)
            self.cache.write(layer, slots, latent, k_pe, keys if self.index_dim else None)
            for row, (s, pos) in zip(rows, flat):
                self.rows[s, layer, pos] = row

    @precondition(lambda self: any(self.lengths.values()))
    @rule(data=st.data())
    def write(self, data):
        ids = data.draw(
            st.lists(st.sampled_from(sorted(s for s, n in self.lengths.items() if n)), min_size=1, unique=True),
            label="ids",
        )
        n = data.draw(st.integers(1, min(self.lengths[s] for s in ids)), label="tokens per sequence")
        positions = [
            data.draw(
                st.lists(st.integers(0, self.lengths[s] - 1), min_size=n, max_size=n, unique=True),
                label=f"positions of {s}",
            )
            for s in ids
        ]
        layer = data.draw(st.integers(0, NUM_LAYERS - 1), label="layer")
        self.write_rows(ids, positions, [layer])

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def write_outside_reservation(self, data):
        sid = data.draw(st.sampled_from(sorted(self.lengths)), label="sid")
        n = self.lengths[sid]
        pos = data.draw(st.integers(n, n + 2 * self.page_size) | st.integers(-3, -1), label="position")
        with pytest.raises(ValueError, match=f"position {pos} of sequence {sid} is outside its reservation"):
            self.cache.slot_mapping([sid], [[pos]])

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def truncate(self, data):
        sid = data.draw(st.sampled_from(sorted(self.lengths)), label="sid")
        new_length = data.draw(st.integers(0, self.lengths[sid]), label="new length")
        self.cache.truncate(sid, new_length)
        self.lengths[sid] = new_length
        self.rows = {k: v for k, v in self.rows.items() if k[0] != sid or k[2] < new_length}

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def truncate_beyond(self, data):
        sid = data.draw(st.sampled_from(sorted(self.lengths)), label="sid")
        new_length = data.draw(st.integers(self.lengths[sid] + 1, self.lengths[sid] + 5), label="new length")
        with pytest.raises(ValueError, match=f"cannot truncate sequence {sid}"):
            self.cache.truncate(sid, new_length)

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.lengths)), label="sid")
        self.cache.free(sid)
        del self.lengths[sid]
        self.freed.append(sid)
        self.rows = {k: v for k, v in self.rows.items() if k[0] != sid}

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def use_after_free(self, data):
        sid = data.draw(st.sampled_from(self.freed), label="sid")
        call = data.draw(
            st.sampled_from(
                [
                    lambda: self.cache.free(sid),
                    lambda: self.cache.truncate(sid, 0),
                    lambda: self.cache.reserve([sid], 1),
                ]
            ),
            label="call",
        )
        with pytest.raises(ValueError, match=f"sequence {sid} was already freed"):
            call()

    @invariant()
    def pages_owned_once_and_none_leak(self):
        ids = sorted(self.lengths)
        assert self.cache.seqlens(ids).tolist() == [self.lengths[s] for s in ids]
        owned = []
        for sid in ids:
            table = self.cache.block_table([sid])
            k = pages_for(self.lengths[sid], self.page_size)
            assert table.shape == (1, max(1, k)), (
                f"sequence {sid} of length {self.lengths[sid]} holds {table.shape[1]} pages"
            )
            owned += table[0, :k].tolist()
        assert len(owned) == len(set(owned)), f"a page is owned twice: {sorted(owned)}"
        assert all(0 <= p < NUM_PAGES for p in owned)
        assert self.cache.num_free_pages == self.expected_free() == NUM_PAGES - len(owned)
        assert self.cache.bytes_used() == len(owned) * self.page_size * self.cache.bytes_per_token * NUM_LAYERS
        assert self.cache.bytes_per_token == (RANK + ROPE + (self.index_dim or 0)) * self.dtype.itemsize

    @invariant()
    def contents_read_back(self):
        for sid in self.lengths:
            for layer in range(NUM_LAYERS):
                parts = [*self.cache.read(layer, sid)] + ([self.cache.read_index(layer, sid)] if self.index_dim else [])
                got = torch.cat(parts, dim=1).cpu()
                for pos in range(self.lengths[sid]):
                    if (sid, layer, pos) in self.rows:
                        assert torch.equal(got[pos], self.rows[sid, layer, pos]), (
                            f"sequence {sid} layer {layer} position {pos}"
                        )

    def teardown(self):
        """Leak check by use, at the end of each program: a fresh sequence can take exactly
        the free pages, after which every page of the pool is owned exactly once."""
        if not hasattr(self, "cache"):  # make_cache itself failed; let that error show
            return
        free = self.cache.num_free_pages
        sid = self.cache.add_sequence()
        self.cache.reserve([sid], free * self.page_size)
        with pytest.raises(CacheFullError):
            self.cache.reserve([sid], 1)
        ids = sorted(self.lengths) + [sid]
        table = self.cache.block_table(ids).cpu()
        owned = [
            p for row, s in zip(table.tolist(), ids) for p in row[: pages_for(self.cache.length(s), self.page_size)]
        ]
        assert sorted(owned) == list(range(NUM_PAGES))
        self.cache.free(sid)
        assert self.cache.num_free_pages == free


class TritonCacheMachine(CacheMachine):
    backend = "triton"


TestCacheProgramsReference = CacheMachine.TestCase
TestCacheProgramsReference.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
TestCacheProgramsTriton = TritonCacheMachine.TestCase
TestCacheProgramsTriton.settings = settings(
    max_examples=30, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
