"""mla.kernels.decode against mla.reference.decode, and the reference against plain MLA math."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from mla import reference as ref
from mla.kernels import decode as kdecode
from mla.kernels import flash_mla_with_kvcache, get_mla_metadata
from mla.reference.quant import quantize_latent_fp8

from .utils import assert_close, max_error

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADS = [(1, 1), (3, 1), (16, 1), (64, 1), (128, 1), (16, 2), (64, 2), (128, 2)]
DIMS = [(576, 512), (80, 64), (512, 512)]
PAGES = [1, 16, 64]


def seqlens_for(b: int, page: int, case: int) -> list[int]:
    """Lengths that hit page edges: 0, 1, page - 1, page + 1 and a few hundred, mixed in one batch."""
    pool = [0, 1, max(page - 1, 1), page + 1, 300, 2 * page + 3, 257]
    return [pool[(case + 3 * i) % len(pool)] for i in range(b)]


def make_inputs(b, s_q, h_q, h_kv, d, page, lens, dtype, seed=0):
    """Random q and a paged cache with a shuffled block table. Every slot no sequence uses
    (page tails, unused blocks) holds NaN and unused table entries hold huge ids, so the
    kernel must never read them."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = [math.ceil(n / page) for n in lens]
    max_pages = max(1, max(pages_per_seq))
    num_blocks = sum(pages_per_seq) + 3
    k_cache = torch.full((num_blocks, page, h_kv, d), float("nan"), dtype=dtype)
    block_table = torch.full((b, max_pages), torch.iinfo(torch.int32).max, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=g)
    used = 0
    for i, n in enumerate(lens):
        blocks = order[used : used + pages_per_seq[i]]
        used += pages_per_seq[i]
        block_table[i, : len(blocks)] = blocks.int()
        tokens = torch.randn(n, h_kv, d, generator=g).to(dtype)
        k_cache[blocks] = torch.nn.functional.pad(tokens, (0, 0, 0, 0, 0, len(blocks) * page - n), value=float("nan")).view(
            len(blocks), page, h_kv, d
        )
    q = torch.randn(b, s_q, h_q, d, generator=g).to(dtype)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, block_table, cache_seqlens)]


def check_against_reference(q, k_cache, block_table, cache_seqlens, dv, num_sm=None, min_splits=0, **kw):
    """Kernel error vs a float64 reference must be at most ~2x the error of the same reference
    run in the input dtype (PyTorch's own low-precision error), plus a small floor.

    kw: the call's keyword arguments (causal, is_fp8_kvcache, indices, attn_sink, extra cache,
    topk lengths, seqlens_q). Dense calls plan with the old get_mla_metadata form, the others
    with a FlashMLASchedMeta; num_sm sizes the split schedule, and with min_splits = 2 some row
    must get two non-empty splits (the split + combine path ran). Returns the kernel's (out, lse).
    """
    s_q, h_q, h_kv = q.shape[1], q.shape[2], k_cache.shape[2]
    if kw.get("indices") is None and kw.get("extra_k_cache") is None:
        meta, splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, num_sm=num_sm)
    else:
        meta, splits = get_mla_metadata(num_sm=num_sm)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv, meta, splits, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    cu_splits = splits if splits is not None else meta.num_splits
    assert (cu_splits[1:] - cu_splits[:-1]).max().item() >= min_splits, "the schedule did not split as intended"

    assert_like_reference(out, lse, q, k_cache, block_table, cache_seqlens, dv, **kw)
    return out, lse


def assert_like_reference(out, lse, *args, **kw):
    """The tolerance rule of `check_against_reference` for any (out, lse) of the call (args, kw)."""
    q = args[0]
    out_ref, lse_ref = ref.flash_mla_with_kvcache(*args, **kw, compute_dtype=torch.float64)
    out_low, lse_low = ref.flash_mla_with_kvcache(*args, **kw, compute_dtype=q.dtype)
    # out_ref is rounded to q's dtype like the kernel's output, so the two may sit one
    # rounding step apart on top of the arithmetic error: rtol = eps covers that step
    assert_close("out", out, out_ref, atol=2 * max_error(out_low, out_ref) + 1e-5, rtol=torch.finfo(q.dtype).eps)
    assert_close("lse", lse, lse_ref, atol=2 * max_error(lse_low, lse_ref) + 1e-5)


