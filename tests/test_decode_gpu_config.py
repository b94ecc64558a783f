"""The decode kernel cut as it is on a GPU, run under the interpreter.

The launcher takes its tiles from `decode_tiles(rows, is_fp8, arch)` for the arch it compiles
for (`_target_arch()`; None under the interpreter, whose own tiles the rest of the suite runs).
Here `_target_arch` is forced to sm_80 / sm_89 / sm_90, so the interpreter runs the GPU's
row tiles (32, or 64 padded rows on sm_90), key blocks (16 or 32) and sm_80's integer e4m3
decode, on the suite's adversarial inputs and tolerance rule. What the interpreter cannot show
(warps, pipeline stages, registers) is the compiled-code report's: tests/test_compiled.py.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from mla import reference as ref
from mla.kernels import decode as kdecode
from mla.kernels import flash_mla_sparse_fwd

from .test_decode import DEVICE, check_against_reference, make_inputs, to_fp8_cache
from .test_decode_sparse import prefill_call, sparse_call
from .utils import assert_close, max_error

ARCHS = [pytest.param(80, id="sm80"), pytest.param(89, id="sm89"), pytest.param(90, id="sm90")]


@pytest.fixture(params=ARCHS)
def gpu_arch(request, monkeypatch):
    """The launcher cuts its launches as for sm_<arch>."""
    monkeypatch.setattr(kdecode, "_target_arch", lambda: request.param)
    return request.param


@pytest.mark.parametrize("arch", [None, 80, 89, 90])
@pytest.mark.parametrize("rows", [1, 16, 48, 128])
@pytest.mark.parametrize("fp8", [False, True])
def test_tiles(arch, rows, fp8):
    tiles = kdecode.decode_tiles(rows, fp8, arch)
    assert tiles.block_m >= kdecode.MMA_ROWS and tiles.block_n >= 16
    if arch is not None:
        # the compiled-code report's contract: two cache blocks in flight, wgmma-sized tiles on Hopper
        assert tiles.num_stages >= 3
        assert tiles.block_m == kdecode.WGMMA_ROWS if arch >= 90 else tiles.block_m <= 32
    assert tiles.soft_e4m3 == (arch is not None and arch < 89)


@pytest.mark.parametrize(
    "b,s_q,h_q,d,dv,page,lens,fp8,causal,num_sm",
    [
        pytest.param(2, 2, 16, 576, 512, 64, [70, 600], False, True, 64, id="b2-sq2-h16-page64-bf16-causal-split"),
        pytest.param(2, 1, 128, 576, 512, 16, [33, 1], True, False, None, id="b2-sq1-h128-page16-fp8"),
        pytest.param(3, 4, 3, 80, 64, 7, [50, 0, 300], True, True, 64, id="b3-sq4-h3-page7-fp8-d80v64-causal-split"),
    ],
)  # fmt: skip
def test_dense_decode(nan_empty, gpu_arch, b, s_q, h_q, d, dv, page, lens, fp8, causal, num_sm):
    q, k_cache, block_table, cache_seqlens = make_inputs(b, s_q, h_q, 1, d, page, lens, torch.bfloat16, seed=h_q)
    if fp8:
        k_cache = to_fp8_cache(k_cache, dv)
    kw = dict(causal=causal, is_fp8_kvcache=fp8)
    splits = 2 if num_sm else 0
    check_against_reference(q, k_cache, block_table, cache_seqlens, dv, num_sm=num_sm, min_splits=splits, **kw)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_sparse_decode_with_extra_cache_and_sink(nan_empty, gpu_arch, dtype):
    # b, s_q, h_q, h_kv, d, dv, dtype, topk, page, lengths, extra (page, topk, lengths), sink;
    # row 0's extra keys start mid-block (40 main keys), so one block mixes both caches
    args, kw = sparse_call(7, 2, 1, 64, 1, 576, 512, dtype, 40, 16, [40, 9], (8, 24, [24, 3]), True)
    out, _ = check_against_reference(*args, **kw)
    assert not out.isnan().any(), "an unselected (NaN) slot reached the output"


def test_sparse_prefill(nan_empty, gpu_arch):
    args, kw = prefill_call(3, 3, 16, 1, 576, 512, "bf16", 60, 24, [24, 5, 0], True)
    got = flash_mla_sparse_fwd(*args, **kw)
    want = ref.flash_mla_sparse_fwd(*args, **kw, compute_dtype=torch.float64)
    low = ref.flash_mla_sparse_fwd(*args, **kw, compute_dtype=args[0].dtype)
    eps = torch.finfo(args[0].dtype).eps
    for name, g, w, rough in zip(("out", "max_logits", "lse"), got, want, low):
        assert_close(name, g, w, atol=2 * max_error(rough, w) + 1e-5, rtol=eps if name == "out" else 0.0)


@triton.jit
def _decode_codes_kernel(code_ptr, out_ptr, SOFT_E4M3: tl.constexpr):
    o_c = tl.arange(0, 256)
    tl.store(out_ptr + o_c, kdecode._e4m3_to_f32(tl.load(code_ptr + o_c), SOFT_E4M3))


@pytest.mark.parametrize("soft", [True, False], ids=["integer-ops-sm80", "fp8-convert"])
def test_e4m3_decode_is_exact_for_every_code(soft):
    codes = torch.arange(256, dtype=torch.int32, device=DEVICE)
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _decode_codes_kernel[(1,)](codes, out, SOFT_E4M3=soft)
    want = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    nan = want.isnan()  # 0x7F, 0xFF: only stored in poisoned tiles, whose NaN scale makes them NaN
    assert nan.sum() == 2 and torch.equal(out[~nan], want[~nan])
    if soft:
        # the integer decode reads them as the next e4m3 magnitude (the fp8 conversion: NaN on a
        # GPU, 480 under the interpreter)
        assert torch.equal(out[nan], torch.tensor([480.0, -480.0], device=DEVICE))
