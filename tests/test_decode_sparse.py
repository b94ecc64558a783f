"""Sparse decode (top-k slot lists), the extra cache, attention sinks and the sparse prefill
kernel, against the reference, on adversarial data: every slot no read entry names holds NaN
(unused entries past topk_length point at such slots), -1 holes anywhere, duplicates, slots in
any page."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mla import reference as ref
from mla.kernels import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata

from .test_decode import DEVICE, DTYPES, check_against_reference, make_inputs, to_fp8_cache
from .utils import assert_close, max_error

SINKS = [-math.inf, 0.0, 30.0, math.inf]
"""One sink value per head, cycled: no effect, a finite one, one that swamps the scores, all."""


def slot_lists(g, b, s_q, h_kv, d, page, topk, lengths, dtype, rows_read=None):
    """A paged cache [num_blocks, page, h_kv, d] and int32 indices [b, s_q, topk] into it.

    Entries are slots anywhere in the cache (so also in other rows' pages), a fifth of them -1,
    some repeating their neighbour. Only the first lengths[i] entries of row i are read (all
    when lengths is None), and of those only the first rows_read[i] query tokens (ragged calls).
    Every slot those entries do not name holds NaN, and every entry that is not read names
    such a slot, so reading anything unselected shows in the output.
    """
    read_per_row = b * s_q * topk
    num_blocks = math.ceil(2 * read_per_row / page) + 1
    num_slots = num_blocks * page
    cache = torch.randn(num_blocks, page, h_kv, d, generator=g).to(dtype)
    indices = torch.randint(0, num_slots, (b, s_q, topk), generator=g, dtype=torch.int32)
    indices[torch.rand(b, s_q, topk, generator=g) < 0.2] = -1
    dup = torch.rand(b, s_q, topk, generator=g) < 0.15
    indices[dup] = indices.roll(1, dims=-1)[dup]
    limit = torch.tensor(lengths if lengths is not None else [topk] * b)
    tokens = torch.tensor(rows_read if rows_read is not None else [s_q] * b)
    read = (torch.arange(topk) < limit[:, None, None]) & (torch.arange(s_q)[:, None] < tokens[:, None, None])
    poisoned = torch.ones(num_slots, dtype=torch.bool)
    poisoned[indices[read & (indices >= 0)].long()] = False
    cache.view(num_slots, h_kv, d)[poisoned] = float("nan")
    spare = torch.nonzero(poisoned).flatten()
    indices[~read] = spare[torch.randint(0, len(spare), (int((~read).sum()),), generator=g)].int()
    topk_length = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
    return cache, indices, topk_length


def sparse_call(seed, b, s_q, h_q, h_kv, d, dv, dtype, topk, page, lengths=None, extra=None, sink=False, rows_read=None):
    """(q, k_cache, block_table, cache_seqlens, dv) and keyword arguments of a sparse call.
    extra: (page, topk, lengths) of an extra cache, or None. dtype "fp8": bf16 q, FP8 caches."""
    g = torch.Generator().manual_seed(seed)
    fp8 = dtype == "fp8"
    t = torch.bfloat16 if fp8 else DTYPES[dtype]
    q = torch.randn(b, s_q, h_q, d, generator=g).to(t)
    k_cache, indices, topk_length = slot_lists(g, b, s_q, h_kv, d, page, topk, lengths, t, rows_read)
    kw = dict(indices=indices, topk_length=topk_length, is_fp8_kvcache=fp8)
    if extra is not None:
        x_page, x_topk, x_lengths = extra
        x_cache, x_indices, x_length = slot_lists(g, b, s_q, h_kv, d, x_page, x_topk, x_lengths, t, rows_read)
        kw.update(extra_k_cache=to_fp8_cache(x_cache, dv) if fp8 else x_cache, extra_indices_in_kvcache=x_indices,
                  extra_topk_length=x_length)  # fmt: skip
    if sink:
        kw["attn_sink"] = torch.tensor([SINKS[h % len(SINKS)] for h in range(h_q)], dtype=torch.float32)
    if fp8:
        k_cache = to_fp8_cache(k_cache, dv)
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return (q.to(DEVICE), k_cache.to(DEVICE), None, None, dv), kw


# b, s_q, h_q, h_kv, d, dv, dtype, topk, page, topk lengths, extra (page, topk, lengths), sink, num_sm.
# "split" cases list more than MIN_SPLIT_TOKENS keys in some row, so a large num_sm splits them.
SPARSE_CASES = [
    pytest.param(2, 1, 1, 1, 576, 512, "bf16", 64, 64, None, None, False, None, id="h1-d576v512-bf16"),
    pytest.param(3, 2, 3, 1, 80, 64, "fp16", 300, 16, [300, 17, 0], None, True, 1000, id="h3-d80v64-fp16-topk-length-sink-split"),
    pytest.param(2, 2, 16, 1, 512, 512, "fp32", 40, 1, [40, 3], (4, 24, [24, 0]), False, None, id="h16-d512v512-fp32-extra"),
    pytest.param(2, 1, 64, 1, 576, 512, "fp8", 64, 64, [33, 64], (16, 200, [5, 200]), True, 1000, id="h64-d576v512-fp8-extra-sink-split"),
    pytest.param(1, 2, 128, 1, 576, 512, "bf16", 48, 16, [48], None, True, None, id="h128-d576v512-bf16-sink"),
    pytest.param(2, 2, 16, 2, 80, 64, "fp8", 260, 7, None, (3, 16, None), False, 1000, id="h16x2-d80v64-fp8-extra-split"),
    pytest.param(2, 1, 16, 1, 80, 64, "fp32", 320, 16, [320, 100], (8, 40, [40, 7]), True, 1000, id="h16-d80v64-fp32-long-split"),
]  # fmt: skip


@pytest.mark.parametrize("b,s_q,h_q,h_kv,d,dv,dtype,topk,page,lengths,extra,sink,num_sm", SPARSE_CASES)
def test_sparse_decode_matches_reference(nan_empty, b, s_q, h_q, h_kv, d, dv, dtype, topk, page, lengths, extra, sink, num_sm):
    args, kw = sparse_call(h_q + topk, b, s_q, h_q, h_kv, d, dv, dtype, topk, page, lengths, extra, sink)
    out, lse = check_against_reference(*args, num_sm=num_sm, min_splits=2 if num_sm else 0, **kw)
    assert not out.isnan().any(), "an unselected (NaN) slot reached the output"


def sparse_sweep():
    """The cartesian product of heads, head dims, dtypes, extra cache and sink; the other axes
    (page size, topk lengths, split schedule, s_q) cycle. The FP8 format needs rope channels,
    so FP8 skips 512/512."""
    cases = []
    axes = itertools.product([1, 3, 16, 64, 128], [(576, 512), (512, 512), (80, 64)], ["bf16", "fp16", "fp32", "fp8"],
                             [False, True], [False, True])  # fmt: skip
    for n, (h_q, (d, dv), dtype, extra, sink) in enumerate(axes):
        if dtype == "fp8" and d == dv:
            continue
        split = n % 2 == 1
        topk = 300 if split else 48
        lengths = [None, [topk, topk // 3], [0, topk]][n % 3]
        page = [1, 16, 64][n % 3]
        x = (4, 40, [40, 0]) if extra else None
        case_id = f"h{h_q}-d{d}v{dv}-{dtype}{'-extra' if extra else ''}{'-sink' if sink else ''}{'-split' if split else ''}"
        cases.append(pytest.param(2, 1 + n % 2, h_q, 1, d, dv, dtype, topk, page, lengths, x, sink, 1000 if split else None,
                                  id=case_id))  # fmt: skip
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("b,s_q,h_q,h_kv,d,dv,dtype,topk,page,lengths,extra,sink,num_sm", sparse_sweep())
def test_sparse_decode_full_sweep(nan_empty, b, s_q, h_q, h_kv, d, dv, dtype, topk, page, lengths, extra, sink, num_sm):
    args, kw = sparse_call(h_q + topk + d, b, s_q, h_q, h_kv, d, dv, dtype, topk, page, lengths, extra, sink)
    out, lse = check_against_reference(*args, num_sm=num_sm, min_splits=2 if num_sm else 0, **kw)
    assert not out.isnan().any()


def test_sparse_decode_sweep_cases():
    """The sweep's axes, each value at least once: heads, head dims, dtypes."""
    heads = {c.values[2] for c in SPARSE_CASES}
    dims = {(c.values[4], c.values[5]) for c in SPARSE_CASES}
    dtypes = {c.values[6] for c in SPARSE_CASES}
    assert heads >= {1, 3, 16, 64, 128} and dims >= {(576, 512), (512, 512), (80, 64)}
    assert dtypes >= {"bf16", "fp16", "fp32", "fp8"}


def test_duplicate_slots_count_twice():
    """Listing slot s twice weighs it as two keys: softmax over [x_s, x_s, x_t]."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, 1, 80, generator=g, dtype=torch.float64)
    k_cache = torch.randn(2, 16, 1, 80, generator=g, dtype=torch.float64)
    s, t = 19, 3
    keys = k_cache.view(32, 80)[[s, s, t]]
    p = torch.softmax(keys @ q[0, 0, 0] * 80**-0.5, dim=0)
    expected = p @ keys[:, :64]
    indices = torch.tensor([[[s, -1, t, s]]], dtype=torch.int32)
    for impl, dtype in ((flash_mla_with_kvcache, torch.float32), (ref.flash_mla_with_kvcache, torch.float32)):
        out, lse = impl(q.to(dtype), k_cache.to(dtype), None, None, 64, indices=indices)
        assert_close(f"{impl.__module__} out", out[0, 0, 0], expected, atol=1e-5)
        assert_close(f"{impl.__module__} lse", lse[0, 0, 0], torch.logsumexp(keys @ q[0, 0, 0] * 80**-0.5, 0), atol=1e-5)


@pytest.mark.parametrize("num_sm", [None, 1000], ids=["one-split", "split"])
def test_rows_that_see_nothing_are_zero_with_inf_lse(nan_empty, num_sm):
    """topk_length 0, only -1 entries, or an extra list that is empty too: out = 0 and lse = +inf
    with any sink, never NaN."""
    args, kw = sparse_call(7, 3, 2, 4, 1, 80, 64, "fp32", 270, 16, [270, 0, 270], (4, 8, [8, 0, 0]), sink=True)
    kw["indices"][2] = -1
    out, lse = check_against_reference(*args, num_sm=num_sm, min_splits=2 if num_sm else 0, **kw)
    assert torch.equal(out[1:], torch.zeros_like(out[1:])) and torch.isposinf(lse[1:]).all()
    assert torch.isfinite(lse[0]).all() and not out.isnan().any()


@pytest.mark.parametrize("num_sm", [None, 64], ids=["one-split", "split"])
def test_sink_scales_output_and_leaves_lse(nan_empty, num_sm):
    """out(sink) = out * exp(lse) / (exp(lse) + exp(sink)), lse unchanged: -inf changes nothing,
    +inf gives 0. Dense (causal) and sparse calls."""
    sink = torch.tensor([SINKS[h % 4] for h in range(8)], dtype=torch.float32).to(DEVICE)
    dense = make_inputs(2, 2, 8, 1, 80, 16, [300, 40], torch.float32, seed=2)
    sparse, kw = sparse_call(5, 2, 2, 8, 1, 80, 64, "fp32", 300, 16, [300, 9])
    splits = 2 if num_sm else 0
    for args, call_kw in (((*dense, 64), dict(causal=True)), (sparse, kw)):
        base_out, base_lse = check_against_reference(*args, num_sm=num_sm, min_splits=splits, **call_kw)
        out, lse = check_against_reference(*args, num_sm=num_sm, min_splits=splits, attn_sink=sink, **call_kw)
        assert torch.equal(lse, base_lse)
        factor = torch.sigmoid(lse.transpose(1, 2) - sink)[..., None]  # [b, s_q, h, 1]
        assert_close("sink", out, base_out * factor, atol=1e-6)
        assert torch.equal(out[:, :, 0::4], base_out[:, :, 0::4]), "-inf sink: no effect"
        assert torch.equal(out[:, :, 3::4], torch.zeros_like(out[:, :, 3::4])), "+inf sink: zero output"


def test_dense_cache_with_an_extra_cache(nan_empty):
    """A dense (causal) main cache and an extra slot list attend in one softmax."""
    q, k_cache, block_table, lens = make_inputs(3, 2, 16, 1, 576, 16, [40, 0, 17], torch.bfloat16, seed=8)
    (_, x_cache, *_), kw = sparse_call(9, 3, 2, 16, 1, 576, 512, "bf16", 24, 8, [24, 5, 0])
    extra = dict(extra_k_cache=x_cache, extra_indices_in_kvcache=kw["indices"], extra_topk_length=kw["topk_length"])
    out, lse = check_against_reference(q, k_cache, block_table, lens, 512, num_sm=64, causal=True, **extra)
    assert not out.isnan().any()


def test_old_and_new_schedule_forms_give_identical_results(nan_empty):
    """get_mla_metadata(cache_seqlens, ...) and get_mla_metadata() plan the same splits; a
    FlashMLASchedMeta reused by a second layer (same lengths, other cache) plans nothing new."""
    q, k_cache, block_table, lens = make_inputs(2, 2, 16, 1, 80, 16, [700, 90], torch.bfloat16, seed=3)
    old = get_mla_metadata(lens, 2 * 16, 1, num_sm=64)
    new, none = get_mla_metadata(num_sm=64)
    assert none is None
    out_old = flash_mla_with_kvcache(q, k_cache, block_table, lens, 64, *old, causal=True)
    out_new = flash_mla_with_kvcache(q, k_cache, block_table, lens, 64, new, None, causal=True)
    assert torch.equal(new.tile_scheduler_metadata, old[0]) and torch.equal(new.num_splits, old[1])
    assert torch.equal(out_old[0], out_new[0]) and torch.equal(out_old[1], out_new[1])
    planned = new.tile_scheduler_metadata
    layer2 = -k_cache  # NaN where k_cache has NaN: unused slots stay poisoned
    out2 = flash_mla_with_kvcache(q, layer2, block_table, lens, 64, new, None, causal=True)
    assert new.tile_scheduler_metadata is planned
    fresh = flash_mla_with_kvcache(q, layer2, block_table, lens, 64, *get_mla_metadata(lens, 32, 1, num_sm=64), causal=True)
    assert torch.equal(out2[0], fresh[0])


def prefill_call(seed, s_q, h_q, h_kv, d, dv, dtype, s_kv, topk, lengths=None, sink=False):
    g = torch.Generator().manual_seed(seed)
    t = DTYPES[dtype]
    q = torch.randn(s_q, h_q, d, generator=g).to(t)
    kv = torch.randn(s_kv, h_kv, d, generator=g).to(t)
    # invalid entries of every kind: -1, other negatives, s_kv and beyond
    indices = torch.randint(-3, s_kv + 4, (s_q, h_kv, topk), generator=g, dtype=torch.int32)
    indices[0] = -1  # token 0 sees nothing
    read = (indices >= 0) & (indices < s_kv)
    if lengths is not None:
        read &= torch.arange(topk) < torch.tensor(lengths)[:, None, None]
    poisoned = torch.ones(s_kv, dtype=torch.bool)
    poisoned[indices[read].long()] = False
    kv[poisoned] = float("nan")
    kw = dict(topk_length=None if lengths is None else torch.tensor(lengths, dtype=torch.int32))
    if sink:
        kw["attn_sink"] = torch.tensor([SINKS[h % 4] for h in range(h_q)], dtype=torch.float32)
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return (q.to(DEVICE), kv.to(DEVICE), indices.to(DEVICE), d**-0.5, dv), kw


@pytest.mark.parametrize(
    "s_q,h_q,h_kv,d,dv,dtype,s_kv,topk,lengths,sink",
    [
        pytest.param(5, 16, 1, 576, 512, "bf16", 300, 64, None, False, id="h16-d576v512-bf16"),
        pytest.param(4, 6, 2, 80, 64, "fp32", 50, 40, [40, 3, 0, 21], True, id="h6x2-d80v64-fp32-topk-length-sink"),
        pytest.param(3, 64, 1, 512, 512, "fp16", 90, 33, [33, 33, 10], True, id="h64-d512v512-fp16-sink"),
    ],
)
def test_sparse_prefill_matches_reference(nan_empty, s_q, h_q, h_kv, d, dv, dtype, s_kv, topk, lengths, sink):
    args, kw = prefill_call(s_q + h_q, s_q, h_q, h_kv, d, dv, dtype, s_kv, topk, lengths, sink)
    out, max_logits, lse = flash_mla_sparse_fwd(*args, **kw)
    expected = ref.flash_mla_sparse_fwd(*args, **kw, compute_dtype=torch.float64)
    low = ref.flash_mla_sparse_fwd(*args, **kw, compute_dtype=args[0].dtype)
    assert out.dtype == args[0].dtype and max_logits.dtype == lse.dtype == torch.float32
    eps = torch.finfo(args[0].dtype).eps
    for name, got, want, rough in zip(("out", "max_logits", "lse"), (out, max_logits, lse), expected, low):
        assert_close(name, got, want, atol=2 * max_error(rough, want) + 1e-5, rtol=eps if name == "out" else 0.0)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isposinf(lse[0]).all()
    assert torch.isneginf(max_logits[0]).all() and not out.isnan().any()


def test_sparse_prefill_is_sparse_decode_over_one_page(nan_empty):
    """Token t of a prefill is row t of a decode call with one query over a one-page cache
    holding kv: the same kernel path, so identical results once invalid entries are -1."""
    args, kw = prefill_call(11, 6, 16, 1, 80, 64, "bf16", 70, 48, [48, 1, 0, 48, 20, 7], sink=True)
    q, kv, indices, scale, dv = args
    out, _, lse = flash_mla_sparse_fwd(*args, **kw)
    slots = torch.where((indices >= 0) & (indices < kv.shape[0]), indices, -1)[:, 0, None]  # [s_q, 1, topk]
    out_d, lse_d = flash_mla_with_kvcache(q[:, None], kv[None], None, None, dv, softmax_scale=scale, indices=slots, **kw)
    assert torch.equal(out, out_d[:, 0]) and torch.equal(lse, lse_d[:, :, 0])


def test_unchecked_out_of_range_entries_are_skipped(monkeypatch, nan_empty):
    """Where value checks do not run (CUDA without MLA_DEBUG, torch.compile), slots and page
    ids outside the cache are skipped like -1 by both implementations: never read."""
    from mla.reference import contract

    monkeypatch.setattr(contract, "reads_values", lambda device: False)
    args, kw = sparse_call(3, 2, 2, 4, 1, 80, 64, "fp32", 32, 16, [32, 20])
    num_slots = args[1].shape[0] * args[1].shape[1]
    wild = kw["indices"].clone()
    wild[..., 0], wild[..., 3], wild[..., 6] = num_slots, 10**9, -5
    skipped = torch.where((wild < 0) | (wild >= num_slots), -1, wild)
    for impl in (flash_mla_with_kvcache, ref.flash_mla_with_kvcache):
        out, lse = impl(*args, **(kw | dict(indices=wild)))
        expected = impl(*args, **(kw | dict(indices=skipped)))
        assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    q, k_cache, block_table, lens = make_inputs(2, 1, 4, 1, 80, 16, [40, 20], torch.float32, seed=6)
    block_table[0, 1] = 10**6  # tokens 16..31 of row 0 are skipped
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, lens, 64)
    out_ref, lse_ref = ref.flash_mla_with_kvcache(q, k_cache, block_table, lens, 64, compute_dtype=torch.float64)
    assert_close("out", out, out_ref, atol=1e-5)
    assert_close("lse", lse, lse_ref, atol=1e-5)
