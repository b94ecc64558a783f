"""Sparse decode (top-k slot lists), the extra cache, attention sinks and the sparse prefill
kernel. The decode cases and their tolerance are the conformance suite's (`mla.conformance`):
every slot no read entry names holds NaN (unused entries past topk_length point at such slots),
-1 holes anywhere, duplicates, slots in any page."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mla import reference as ref
from mla.conformance import FACTOR, FLOOR, GROUPS, Case
from mla.conformance.cases import DTYPES, SINKS
from mla.kernels import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata

from .test_decode import DEVICE, run_kernel, splits
from .utils import assert_close, case_params, max_error


@pytest.mark.parametrize(
    "case",
    case_params(*GROUPS["sparse"], *GROUPS["deepseek-sparse"], *GROUPS["deepseek-v4"], *GROUPS["dense-extra"],
                *GROUPS["sparse-sweep-full"]),
)
def test_sparse_decode_matches_reference(case):
    """Slot lists (heads 1 to 128, head dims, every dtype and FP8, topk lengths, pages of 1 to
    64 slots), extra caches on sparse and dense main caches, sinks; "split" cases must split."""
    result = run_kernel(case)
    if case.sparse and case.num_sm:
        assert splits(result) >= 2, "the schedule did not split as intended"


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


@pytest.mark.parametrize("case", case_params(*GROUPS["blind-rows"]))
def test_rows_that_see_nothing_are_zero_with_inf_lse(case):
    """Row 1 has topk_length 0, row 2 only -1 entries and an empty extra list: out = 0 and
    lse = +inf with any sink, never NaN; row 0 sees keys."""
    result = run_kernel(case)
    out, lse = result.outcome.out, result.outcome.lse
    assert torch.equal(out[1:], torch.zeros_like(out[1:])) and torch.isposinf(lse[1:]).all()
    assert torch.isfinite(lse[0]).all()
    assert not case.num_sm or splits(result) >= 2, "the schedule did not split as intended"


@pytest.mark.parametrize("case", case_params(*GROUPS["sink"]))
def test_sink_scales_output_and_leaves_lse(case):
    """out(sink) = out * exp(lse) / (exp(lse) + exp(sink)), lse unchanged: -inf changes nothing,
    +inf gives 0. Dense (causal) and sparse calls; the case without its sink is the baseline."""
    with_sink, base = run_kernel(case), run_kernel(dataclasses.replace(case, sink=False))
    out, lse = with_sink.outcome.out, with_sink.outcome.lse
    base_out = base.outcome.out
    assert torch.equal(lse, base.outcome.lse)
    sink = torch.tensor([SINKS[h % len(SINKS)] for h in range(case.h_q)], device=lse.device)
    factor = torch.sigmoid(lse.transpose(1, 2) - sink)[..., None]  # [b, s_q, h, 1]
    assert_close("sink", out, base_out * factor, atol=1e-6)
    assert SINKS[0] == -math.inf and SINKS[3] == math.inf
    assert torch.equal(out[:, :, 0::4], base_out[:, :, 0::4]), "-inf sink: no effect"
    assert torch.equal(out[:, :, 3::4], torch.zeros_like(out[:, :, 3::4])), "+inf sink: zero output"
    assert not case.num_sm or splits(with_sink) >= 2 <= splits(base), "the schedule did not split as intended"


def test_old_and_new_schedule_forms_give_identical_results(nan_empty):
    """get_mla_metadata(cache_seqlens, ...) and get_mla_metadata() plan the same splits; a
    FlashMLASchedMeta reused by a second layer (same lengths, other cache) plans nothing new."""
    q, k_cache, block_table, lens, _ = Case(2, 2, 16, 1, 80, 64, "bf16", 16, seed=3, lens=(700, 90)).build(DEVICE).args
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
        assert_close(name, got, want, atol=FACTOR * max_error(rough, want) + FLOOR, rtol=eps if name == "out" else 0.0)
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
    call = Case(2, 2, 4, 1, 80, 64, "fp32", 16, seed=3, topk=32, topk_length=(32, 20)).build(DEVICE)
    args, kw = call.args, call.kwargs
    num_slots = call.k_cache.shape[0] * call.k_cache.shape[1]
    wild = kw["indices"].clone()
    wild[..., 0], wild[..., 3], wild[..., 6] = num_slots, 10**9, -5
    skipped = torch.where((wild < 0) | (wild >= num_slots), -1, wild)
    for impl in (flash_mla_with_kvcache, ref.flash_mla_with_kvcache):
        out, lse = impl(*args, **(kw | dict(indices=wild)))
        expected = impl(*args, **(kw | dict(indices=skipped)))
        assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    q, k_cache, block_table, lens, _ = Case(2, 1, 4, 1, 80, 64, "fp32", 16, seed=6, lens=(40, 20)).build(DEVICE).args
    block_table[0, 1] = 10**6  # tokens 16..31 of row 0 are skipped
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, lens, 64)
    out_ref, lse_ref = ref.flash_mla_with_kvcache(q, k_cache, block_table, lens, 64, compute_dtype=torch.float64)
    assert_close("out", out, out_ref, atol=1e-5)
    assert_close("lse", lse, lse_ref, atol=1e-5)
