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

from mla.conformance import Case, Extra

from .test_decode import DEVICE, run_kernel, splits
from .test_decode_sparse import prefill_call
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
    "case",
    [
        Case(2, 2, 16, 1, 576, 512, "bf16", 64, seed=16, lens=(70, 600), causal=True, num_sm=64),
        Case(2, 1, 128, 1, 576, 512, "bf16", 16, seed=128, lens=(33, 1), fp8=True),
        Case(3, 4, 3, 1, 80, 64, "bf16", 7, seed=3, lens=(50, 0, 300), causal=True, fp8=True, num_sm=64),
    ],
    ids=lambda case: case.id,
)
def test_dense_decode(gpu_arch, case):
    result = run_kernel(case)
    if case.num_sm:
        assert splits(result) >= 2, "the case was meant to split"


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_sparse_decode_with_extra_cache_and_sink(gpu_arch, fp8):
    # row 0's extra keys start mid-block (40 main keys), so one block mixes both caches
    run_kernel(Case(2, 1, 64, 1, 576, 512, "bf16", 16, seed=7, topk=40, topk_length=(40, 9), fp8=fp8, sink=True,
                    extra=Extra(8, 24, (24, 3))))  # fmt: skip


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
