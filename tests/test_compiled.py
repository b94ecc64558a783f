"""The compiled-code report (bench.compiled): rows well formed, ptxas and ttgir read right.

This suite runs under TRITON_INTERPRET=1, so the report's kernels and the toy kernels below
(whose compiled form is known) are compiled in a child process without it
(`bench.compiled.run_compiling`), for a named arch, and never run.
"""

import pytest
import torch
import triton
import triton.language as tl

from bench.compiled import (
    ARCHS,
    CONFIGS,
    FIELDS,
    Launch,
    analyze,
    compile_launch,
    compiled_rows,
    ctas_per_sm,
    kv_stages,
    run_compiling,
)

MMA_KINDS = ("wgmma", "mma", "none")
# The default run's configurations: both cache formats of the main decode shape, the sparse
# path with every option (FP8, extra cache, sink: the most registers on sm_80) and a writer.
SUBSET = ("v3-bf16-h128-sq1", "v3-fp8-h128-sq1", "sparse-fp8-h64-extra-sink", "v4-model1-h128-extra-sink",
          "write-bf16")  # fmt: skip
DECODE = "_mla_decode_kernel"


@triton.jit
def copy_kernel(x_ptr, y_ptr, N: tl.constexpr):
    o_n = tl.arange(0, N)
    tl.store(y_ptr + o_n, tl.load(x_ptr + o_n))


@triton.jit
def scale_by_sum_kernel(x_ptr, y_ptr, R: tl.constexpr, C: tl.constexpr):
    """y = x * sum(x): the whole [R, C] tile stays live across the reduction."""
    o_rc = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    b_x = tl.load(x_ptr + o_rc)
    tl.store(y_ptr + o_rc, b_x * tl.sum(tl.sum(b_x, 1), 0))


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, PRECISION: tl.constexpr):
    o_m, o_n, o_k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    b_a = tl.load(a_ptr + o_m[:, None] * K + o_k[None, :])
    b_b = tl.load(b_ptr + o_k[:, None] * N + o_n[None, :])
    tl.store(c_ptr + o_m[:, None] * N + o_n[None, :], tl.dot(b_a, b_b, input_precision=PRECISION))


