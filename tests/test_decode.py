"""mla.kernels.decode on the conformance cases (`mla.conformance`: the cases, the float64
oracle and the tolerance rule live there), its schedules, and the reference against plain MLA math."""

from __future__ import annotations

import os

import pytest
import torch

from mla import reference as ref
from mla.conformance import GROUPS, Case, FlashMLATarget, Result, check_case
from mla.kernels import decode as kdecode
from mla.kernels import flash_mla_with_kvcache, get_mla_metadata

from .utils import assert_close, case_params

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
KERNEL = FlashMLATarget(flash_mla_with_kvcache, get_mla_metadata, forms=("old", "new"))
"""The kernel as a conformance target: dense calls scheduled with the old get_mla_metadata
form, the others with a FlashMLASchedMeta; a case's num_sm reaches get_mla_metadata."""


def run_kernel(case: Case) -> Result:
    """The kernel on `case`, held to the conformance contract (asserted here, with the symptoms)."""
    result = check_case(KERNEL, case, DEVICE)
    assert result.passed, result.message
    return result


def splits(result: Result) -> int:
    """The most splits a row of the kernel's schedule had in `result`'s call."""
    meta, num_splits = result.outcome.schedule
    cu_splits = num_splits if num_splits is not None else meta.num_splits
    return (cu_splits[1:] - cu_splits[:-1]).max().item()


@pytest.mark.parametrize(
    "case",
    case_params(*GROUPS["dense-sweep"], *GROUPS["head-dims"], *GROUPS["fp8"], *GROUPS["deepseek-dense"],
                *GROUPS["dense-sweep-full"]),
)  # fmt: skip
def test_decode_matches_reference(case):
    """Block-table calls: heads (1, 3, 16, 64, 128 over 1 or 2 latent heads), s_q 1 / 2 / 4,
    lengths at page edges, page sizes 1 / 16 / 64, bf16 / fp16 / fp32 and FP8 caches, head dims
    576/512, 512/512, 80/64 down to 3/1, causal or not, split schedules or not. An FP8 cache
    comes as float8_e4m3fn (FlashMLA's form); its bytes as uint8 give the identical result."""
    result = run_kernel(case)
    if case.fp8:
        call = case.build(DEVICE)
        as_bytes = call.k_cache.view(torch.uint8)
        out = flash_mla_with_kvcache(call.q, as_bytes, *call.args[2:], *result.outcome.schedule, **call.kwargs)[0]
        assert torch.equal(out, result.outcome.out)


@pytest.mark.parametrize("num_sm", [1, 7, 64, 1000], ids=lambda n: f"sm{n}")
def test_decode_split_count_does_not_change_result(nan_empty, num_sm):
    call = Case(2, 1, 16, 1, 576, 512, "fp32", 64, seed=3, lens=(900, 40)).build(DEVICE)
    q, k_cache, block_table, lens, _ = call.args
    base = ref.flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, compute_dtype=torch.float64)
    meta, splits = get_mla_metadata(lens, 16, 1, num_sm=num_sm)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, meta, splits)
    assert_close("out", out, base[0], atol=2e-5)
    assert_close("lse", lse, base[1], atol=2e-5)


def test_decode_masked_rows_are_zero_with_inf_lse(nan_empty):
    # s_q = 4 over a 2-token cache: causal rows 0 and 1 see nothing; sequence 1 is empty
    q, k_cache, block_table, lens, _ = Case(2, 4, 2, 1, 80, 64, "fp32", 16, seed=0, lens=(2, 0)).build(DEVICE).args
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, lens, 64, causal=True)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2])) and torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isposinf(lse[0, :, :2]).all() and torch.isposinf(lse[1]).all()
    assert torch.isfinite(lse[0, :, 2:]).all() and not torch.isnan(out).any()


