"""RoPE/YaRN and MLAttention against transformers' DeepseekV2/V3 attention, on the paged cache.

transformers' attention recomputes the whole causal sequence; ours runs the same tokens in
steps through the latent cache (prefill, token-by-token decode, multi-token decode, chunked
prefill), with two sequences of different lengths sharing a batch. Every new token's output
must equal transformers' output at that position.
"""

import copy

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from mla import LatentCache, MLAConfig, MLAttention
from mla.rope import RotaryEmbedding, apply_rope, rope_frequencies, softmax_scale
from tests.utils import assert_close, max_error, randomize_

# YaRN with a ramp inside the 8 frequency pairs (dims 1..5 blend) and both mscales active.
YARN = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 4, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 1.2}  # fmt: skip
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 100.0}
# LatentCache stores at most float32, so float64 modules keep a float32 cache.
CACHE_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float32}
VARIANTS = {
    "base": {},
    "no-q-lora": {"q_lora_rank": None},
    "yarn": {"rope_parameters": YARN},
    "half-split": {"rope_interleave": False},
    "bias": {"attention_bias": True},
    "lite": {"q_lora_rank": None, "rope_parameters": YARN},
}
# A plan is a list of steps (rows, n): add the next n tokens of sequences `rows` in one call.
PLANS = {
    # the second prompt has <= 8 tokens, so it runs the absorbed (decode kernel) path on an empty cache
    "prefill": [((0,), 13), ((1,), 7)],
    "token-by-token": [((0,), 10), ((1,), 4)] + [((0, 1), 1)] * 6,
    "multi-token": [((0,), 9), ((1,), 3), ((0, 1), 3), ((0, 1), 2), ((1, 0), 8)],
    "chunked-prefill": [((0, 1), 12), ((1, 0), 10), ((0,), 9)],
}


def hf_attention(version: str, dtype: torch.dtype, layer_idx: int = 1, seed: int = 0, **overrides):
    """A transformers DeepseekV{2,3}Attention with random weights and perturbed norm weights."""
    kwargs = dict(
        hidden_size=64, num_attention_heads=3 if version == "v3" else 4, q_lora_rank=24, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24, max_position_embeddings=256,
        rope_parameters=dict(DEFAULT_ROPE), attn_implementation="eager",
    )  # fmt: skip
    kwargs.update(overrides)
    kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    if version == "v3":
        config, cls = DeepseekV3Config(**kwargs), hf_v3.DeepseekV3Attention
    else:
        kwargs.pop("rope_interleave", None)
        config, cls = DeepseekV2Config(**kwargs), hf_v2.DeepseekV2Attention
    module = cls(config, layer_idx).to(dtype)
    randomize_(module, seed)
    return module


def hf_forward(hf_attn, x: torch.Tensor) -> torch.Tensor:
    """transformers' output for one whole sequence x [T, hidden] -> [T, hidden] (causal, no cache)."""
    t = x.shape[0]
    positions = torch.arange(t)[None]
    mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None]
    with torch.no_grad():
        if isinstance(hf_attn, hf_v3.DeepseekV3Attention):
            rope = hf_v3.DeepseekV3RotaryEmbedding(hf_attn.config)(x[None], positions)
        else:
            rope = hf_v2.DeepseekV2RotaryEmbedding(hf_attn.config)(x[None], positions)
        out, _ = hf_attn(hidden_states=x[None], position_embeddings=rope, attention_mask=mask)
    return out[0]


def plan_lengths(plan) -> list[int]:
    lengths = [0, 0]
    for rows, n in plan:
        for r in rows:
            lengths[r] += n
    return lengths