@triton.jit
def matmul_loop_kernel(a_ptr, b_ptr, c_ptr, K, M: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = a @ b streaming BLOCK_K-wide tiles of a [M, K] and b [K, N], pointer loads."""
    o_m, o_n, o_k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, BLOCK_K)
    b_acc = tl.zeros([M, N], tl.float32)
    for k in range(0, K, BLOCK_K):
        b_a = tl.load(a_ptr + o_m[:, None] * K + (k + o_k)[None, :])
        b_b = tl.load(b_ptr + (k + o_k)[:, None] * N + o_n[None, :])
        b_acc += tl.dot(b_a, b_b)
    tl.store(c_ptr + o_m[:, None] * N + o_n[None, :], b_acc)


@triton.jit
def matmul_tma_loop_kernel(a_ptr, b_ptr, c_ptr, K, M: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr):
    """matmul_loop_kernel through tensor descriptors, so the tiles arrive by TMA."""
    d_a = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[M, BLOCK_K])
    d_b = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, N])
    b_acc = tl.zeros([M, N], tl.float32)
    for k in range(0, K, BLOCK_K):
        b_acc += tl.dot(d_a.load([0, k]), d_b.load([k, 0]))
    o_m, o_n = tl.arange(0, M), tl.arange(0, N)
    tl.store(c_ptr + o_m[:, None] * N + o_n[None, :], b_acc)


BF16_TILES = ("bfloat16", "bfloat16", "float32")
MATMUL = {"M": 64, "N": 64, "BLOCK_K": 64, "num_warps": 4}
# id -> (kernel, arch, argument dtypes (tensors) and ints, constexprs and launch options)
TOYS = {
    # 64 x 128 fp32 values live in one warp: 256 per thread, more than the 255 registers
    "spill-64x128-fp32-1warp": (scale_by_sum_kernel, 90, ("float32", "float32"), {"R": 64, "C": 128, "num_warps": 1}),
    "copy-128": (copy_kernel, 90, ("float32", "float32"), {"N": 128, "num_warps": 1}),
    "dot-sm90-64rows": (dot_kernel, 90, BF16_TILES, {"M": 64, "N": 64, "K": 64, "PRECISION": "tf32", "num_warps": 4}),
    "dot-sm80-64rows": (dot_kernel, 80, BF16_TILES, {"M": 64, "N": 64, "K": 64, "PRECISION": "tf32", "num_warps": 4}),
    "dot-sm90-16rows": (dot_kernel, 90, BF16_TILES, {"M": 16, "N": 16, "K": 16, "PRECISION": "tf32", "num_warps": 4}),
    "dot-sm90-fp32-ieee": (dot_kernel, 90, ("float32",) * 3, {"M": 16, "N": 16, "K": 16, "PRECISION": "ieee",
                                                               "num_warps": 4}),
    "cp-async-sm80-3stages": (matmul_loop_kernel, 80, (*BF16_TILES, 1024), {**MATMUL, "num_stages": 3}),
    "cp-async-sm90-3stages": (matmul_loop_kernel, 90, (*BF16_TILES, 1024), {**MATMUL, "num_stages": 3}),
    "cp-async-sm90-1stage": (matmul_loop_kernel, 90, (*BF16_TILES, 1024), {**MATMUL, "num_stages": 1}),
    "tma-sm90-3stages": (matmul_tma_loop_kernel, 90, (*BF16_TILES, 1024), {**MATMUL, "num_stages": 3}),
    "tma-sm90-1stage": (matmul_tma_loop_kernel, 90, (*BF16_TILES, 1024), {**MATMUL, "num_stages": 1}),
}  # fmt: skip


def toy_reports() -> dict[str, dict]:
    """analyze() of every toy compiled for its arch (run by run_compiling, in a compiling process)."""
    reports = {}
    for name, (kernel, arch, args, kwargs) in TOYS.items():
        args = tuple(torch.empty(16, dtype=getattr(torch, a)) if isinstance(a, str) else a for a in args)
        reports[name] = analyze(compile_launch(Launch(kernel, (1,), args, kwargs), arch), arch)
    return reports


@pytest.fixture(scope="module")
def toys():
    return run_compiling("tests.test_compiled:toy_reports")


def assert_well_formed(row: dict, archs) -> None:
    assert tuple(row) == FIELDS, row
    assert row["config"] in CONFIGS and row["arch"] in archs, row
    numbers = [row[k] for k in ("registers", "spill_bytes", "shared_bytes", "mma", "kv_stages", "ctas_per_sm")]
    if row["error"] is not None:
        assert isinstance(row["error"], str) and row["error"], row
        assert numbers == [None] * 6, row
        return
    assert 1 <= row["registers"] <= 255, row
    assert row["spill_bytes"] >= 0 and row["shared_bytes"] >= 0, row
    assert row["mma"] in MMA_KINDS, row
    assert row["kv_stages"] >= 0 and row["ctas_per_sm"] >= 0, row


def assert_meets_targets(row: dict) -> None:
    """Issue 12's targets for one row: it compiles (FP8 on sm_80 included), spills nothing; a
    decode row keeps two or more KV tiles in flight and, on sm_90 (where its row tiles are 64
    rows: `decode_tiles`), runs every dot as a warp-group MMA."""
    assert row["error"] is None, row
    assert row["spill_bytes"] == 0 and row["ctas_per_sm"] >= 1, row
    if row["kernel"] == DECODE:
        assert row["kv_stages"] >= 2, row
        assert row["mma"] == ("wgmma" if row["arch"] >= 90 else "mma"), row


@pytest.fixture(scope="module")
def subset_rows():
    return compiled_rows(SUBSET)


def find(rows, config, arch) -> dict:
    (row,) = [r for r in rows if r["config"] == config and r["arch"] == arch]
    return row


def test_subset_rows_are_well_formed(subset_rows):
    assert sorted((r["config"], r["arch"]) for r in subset_rows) == sorted((c, a) for c in SUBSET for a in ARCHS)
    for row in subset_rows:
        assert_well_formed(row, ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", SUBSET)
def test_subset_meets_targets(subset_rows, config, arch):
    assert_meets_targets(find(subset_rows, config, arch))


def test_writer_row_has_no_dot_and_no_stream(subset_rows):
    row = find(subset_rows, "write-bf16", 90)
    assert row["kernel"] == "_write_latent_kernel" and row["error"] is None, row
    assert (row["mma"], row["kv_stages"]) == ("none", 0), row


def test_unknown_config_is_rejected():
    with pytest.raises(ValueError, match="no-such-config"):
        compiled_rows(["no-such-config"])


def test_spilling_kernel_shows_spills(toys):
    row = toys["spill-64x128-fp32-1warp"]
    assert row["registers"] == 255 and row["spill_bytes"] > 0, row


def test_tiny_kernel_shows_no_spills(toys):
    row = toys["copy-128"]
    assert 1 <= row["registers"] <= 64 and row["spill_bytes"] == 0, row
    assert (row["mma"], row["kv_stages"], row["shared_bytes"]) == ("none", 0, 0), row


@pytest.mark.parametrize(
    "toy, kind",
    [
        pytest.param("dot-sm90-64rows", "wgmma", id="sm90-64rows-4warps-wgmma"),
        pytest.param("dot-sm80-64rows", "mma", id="sm80-mma"),
        pytest.param("dot-sm90-16rows", "mma", id="sm90-16rows-mma"),
        pytest.param("dot-sm90-fp32-ieee", "none", id="sm90-fp32-ieee-fma"),
    ],
)
def test_mma_kind(toys, toy, kind):
    assert toys[toy]["mma"] == kind, toys[toy]


@pytest.mark.parametrize(
    "toy, stages",
    [
        pytest.param("cp-async-sm80-3stages", 2, id="cp-async-sm80-3stages"),
        pytest.param("cp-async-sm90-3stages", 3, id="cp-async-sm90-3stages"),
        pytest.param("cp-async-sm90-1stage", 0, id="not-pipelined"),
        pytest.param("tma-sm90-3stages", 3, id="tma-sm90-3stages"),
        pytest.param("tma-sm90-1stage", 1, id="tma-one-buffer"),
    ],
)
def test_kv_stages_counts_the_ring(toys, toy, stages):
    assert toys[toy]["kv_stages"] == stages, toys[toy]


# The shape of the FP8 decode loop (lines as Triton 3.7 prints them): a 2-buffer cp.async ring
# for a [32, 64] bf16 tile and a plain load of a [32, CODES] fp8 tile.
MIXED_LOOP_TTGIR = """
    %ring = ttg.local_alloc : () -> !ttg.memdesc<2x32x64xbf16, #shared1, #smem, mutable> loc(#loc1)
    %r:2 = scf.for %n = %c0_i32 to %n_end step %c32_i32 iter_args(%a = %cst) -> (tensor<32x512xf32, #mma>)  : i32 {
      %code = tt.load %p_code, %m_kv, %cst_5 : tensor<32xCODESx!tt.ptr<f8E4M3FN>, #blocked> loc(#loc2)
      %buf = ttg.memdesc_index %ring[%i] : !ttg.memdesc<2x32x64xbf16, #shared1, #smem, mutable> -> !ttg.memdesc<32x64xbf16, #shared1, #smem, mutable> loc(#loc3)
      %tok = ttg.async_copy_global_to_local %p_kr, %buf mask %m_kr other %cst_6 : tensor<32x64x!tt.ptr<bf16>, #blocked1> -> <32x64xbf16, #shared1, #smem, mutable> loc(#loc3)
      scf.yield %a : tensor<32x512xf32, #mma>
    } loc(#loc4)
"""


@pytest.mark.parametrize(
    "codes, stages",
    [
        pytest.param(512, 0, id="plain-16KB-load-outweighs-4KB-ring"),
        pytest.param(16, 2, id="4KB-ring-outweighs-512B-load"),
    ],
)
def test_kv_stages_follows_the_largest_tile(codes, stages):
    assert kv_stages(MIXED_LOOP_TTGIR.replace("CODES", str(codes))) == stages


@pytest.mark.parametrize(
    "registers, shared, warps, arch, ctas",
    [
        pytest.param(255, 75776, 4, 90, 2, id="255regs-4warps-registers-bound"),
        pytest.param(255, 75776, 4, 89, 1, id="74KB-sm89-shared-bound"),
        pytest.param(32, 0, 4, 90, 16, id="small-sm90-thread-bound"),
        pytest.param(32, 0, 4, 89, 12, id="small-sm89-1536-threads"),
        pytest.param(16, 0, 1, 90, 32, id="one-warp-cta-cap"),
        pytest.param(64, 102400, 4, 89, 0, id="over-sm89-cta-shared"),
        pytest.param(33, 0, 8, 80, 6, id="33regs-round-up-to-40"),
    ],
)
def test_ctas_per_sm(registers, shared, warps, arch, ctas):
    assert ctas_per_sm(registers, shared, warps, arch) == ctas


@pytest.mark.slow
def test_full_list_meets_targets():
    rows = compiled_rows()
    assert sorted((r["config"], r["arch"]) for r in rows) == sorted((c, a) for c in CONFIGS for a in ARCHS)
    for row in rows:
        assert_well_formed(row, ARCHS)
        assert_meets_targets(row)