def sweep_cases(slow: bool):
    """Fast run: every (heads, s_q) pair once, with the other axes cycled so each value of
    each axis appears several times. Slow run: the cartesian product on a smaller grid."""
    cases = []
    if not slow:
        for n, ((h_q, h_kv), s_q) in enumerate(itertools.product(HEADS, [1, 2, 4])):
            b = [1, 3][n % 2]
            page = PAGES[(n + n // 3) % 3]
            dtype = list(DTYPES)[(n // 2) % 3]
            d, dv = DIMS[(n // 3) % 3]
            causal = (n // 4) % 2 == 0
            num_sm = [None, 64][(n // 6) % 2]
            cases.append((b, s_q, h_q, h_kv, page, dtype, d, dv, causal, num_sm, n))
    else:
        for n, (b, s_q, (h_q, h_kv), page, dtype, causal) in enumerate(
            itertools.product([1, 3], [1, 2, 4], [(16, 1), (128, 1), (64, 2)], PAGES, list(DTYPES), [False, True])
        ):
            d, dv = DIMS[n % 3]
            cases.append((b, s_q, h_q, h_kv, page, dtype, d, dv, causal, [None, 64][n % 2], n))
    return [
        pytest.param(
            *c[:-1], c[-1], id=f"b{c[0]}-sq{c[1]}-h{c[2]}x{c[3]}-page{c[4]}-{c[5]}-d{c[6]}v{c[7]}"
            f"-{'causal' if c[8] else 'full'}-{'split' if c[9] else 'auto'}"
        )
        for c in cases
    ]


def _run_case(b, s_q, h_q, h_kv, page, dtype, d, dv, causal, num_sm, n):
    lens = seqlens_for(b, page, n)
    inputs = make_inputs(b, s_q, h_q, h_kv, d, page, lens, DTYPES[dtype], seed=n)
    check_against_reference(*inputs, dv, num_sm=num_sm, causal=causal)


@pytest.mark.parametrize("b,s_q,h_q,h_kv,page,dtype,d,dv,causal,num_sm,n", sweep_cases(slow=False))
def test_decode_matches_reference(nan_empty, b, s_q, h_q, h_kv, page, dtype, d, dv, causal, num_sm, n):
    _run_case(b, s_q, h_q, h_kv, page, dtype, d, dv, causal, num_sm, n)


@pytest.mark.slow
@pytest.mark.parametrize("b,s_q,h_q,h_kv,page,dtype,d,dv,causal,num_sm,n", sweep_cases(slow=True))
def test_decode_matches_reference_full_sweep(nan_empty, b, s_q, h_q, h_kv, page, dtype, d, dv, causal, num_sm, n):
    _run_case(b, s_q, h_q, h_kv, page, dtype, d, dv, causal, num_sm, n)


@pytest.mark.parametrize(
    "d,dv,lens",
    [
        pytest.param(48, 32, [1, 65, 200], id="d48v32"),
        pytest.param(64, 64, [70, 3, 0], id="d64v64-no-rope"),
        pytest.param(20, 8, [33, 0, 17], id="d20v8"),
        pytest.param(3, 1, [5, 70, 1], id="d3v1"),
        pytest.param(576, 512, [1000, 2, 513], id="d576v512-long"),
    ],
)
def test_decode_other_head_dims(nan_empty, d, dv, lens):
    inputs = make_inputs(3, 2, 8, 1, d, 16, lens, torch.float32, seed=d)
    check_against_reference(*inputs, dv, num_sm=32, causal=True)


@pytest.mark.parametrize("num_sm", [1, 7, 64, 1000], ids=lambda n: f"sm{n}")
def test_decode_split_count_does_not_change_result(nan_empty, num_sm):
    q, k_cache, block_table, lens = make_inputs(2, 1, 16, 1, 576, 64, [900, 40], torch.float32, seed=3)
    base = ref.flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, compute_dtype=torch.float64)
    meta, splits = get_mla_metadata(lens, 16, 1, num_sm=num_sm)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, meta, splits)
    assert_close("out", out, base[0], atol=2e-5)
    assert_close("lse", lse, base[1], atol=2e-5)


def test_decode_softmax_scale_and_default(nan_empty):
    q, k_cache, block_table, lens = make_inputs(1, 1, 4, 1, 80, 16, [50], torch.float32, seed=5)
    for scale in (None, 0.37):
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, lens, 64, softmax_scale=scale)
        out_ref, lse_ref = ref.flash_mla_with_kvcache(
            q, k_cache, block_table, lens, 64, softmax_scale=scale, compute_dtype=torch.float64
        )
        assert_close(f"out scale={scale}", out, out_ref, atol=1e-5)
        assert_close(f"lse scale={scale}", lse, lse_ref, atol=1e-5)


def test_decode_masked_rows_are_zero_with_inf_lse(nan_empty):
    # s_q = 4 over a 2-token cache: causal rows 0 and 1 see nothing; sequence 1 is empty
    q, k_cache, block_table, lens = make_inputs(2, 4, 2, 1, 80, 16, [2, 0], torch.float32)
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


def to_fp8_cache(k_cache: torch.Tensor, dv: int) -> torch.Tensor:
    """Quantize a plain cache into FP8 bytes; its NaN slots become poisoned (NaN) tiles."""
    flat = k_cache.reshape(-1, k_cache.shape[-1])
    return quantize_latent_fp8(flat[:, :dv], flat[:, dv:]).view(*k_cache.shape[:3], -1)


@pytest.mark.parametrize(
    "b,s_q,h_q,page,dtype,d,dv,causal,num_sm",
    [
        pytest.param(1, 1, 16, 64, "bf16", 576, 512, False, None, id="b1-sq1-h16-page64-bf16-d576v512"),
        pytest.param(3, 2, 128, 16, "bf16", 576, 512, True, 64, id="b3-sq2-h128-page16-bf16-d576v512-causal-split"),
        pytest.param(3, 4, 3, 1, "fp16", 576, 512, True, 64, id="b3-sq4-h3-page1-fp16-d576v512-causal-split"),
        pytest.param(3, 1, 64, 64, "fp16", 80, 64, False, 64, id="b3-sq1-h64-page64-fp16-d80v64-split"),
        pytest.param(1, 2, 16, 1, "bf16", 48, 32, True, None, id="b1-sq2-h16-page1-bf16-d48v32-causal"),
        pytest.param(3, 2, 4, 16, "fp16", 16, 8, True, 64, id="b3-sq2-h4-page16-fp16-d16v8-causal-split"),
        pytest.param(2, 1, 16, 16, "fp32", 80, 64, False, None, id="b2-sq1-h16-page16-fp32-d80v64"),
        pytest.param(3, 4, 16, 16, "bf16", 1152, 1024, True, 64, id="b3-sq4-h16-page16-bf16-d1152v1024-causal-split"),
    ],
)
def test_decode_fp8_cache_matches_reference(nan_empty, b, s_q, h_q, page, dtype, d, dv, causal, num_sm):
    lens = seqlens_for(b, page, s_q + h_q)
    q, k_cache, block_table, cache_seqlens = make_inputs(b, s_q, h_q, 1, d, page, lens, DTYPES[dtype], seed=h_q)
    fp8 = to_fp8_cache(k_cache, dv)
    check_against_reference(q, fp8, block_table, cache_seqlens, dv, num_sm=num_sm, causal=causal, is_fp8_kvcache=True)
    # the float8 view of the same bytes is accepted too
    out = flash_mla_with_kvcache(q, fp8.view(torch.float8_e4m3fn), block_table, cache_seqlens, dv, causal=causal, is_fp8_kvcache=True)[0]
    assert torch.equal(out, flash_mla_with_kvcache(q, fp8, block_table, cache_seqlens, dv, causal=causal, is_fp8_kvcache=True)[0])


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU-only error path")
def test_decode_without_interpreter_points_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k_cache, block_table, lens = make_inputs(1, 1, 4, 1, 80, 16, [20], torch.float32)
    with pytest.raises(ValueError, match="mla.reference.flash_mla_with_kvcache"):
        flash_mla_with_kvcache(q, k_cache, block_table, lens, 64)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_decode_step_captures_in_cuda_graph():
    q, k_cache, block_table, lens = make_inputs(4, 2, 16, 1, 576, 64, [500, 3, 64, 1200], torch.bfloat16)
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