def new_cache(config: MLAConfig, dtype: torch.dtype, lengths, page_size: int = 4, num_layers: int = 2) -> LatentCache:
    """A cache with room for `lengths` plus spare pages, every slot NaN so a read of an unwritten
    slot poisons the output."""
    pages = sum(-(-n // page_size) for n in lengths) + 3
    cache = LatentCache(num_layers, pages, page_size, config.kv_lora_rank, config.qk_rope_head_dim, dtype=dtype,
                        backend="reference")  # fmt: skip
    for layer in cache.pages:
        layer.fill_(float("nan"))
    return cache


def run_plan(module: MLAttention, xs, plan, cache: LatentCache) -> list[torch.Tensor]:
    """Feed sequences xs (each [T_i, hidden]) through `module` step by step; outputs [T_i, hidden]."""
    ids = [cache.add_sequence() for _ in xs]
    done, outs = [0] * len(xs), [[] for _ in xs]
    with torch.no_grad():
        for rows, n in plan:
            sids = [ids[r] for r in rows]
            cache.reserve(sids, n)
            x = torch.stack([xs[r][done[r] : done[r] + n] for r in rows])
            positions = torch.stack([torch.arange(done[r], done[r] + n) for r in rows])
            y = module(x, positions, cache, sids)
            for k, r in enumerate(rows):
                outs[r].append(y[k])
                done[r] += n
    return [torch.cat(o) for o in outs]


# Tolerance rule: transformers in float64 is the expected value; our error against it may be
# at most 3x transformers' own float32 error against it. float64 transformers is not exact
# (its eager softmax and RMSNorm run in float32), so our float32 error (~1x) plus its own
# (<= 1x) gives up to ~2x; measured worst 1.7x. Our float64 module is held to the same bound:
# the cache stores float32 (measured <= 0.8x). A wrong mask, scale or rope layout is > 1000x.
HF_ERROR_FACTOR = 3.0


def assert_close_rel(name, actual, expected, rel_tol):
    """|actual - expected| <= rel_tol * max|expected|."""
    assert_close(name, actual, expected, atol=rel_tol * expected.abs().max().item())


def assert_matches_hf(name, actual, hf32, x):
    """`actual` (our output for sequence x [T, hidden]) against float64 transformers, within
    HF_ERROR_FACTOR x float32 transformers' own error."""
    hf64 = copy.deepcopy(hf32).double()
    expected = hf_forward(hf64, x.double())
    own_error = max_error(hf_forward(hf32, x.float()), expected)
    assert_close(name, actual, expected, atol=HF_ERROR_FACTOR * own_error)


CASES = (
    [("v3", dt, "base", plan) for dt in (torch.float32, torch.float64) for plan in PLANS]
    + [("v3", torch.float32, v, plan)
       for v in ("no-q-lora", "yarn", "half-split") for plan in ("token-by-token", "chunked-prefill")]
    + [("v3", torch.float64, "yarn", "multi-token"), ("v3", torch.float32, "bias", "multi-token")]
    + [("v2", dt, "base", plan) for dt in (torch.float32, torch.float64) for plan in ("multi-token", "chunked-prefill")]
    + [("v2", torch.float32, "lite", plan) for plan in ("prefill", "token-by-token")]
)  # fmt: skip


@pytest.mark.parametrize(
    "version, dtype, variant, plan",
    [pytest.param(*c, id=f"{c[0]}-{c[2]}-{c[3]}-{str(c[1])[6:]}") for c in CASES],
)
def test_matches_transformers(version, dtype, variant, plan):
    hf = hf_attention(version, torch.float32, **VARIANTS[variant])
    ours = MLAttention.from_hf(hf).to(dtype)
    steps = PLANS[plan]
    lengths = plan_lengths(steps)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 64, generator=g, dtype=torch.float64).to(dtype) for n in lengths]
    outs = run_plan(ours, xs, steps, new_cache(ours.config, CACHE_DTYPE[dtype], lengths))
    for i, (x, out) in enumerate(zip(xs, outs)):
        assert_matches_hf(f"sequence {i}", out, hf, x)


def test_absorbed_weights_are_views_that_follow_weight_changes():
    first = hf_attention("v3", torch.float32, seed=0)
    ours = MLAttention.from_hf(first)
    w_uk, w_uv = ours.absorbed_weights()
    assert w_uk.data_ptr() == ours.kv_b_proj.weight.data_ptr() and w_uv._base is ours.kv_b_proj.weight
    steps = PLANS["token-by-token"]
    lengths = plan_lengths(steps)
    xs = [torch.randn(n, 64) for n in lengths]

    def check(hf):
        dtype = ours.kv_b_proj.weight.dtype
        cache = new_cache(ours.config, torch.float32, lengths)
        outs = run_plan(ours, [x.to(dtype) for x in xs], steps, cache)
        for out, x in zip(outs, xs):
            assert_matches_hf("after weight change", out, hf, x)

    check(first)
    second = hf_attention("v3", torch.float32, seed=1)
    ours.load_state_dict(second.state_dict())  # in place: the cached views see the new values
    check(second)
    third = hf_attention("v3", torch.float32, seed=2)
    ours.load_state_dict(third.state_dict(), assign=True)  # new tensors: views must be remade
    check(third)
    assert ours.absorbed_weights()[0].data_ptr() == ours.kv_b_proj.weight.data_ptr()
    ours.double()
    check(third)
    assert ours.absorbed_weights()[0].dtype == torch.float64


@pytest.fixture
def triton_kernels():
    try:
        import mla.kernels  # noqa: F401
    except Exception as e:  # the kernel package is optional on the CPU
        pytest.skip(f"mla.kernels does not import: {type(e).__name__}: {e}")


