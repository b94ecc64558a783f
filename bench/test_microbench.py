"""pytest-benchmark cases: the decode kernel, the cache write and the module's decode step.

    pytest bench/ --benchmark-only

Each case stores its bytes (and FLOPs) by formula and the GB/s (TFLOP/s) of the median round
in `benchmark.extra_info`. On a GPU the timed function synchronises the device, so a round is
the kernel's whole run; without one the Triton kernels run through the interpreter on small
shapes (their times say nothing about a GPU, the cases check that the paths run and are timed).
"""

from __future__ import annotations

import pytest
import torch
from mla.kernels import flash_mla_with_kvcache, get_mla_metadata, write_latent, write_latent_fp8
from mla.reference.quant import quantize_latent_fp8

from bench.decode import DV, D, decode_bytes, decode_flops, make_decode_inputs
from mla import LatentCache, MLAConfig, MLAttention
from mla import reference as ref
from mla.backend import interpreting
from mla.formats import Fp8Format, PlainFormat

ON_GPU = torch.cuda.is_available() and not interpreting()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
ROUNDS = 20 if ON_GPU else 3
FP8 = Fp8Format(DV, D - DV)  # 656 bytes per cached token

def _sync():
    if ON_GPU:
        torch.cuda.synchronize()

def _run(benchmark, fn, nbytes: int, flops: int = 0):
    """Time fn (synchronised) and record bytes, FLOPs, GB/s and TFLOP/s of the median round."""

    def timed():
        fn()
        _sync()

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(bytes=nbytes, gbps=nbytes / seconds / 1e9, device=str(DEVICE))
    if flops:
        benchmark.extra_info.update(flops=flops, tflops=flops / seconds / 1e12)
    assert benchmark.extra_info["gbps"] > 0

DECODE_SHAPES = (
    [
        pytest.param(64, 4096, 16, 1, id="b64-sk4096-h16-sq1"),
        pytest.param(64, 4096, 128, 2, id="b64-sk4096-h128-sq2"),
        pytest.param(1, 65536, 128, 1, id="b1-sk65536-h128-sq1"),
    ]
    if ON_GPU
    else [
        pytest.param(1, 256, 16, 1, id="b1-sk256-h16-sq1"),
        pytest.param(2, 128, 16, 2, id="b2-sk128-h16-sq2"),
    ]
)

@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("b, s_k, h_q, s_q", DECODE_SHAPES)
def test_decode(benchmark, impl, kv_dtype, b, s_k, h_q, s_q):
    """flash_mla_with_kvcache over a full latent cache (576 channels, pages of 64, shuffled
    block table): bf16 rows, or FP8 rows of 656 bytes dequantized on load."""
    benchmark.group = f"decode b={b} s_k={s_k} h_q={h_q} s_q={s_q}"
    q, k_cache, block_table, lens = make_decode_inputs(b, s_q, h_q, s_k, device=DEVICE)
    fp8 = kv_dtype == "fp8"
    if fp8:
        k_cache = quantize_latent_fp8(k_cache[..., :DV], k_cache[..., DV:])
    causal = s_q > 1
    if impl == "triton":
        meta, splits = get_mla_metadata(lens, s_q * h_q, 1)

        def fn():
            flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits, causal=causal, is_fp8_kvcache=fp8)
    else:

        def fn():
            ref.flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, causal=causal, is_fp8_kvcache=fp8)

    nbytes = decode_bytes(b, s_q, h_q, s_k, FP8 if fp8 else PlainFormat(DV, D - DV, q.dtype), q.element_size())
    _run(benchmark, fn, nbytes, decode_flops(b, s_q, h_q, s_k, D, DV))

WRITE_TOKENS = [pytest.param(n, id=f"n{n}") for n in ((64, 4096) if ON_GPU else (64,))]
WRITERS = {
    ("triton", "bf16"): write_latent, ("reference", "bf16"): ref.write_latent,
    ("triton", "fp8"): write_latent_fp8, ("reference", "fp8"): ref.write_latent_fp8,
}  # fmt: skip

@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("n", WRITE_TOKENS)
def test_cache_write(benchmark, impl, kv_dtype, n):
    """n bf16 rows of 512 + 64 channels scattered to shuffled slots of a paged cache layer,
    stored as they are (bf16) or quantized to the 656-byte FP8 row."""
    benchmark.group = f"cache write n={n}"
    gen = torch.Generator().manual_seed(0)
    page = 64
    fmt = FP8 if kv_dtype == "fp8" else PlainFormat(DV, D - DV, torch.bfloat16)
    pages = fmt.allocate(4 * n // page + 1, page, DEVICE)
    slots = torch.randperm(pages.shape[0] * page, generator=gen)[:n].to(DEVICE)
    latent = torch.randn(n, DV, generator=gen).to(DEVICE, torch.bfloat16)
    k_pe = torch.randn(n, D - DV, generator=gen).to(DEVICE, torch.bfloat16)
    writer = WRITERS[impl, kv_dtype]
    # read the bf16 rows and the slots, write the stored rows
    nbytes = n * D * 2 + n * 8 + n * fmt.bytes_per_token
    _run(benchmark, lambda: writer(pages, slots, latent, k_pe), nbytes)

MODULE_CASES = (
    [pytest.param("deepseek_v3", 4096, torch.bfloat16, id="deepseek_v3-sk4096-bf16")]
    if ON_GPU
    else [pytest.param("deepseek_v2_lite", 1024, torch.float32, id="deepseek_v2_lite-sk1024-fp32")]
)

@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("preset, s_k, dtype", MODULE_CASES)
def test_module_decode_step(benchmark, preset, s_k, dtype, backend):
    """One `MLAttention` decode step (b = 1): projections, cache write, absorbed attention over
    s_k tokens, o_proj, with the given backend (attention and cache write). Bytes: the layer's
    weights and the cached latents."""
    benchmark.group = f"module decode {preset} s_k={s_k}"
    cfg = getattr(MLAConfig, preset)()
    torch.manual_seed(0)
    module = MLAttention(cfg, backend=backend).to(DEVICE, dtype).eval()
    cache = LatentCache(1, s_k // 64 + 1, 64, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=dtype, device=DEVICE,
                        backend=backend)
    sid = cache.add_sequence()
    n = s_k - 1
    cache.reserve([sid], n)
    latent = torch.randn(n, cfg.kv_lora_rank, device=DEVICE, dtype=dtype)
    k_pe = torch.randn(n, cfg.qk_rope_head_dim, device=DEVICE, dtype=dtype)
    cache.write(0, cache.slot_mapping([sid], torch.arange(n)[None]), latent, k_pe)
    x = torch.randn(1, 1, cfg.hidden_size, device=DEVICE, dtype=dtype)
    position = torch.tensor([[n]], device=DEVICE)

    @torch.no_grad()
    def step():
        cache.reserve([sid], 1)
        module(x, position, cache, [sid])
        cache.truncate(sid, n)

    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    _run(benchmark, step, weights + s_k * cache.bytes_per_token)