def test_metadata_partitions_each_sequence():
    lens = torch.tensor([0, 5, 4096, 700, 64], dtype=torch.int32)
    meta, splits = get_mla_metadata(lens, 16, 1, num_sm=100)
    assert meta.dtype == splits.dtype == torch.int32
    assert meta.shape == (5, 100 // 5 + 1), "one tile per sequence, so 100 processors allow 20 splits each"
    counts = (splits[1:] - splits[:-1]).tolist()
    for i, n in enumerate(lens.tolist()):
        bounds = meta[i].tolist()
        assert bounds[0] == 0 and bounds[-1] == n and bounds == sorted(bounds)
        nonempty = sum(bounds[s + 1] > bounds[s] for s in range(len(bounds) - 1))
        assert nonempty == counts[i]
        assert all(bounds[s + 1] > bounds[s] for s in range(counts[i])), "non-empty splits come first"
        assert all(x % kdecode.SPLIT_ALIGN == 0 for x in bounds if x != n)
    assert counts[2] > counts[3] >= counts[1] == counts[4] == 1 and counts[0] == 0


def test_metadata_single_split_when_grid_is_full():
    meta, splits = get_mla_metadata(torch.tensor([10, 0, 7], dtype=torch.int32), 128, 1, num_sm=2)
    assert meta.tolist() == [[0, 10], [0, 0], [0, 7]] and splits.tolist() == [0, 1, 1, 2]


def test_reference_matches_plain_mla_math():
    """The paged reference in float64 equals the dense absorbed and naive MLA formulas.

    The decode contract takes bf16 / fp16 / fp32 only, so inputs are float32 values on a
    coarse dyadic grid (exact in float32, and so is the absorbed query); the one rounding left
    is the paged reference's float32 output, carried through W_UV."""
    g = torch.Generator().manual_seed(0)
    b, s_q, h, dn, dr, dv, r, page = 2, 3, 4, 16, 8, 16, 32, 16
    lens = [37, 20]

    def grid(*shape):
        return torch.randint(-8, 9, shape, generator=g).to(torch.float64) / 8

    q_nope, q_pe = grid(b, s_q, h, dn), grid(b, s_q, h, dr)
    w_kv_b = grid(h * (dn + dv), r)
    scale = (dn + dr) ** -0.5
    w_uk, w_uv = ref.split_kv_b(w_kv_b, h, dv)
    q = torch.cat([ref.absorb_query(q_nope, w_uk), q_pe], dim=-1)  # [b, s_q, h, r + dr]
    k_cache = torch.zeros(8, page, 1, r + dr, dtype=torch.float64)
    block_table = torch.tensor([[5, 1, 6], [0, 3, 2]], dtype=torch.int32)
    caches = []
    for i, n in enumerate(lens):
        tokens = grid(n, r + dr)
        caches.append(tokens)
        for j in range(n):
            k_cache[block_table[i, j // page], j % page, 0] = tokens[j]
    assert torch.equal(q.float().double(), q), "the absorbed query is exact in float32"
    out_lat, _ = ref.flash_mla_with_kvcache(
        q.float(), k_cache.float(), block_table, torch.tensor(lens, dtype=torch.int32), r,
        softmax_scale=scale, causal=True, compute_dtype=torch.float64,
    )  # fmt: skip
    out = torch.einsum("bqhr,hvr->bqhv", out_lat.double(), w_uv)
    bound = torch.finfo(torch.float32).eps * torch.einsum("bqhr,hvr->bqhv", out_lat.double().abs(), w_uv.abs())
    for i, n in enumerate(lens):
        lat, k_pe = caches[i][None, :, :r], caches[i][None, :, r:]
        args = (q_nope[i : i + 1], q_pe[i : i + 1], lat, k_pe, w_kv_b, dv, scale)
        atol = bound[i].max().item()
        assert_close(f"absorbed seq{i}", out[i : i + 1], ref.mla_absorbed(*args), atol=atol)
        assert_close(f"naive seq{i}", out[i : i + 1], ref.mla_naive(*args), atol=atol)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU-only error path")
def test_decode_without_interpreter_points_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k_cache, block_table, lens, _ = Case(1, 1, 4, 1, 80, 64, "fp32", 16, seed=0, lens=(20,)).build(DEVICE).args
    with pytest.raises(ValueError, match="mla.reference.flash_mla_with_kvcache"):
        flash_mla_with_kvcache(q, k_cache, block_table, lens, 64)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_decode_step_captures_in_cuda_graph():
    call = Case(4, 2, 16, 1, 576, 512, "bf16", 64, seed=0, lens=(500, 3, 64, 1200)).build(DEVICE)
    q, k_cache, block_table, lens, _ = call.args
    out_eager, _ = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, causal=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta, splits = get_mla_metadata(lens, 32, 1)
        out_graph, _ = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, meta, splits, causal=True)
    lens.copy_(torch.tensor([400, 2, 60, 1100], dtype=torch.int32, device=lens.device))
    graph.replay()
    expected, _ = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, causal=True)
    assert torch.equal(out_graph, expected) and not torch.equal(out_graph, out_eager)