# Reference and kernel read the same cache and round their output to the cache dtype. In
# float32 they differ by summation order only (measured up to 7.4e-7 * max|out|). In bfloat16
# an element of the kernel's [b, s, h, r] output may round one bf16 ulp (2^-8 relative) the
# other way (measured 3e-4 * max|out| after W_UV and o_proj); the bound is a whole ulp at the
# output's largest magnitude. A wrong page, mask or scale is off by O(max|out|).
TRITON_REL_TOL = {torch.float32: 5e-6, torch.bfloat16: 2**-8}


@pytest.mark.parametrize(
    "cache_dtype", [pytest.param(torch.float32, id="cache-fp32"), pytest.param(torch.bfloat16, id="cache-bf16")]
)
def test_triton_decode_matches_reference(triton_kernels, nan_empty, cache_dtype):
    hf = hf_attention("v3", torch.float32, **VARIANTS["yarn"])
    kernel, reference = MLAttention.from_hf(hf, backend="triton"), MLAttention.from_hf(hf, backend="reference")
    steps = [((0,), 11), ((1,), 2), ((0, 1), 1), ((1, 0), 3), ((0, 1), 8), ((0, 1), 1)]
    lengths = plan_lengths(steps)
    xs = [torch.randn(n, 64) for n in lengths]
    got = run_plan(kernel, xs, steps, new_cache(kernel.config, cache_dtype, lengths, page_size=3))
    want = run_plan(reference, xs, steps, new_cache(reference.config, cache_dtype, lengths, page_size=3))
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close_rel(f"sequence {i}", a, b, TRITON_REL_TOL[cache_dtype])


@pytest.mark.parametrize("interpret, backend", [("0", "reference"), ("1", "triton")])
def test_backend_rule_on_cpu(monkeypatch, triton_kernels, interpret, backend):
    """backend=None follows mla.backend's rule for writes and attention alike: on CPU tensors the
    Triton kernels under the interpreter, the references without it."""
    import mla.kernels

    import mla.ops

    calls = []
    for module, name, kind in [(mla.ops, "run_decode", "reference"), (mla.kernels, "flash_mla_with_kvcache", "triton"),
                               (mla.ops.reference_cache, "write_rows", "reference"), (mla.kernels.cache, "launch", "triton")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, kind=kind, **k: calls.append(kind) or real(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    ours = MLAttention.from_hf(hf_attention("v3", torch.float32))
    cache = new_cache(ours.config, torch.float32, [3, 2])
    cache.backend = None
    run_plan(ours, [torch.randn(3, 64), torch.randn(2, 64)], [((0, 1), 2), ((0,), 1)], cache)
    # two writes; one absorbed decode: the first step starts from an empty cache, which the cost model decompresses
    assert set(calls) == {backend} and len(calls) == 3


def _setup(layer_idx=0, **cache_changes):
    config = MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=16, v_head_dim=16)  # fmt: skip
    module = MLAttention(config, layer_idx)
    dims = {"num_layers": 1, "kv_lora_rank": 32, "rope_dim": 16, **cache_changes}
    cache = LatentCache(dims["num_layers"], 8, 4, dims["kv_lora_rank"], dims["rope_dim"], dtype=torch.float32)
    ids = [cache.add_sequence(), cache.add_sequence()]
    cache.reserve(ids, 3)
    return module, cache, ids


def _positions():
    return torch.arange(3).expand(2, 3)


@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(lambda m, c, i: m(torch.randn(2, 3, 48), _positions(), c, i), ValueError, "hidden size 48",
                     id="wrong-hidden-size"),
        pytest.param(lambda m, c, i: m(torch.randn(2, 3), _positions(), c, i), ValueError, r"\[b, s, hidden_size\]",
                     id="hidden-2d"),
        pytest.param(lambda m, c, i: m(torch.randn(2, 3, 64), torch.arange(3)[None], c, i), ValueError,
                     "positions must have shape", id="positions-shape"),
        pytest.param(lambda m, c, i: m(torch.randn(2, 3, 64), _positions().float(), c, i), TypeError,
                     "integer", id="positions-float"),
        pytest.param(lambda m, c, i: m(torch.randn(2, 3, 64), _positions() + 1, c, i), ValueError,
                     "last 3 positions", id="positions-not-last"),
        pytest.param(lambda m, c, i: m(torch.randn(2, 3, 64), _positions(), c, i[:1]), ValueError,
                     "1 ids for a batch of 2", id="seq-ids-short"),
        pytest.param(lambda m, c, i: m(torch.randn(2, 3, 64), _positions(), c, [i[0], i[0]]), ValueError,
                     "more than once", id="seq-ids-repeated"),
        pytest.param(lambda m, c, i: m(torch.randn(2, 4, 64), torch.arange(4).expand(2, 4), c, i), ValueError,
                     "reserve", id="not-reserved"),
        pytest.param(lambda m, c, i: m(torch.randn(2, 3, 64), _positions(), c, [i[0], 99]), ValueError,
                     "unknown sequence", id="unknown-seq-id"),
    ],
)  # fmt: skip
def test_bad_inputs_raise(call, error, match):
    module, cache, ids = _setup()
    with pytest.raises(error, match=match):
        call(module, cache, ids)


@pytest.mark.parametrize(
    "layer_idx, cache_changes, match",
    [
        pytest.param(0, {"kv_lora_rank": 40, "rope_dim": 8}, "kv_lora_rank is 40", id="other-kv-lora-rank"),
        pytest.param(0, {"rope_dim": 32}, "rope_dim is 32", id="other-rope-dim"),
        pytest.param(2, {"num_layers": 2}, "cache has 2 layers, the model needs 3", id="too-few-layers"),
    ],
)
def test_cache_for_another_config_raises(layer_idx, cache_changes, match):
    module, cache, ids = _setup(layer_idx, **cache_changes)
    with pytest.raises(ValueError, match=match):
        module(torch.randn(2, 3, 64), _positions(), cache, ids)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"backend": "cuda"}, "backend", id="unknown-backend"),
        pytest.param({"layer_idx": -1}, "layer_idx", id="negative-layer"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLAttention(MLAConfig(hidden_size=64, num_heads=4, kv_lora_rank=32, qk_rope_head_dim=16), **kwargs)


@pytest.mark.parametrize(
    "rope",
    [
        pytest.param(DEFAULT_ROPE, id="default"),
        pytest.param(YARN, id="yarn-tiny"),
        pytest.param({**YARN, "mscale": 0.0}, id="yarn-no-mscale"),
        pytest.param({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                      "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                      "mscale_all_dim": 1.0}, id="yarn-v3"),
    ],
)  # fmt: skip
def test_rope_matches_transformers(rope):
    hf_config = DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=64,
                                 max_position_embeddings=163840, rope_parameters=dict(rope))  # fmt: skip
    config = MLAConfig.from_hf(hf_config)
    if rope["rope_type"] == "default":
        want_freq, want_factor = hf_v3.DeepseekV3RotaryEmbedding.compute_default_rope_parameters(hf_config)
    else:
        want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    freq, factor = rope_frequencies(config)
    assert torch.equal(freq, want_freq)
    assert factor == pytest.approx(want_factor, rel=1e-15)

    positions = torch.tensor([[0, 1, 7, 4095], [4096, 65536, 163839, 3]])
    cos, sin = RotaryEmbedding(config)(positions)
    want_cos, want_sin = hf_v3.DeepseekV3RotaryEmbedding(hf_config)(torch.zeros(1), positions)
    assert torch.equal(cos, want_cos[..., :32]) and torch.equal(sin, want_sin[..., :32])
    assert softmax_scale(config) == pytest.approx(hf_v3.DeepseekV3Attention(hf_config, 0).scaling, rel=1e-15)


@pytest.mark.parametrize("layout", ["interleave", "half-split", "v2-complex"])
def test_apply_rope_matches_transformers(layout):
    hf_config = DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16, rope_parameters=dict(YARN))
    rotary = RotaryEmbedding(MLAConfig.from_hf(hf_config))
    positions = torch.randint(0, 300, (2, 5))
    q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 1, 5, 16)  # transformers' [b, heads, s, d]
    cos, sin = rotary(positions)
    got_q = apply_rope(q, cos[:, None], sin[:, None], interleave=layout != "half-split")
    got_k = apply_rope(k, cos[:, None], sin[:, None], interleave=layout != "half-split")
    if layout == "v2-complex":
        v2_config = DeepseekV2Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16,
                                     rope_parameters=dict(YARN))  # fmt: skip
        freqs_cis = hf_v2.DeepseekV2RotaryEmbedding(v2_config)(q, positions)
        want_q, want_k = hf_v2.apply_rotary_emb(q, k, freqs_cis)
        # transformers' V2 leaves the pairs interleaved; ours are half-split
        want_q, want_k = (w.unflatten(-1, (8, 2)).transpose(-1, -2).flatten(-2) for w in (want_q, want_k))
        atol = 1e-6  # complex64 products round differently from the real form
    else:
        hf_cos, hf_sin = hf_v3.DeepseekV3RotaryEmbedding(hf_config)(q, positions)
        apply = hf_v3.apply_rotary_pos_emb_interleave if layout == "interleave" else hf_v3.apply_rotary_pos_emb
        want_q, want_k = apply(q, k, hf_cos, hf_sin)
        atol = 0.0
    assert_close("q", got_q, want_q, atol=atol)
    assert_close("k", got_k, want_k, atol=atol)
