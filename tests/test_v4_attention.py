"""`mla.v4_attention.V4Attention` (cache-free) against transformers' DeepseekV4Attention, the
compressor pooling against its definition, causality, and bad input."""

import math

import pytest
import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding

from mla.v4 import CSA, HCA, SLIDING, V4Config
from mla.reference.compressor import pool
from mla.v4_attention import V4Attention

# tiny tensors: intra-op threads only add synchronisation on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    num_hidden_layers=3,
    layer_types=(SLIDING, CSA, HCA),
    compress_rates={CSA: 4, HCA: 8},
    head_dim=32,
    rope_dim=8,
    num_heads=4,
    sliding_window=8,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=3,
    hidden_size=48,
    q_lora_rank=24,
    o_groups=2,
    o_lora_rank=16,
    compress_rope_theta=40000.0,
    rope_scaling={"factor": 4, "original_max_position_embeddings": 16},
)
LAYER = {SLIDING: 0, CSA: 1, HCA: 2}
SEQ = 37  # 9 CSA entries, 4 HCA entries, a partial window of each left open


def tiny(**changes) -> V4Config:
    return V4Config(**{**TINY, **changes})


def hf_attention(config: V4Config, kind: str, seed: int = 0) -> DeepseekV4Attention:
    """transformers' layer of `kind` with random weights (float32; sinks and gate biases far from 0)."""
    hf_config = DeepseekV4Config(**config.hf_kwargs())
    hf_config._attn_implementation = "eager"  # the only one it has
    module = DeepseekV4Attention(hf_config, LAYER[kind])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 2 and not name.endswith("position_bias"):
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[1]))
            else:  # sinks, position_bias
                p.copy_(torch.randn(p.shape, generator=generator))
    return module.eval()


def hf_model(config: V4Config, vocab: int = 97):
    """A transformers DeepseekV4ForCausalLM with this attention config: MoE of 4 experts, 2
    hyper-connection streams, float32 eager, seed 7; sinks and gate biases N(0, 0.5) (zero at
    init: make them matter)."""
    from transformers import DeepseekV4ForCausalLM

    hf_config = DeepseekV4Config(
        **config.hf_kwargs(), vocab_size=vocab, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
        hc_mult=2, mlp_layer_types=["moe"] * config.num_hidden_layers,
    )  # fmt: skip
    hf_config._attn_implementation = "eager"
    torch.manual_seed(7)
    model = DeepseekV4ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                p.normal_(0, 0.5)
    return model


def hf_forward(module: DeepseekV4Attention, x: torch.Tensor) -> torch.Tensor:
    """What DeepseekV4Model hands one attention layer for a whole sequence, without a cache."""
    b, s, _ = x.shape
    positions = torch.arange(s)[None].expand(b, s)
    rotary = DeepseekV4RotaryEmbedding(module.config).to(x.dtype)
    tables = {kind: rotary(x, positions, layer_type=kind) for kind in ("main", "compress")}
    offset = torch.arange(s)[:, None] - torch.arange(s)[None]
    window = (offset >= 0) & (offset < module.config.sliding_window)
    mask = torch.zeros(s, s, dtype=x.dtype).masked_fill(~window, -math.inf).expand(b, 1, s, s)
    return module(x, position_embeddings=tables, position_ids=positions, attention_mask=mask)[0]


def stable_topk(self, k, dim=-1, largest=True, sorted=True):
    """torch.topk with ties to the lower index (a stable sort)."""
    values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


def assert_close(actual, expected, bound, what):
    err = (actual.double() - expected.double()).abs()
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= bound, (
        f"{what}: max abs error {worst:.3g} > {bound:.3g} at {tuple(torch.nonzero(err == worst)[0].tolist())}; "
        f"{int((err > bound).sum())} of {err.numel()} elements over"
    )


SPARSE_CASES = [
    pytest.param(SLIDING, 3, False, id="sliding"),
    pytest.param(HCA, 3, False, id="hca-m8"),
    pytest.param(CSA, 16, False, id="csa-m4-topk16-dense"),
    pytest.param(CSA, 3, True, id="csa-m4-topk3-sparse-stable-hf"),
    pytest.param(CSA, 1, True, id="csa-m4-topk1-sparse-stable-hf"),
]
LOW_PRECISION_CASES = [
    # not sparse CSA: a bfloat16 near-tie may choose another entry than float64 does
    pytest.param(*p.values, torch.bfloat16, id=f"{p.id}-bf16")
    for p in SPARSE_CASES[:3]
]


@pytest.mark.parametrize(
    "kind, topk, stable, dtype",
    [pytest.param(*p.values, dtype, id=f"{p.id}-{name}") for p in SPARSE_CASES
     for dtype, name in ((torch.float32, "f32"), (torch.float64, "f64"))] + LOW_PRECISION_CASES,
)  # fmt: skip
def test_matches_transformers(kind, topk, stable, dtype, monkeypatch):
    """One-shot forward equals transformers' on the same weights: against transformers in
    float64, our error may be at most twice transformers' own error in the same dtype (float32
    for our float64: its norms and index scores run in float32 even in float64). With sparsity
    active (index_topk below the 9 entries), transformers' torch.topk is made stable: its tie
    order is what differs."""
    if stable:
        monkeypatch.setattr(torch.Tensor, "topk", stable_topk)
    config = tiny(index_topk=topk)
    hf = hf_attention(config, kind)
    x = torch.randn(2, SEQ, config.hidden_size, generator=torch.Generator().manual_seed(1))
    low = torch.float32 if dtype == torch.float64 else dtype
    with torch.no_grad():
        expected = hf_forward(hf.double(), x.double())
        hf_error = (hf_forward(hf.to(low), x.to(low)) - expected).abs().max().item()
        ours = V4Attention.from_hf(hf.to(dtype))(x.to(dtype))
    assert ours.dtype == dtype and ours.shape == x.shape
    assert_close(ours, expected, 2 * hf_error, f"{kind} {dtype}")


def test_all_index_scores_tied_choose_the_lowest_entries(monkeypatch):
    """An indexer whose queries are 0 scores every entry 0.0: the choice is then the tie rule
    alone, and ours (the lowest visible entries) equals transformers' with a stable top-k."""
    monkeypatch.setattr(torch.Tensor, "topk", stable_topk)
    config = tiny(index_topk=2)
    hf = hf_attention(config, CSA)
    with torch.no_grad():
        hf.compressor.indexer.q_b_proj.weight.zero_()
    ours = V4Attention.from_hf(hf)
    x = torch.randn(1, SEQ, config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(ours(x), hf_forward(hf, x), 1e-5, "all scores tied")


@pytest.mark.parametrize("kind", [SLIDING, CSA, HCA], ids=["sliding", "csa-m4-topk2", "hca-m8"])
def test_prefix_forward_equals_one_shot(kind):
    """Token t's output depends on tokens <= t only, so a forward over any prefix gives the
    one-shot forward's rows: what the cached decode must reproduce step by step. Sparse CSA
    included (index_topk 2 of up to 9 entries), with ReLU's exact-zero ties."""
    config = tiny(index_topk=2)
    torch.manual_seed(3)
    module = V4Attention(config, LAYER[kind]).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(2, SEQ, config.hidden_size, dtype=torch.float64)
        full = module(x)
        for t in (1, 3, 4, 7, 8, 15, 16, 29):
            assert_close(module(x[:, :t]), full[:, :t], 1e-12, f"prefix of {t}")


def pool_by_definition(kv, gate, bias, overlap):
    """pool's docstring, one entry and one slot at a time."""
    b, s, width = kv.shape
    m = bias.shape[0]
    d = width // 2 if overlap else width
    out = torch.zeros(b, s // m, d, dtype=kv.dtype)
    for w in range(s // m):
        slots = [(t, slice(d, None), t - w * m) for t in range(w * m, (w + 1) * m)]
        if overlap:
            slots = [(t, slice(0, d), t - (w - 1) * m) for t in range((w - 1) * m, w * m) if t >= 0] + slots
        else:
            slots = [(t, slice(0, d), i) for t, _, i in slots]
        logits = torch.stack([gate[:, t, part] + bias[i, part] for t, part, i in slots])
        values = torch.stack([kv[:, t, part] for t, part, _ in slots])
        out[:, w] = (logits.softmax(dim=0) * values).sum(dim=0)
    return out


@pytest.mark.parametrize(
    "rate, overlap, s",
    [pytest.param(4, True, 18, id="csa-m4-s18"), pytest.param(3, False, 11, id="hca-m3-s11"),
     pytest.param(4, True, 3, id="csa-no-closed-window")],
)  # fmt: skip
def test_pool_matches_its_definition(rate, overlap, s):
    width = 2 * 6 if overlap else 6
    generator = torch.Generator().manual_seed(4)
    kv, gate = (torch.randn(2, s, width, dtype=torch.float64, generator=generator) for _ in range(2))
    bias = torch.randn(rate, width, dtype=torch.float64, generator=generator)
    pooled = pool(kv, gate, bias, overlap)
    assert pooled.shape == (2, s // rate, width // (2 if overlap else 1))
    assert_close(pooled, pool_by_definition(kv, gate, bias, overlap), 1e-14, "pooling")


def test_trains():
    """The path is differentiable: every parameter of a CSA layer gets a finite gradient
    except the indexer's (a discrete choice, as in DeepSeek's training)."""
    torch.manual_seed(5)
    module = V4Attention(tiny(), LAYER[CSA])
    module(torch.randn(1, 20, TINY["hidden_size"])).square().sum().backward()
    for name, p in module.named_parameters():
        if ".indexer." in name:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.isfinite().all(), name


def test_from_hf_loads_every_parameter():
    config = tiny()
    for kind in (SLIDING, CSA, HCA):
        hf = hf_attention(config, kind)
        ours = V4Attention.from_hf(hf)
        assert ours.state_dict().keys() == hf.state_dict().keys()
        assert ours.kind == kind and ours.config == config


@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(lambda m: m(torch.randn(2, 5)), ValueError, r"\[b, s, hidden_size\].*\(2, 5\)", id="rank-2"),
        pytest.param(lambda m: m(torch.randn(1, 5, 7)), ValueError, "hidden size 7.*hidden_size=48", id="width"),
        pytest.param(lambda m: m(torch.randn(1, 0, 48)), ValueError, "no tokens", id="empty"),
        pytest.param(lambda m: m(torch.ones(1, 5, 48, dtype=torch.int64)), TypeError, "float.*int64", id="int-x"),
        pytest.param(lambda m: m(torch.randn(1, 5, 48), [0, 1]), TypeError, "positions.*list", id="pos-list"),
        pytest.param(lambda m: m(torch.randn(1, 5, 48), torch.zeros(1, 5)), TypeError, "float32", id="pos-float"),
        pytest.param(lambda m: m(torch.randn(1, 5, 48), torch.arange(4)[None]), ValueError, r"\(1, 4\)",
                     id="pos-shape"),
        pytest.param(lambda m: m(torch.randn(1, 5, 48), torch.arange(1, 6)[None]), ValueError,
                     r"0 \.\.\. 4.*\[\[1, 2, 3, 4, 5\]\]", id="hca-shifted-positions"),
    ],
)  # fmt: skip
def test_bad_input(call, error, match):
    module = V4Attention(tiny(), LAYER[HCA])
    with pytest.raises(error, match=match):
        call(module)


def test_sliding_layer_takes_any_positions():
    module = V4Attention(tiny(), LAYER[SLIDING])
    x = torch.randn(1, 5, 48)
    with torch.no_grad():
        shifted = module(x, torch.arange(100, 105)[None])
    assert shifted.isfinite().all() and not torch.allclose(shifted, module(x))


@pytest.mark.parametrize(
    "make, error, match",
    [
        pytest.param(lambda: V4Attention(TINY, 0), TypeError, "V4Config, got dict", id="config-dict"),
        pytest.param(lambda: V4Attention(tiny(), 3), ValueError, r"\[0, 3\), got 3", id="layer-past-end"),
        pytest.param(lambda: V4Attention(tiny(), True), ValueError, "got True", id="layer-bool"),
        pytest.param(lambda: tiny(o_groups=3), ValueError, "o_groups=3 .* 128", id="o-groups-divide"),
        pytest.param(lambda: tiny(q_lora_rank=0), ValueError, "q_lora_rank .* got 0", id="q-lora-0"),
        pytest.param(lambda: tiny(rms_norm_eps=0.0), ValueError, "rms_norm_eps .* got 0.0", id="eps-0"),
        pytest.param(lambda: tiny(rope_theta=float("inf")), ValueError, "rope_theta .* inf", id="theta-inf"),
        pytest.param(lambda: tiny(rope_scaling=16), ValueError, "rope_scaling .* got 16", id="scaling-int"),
        pytest.param(lambda: tiny(rope_scaling={"factor": 16}), ValueError, "original_max_position_embeddings",
                     id="scaling-no-original"),
        pytest.param(lambda: tiny(rope_scaling={"type": "linear", "factor": 2}), ValueError, "'linear'",
                     id="scaling-linear"),
        pytest.param(lambda: tiny(rope_scaling={**TINY["rope_scaling"], "mscale": 1}), ValueError, r"\['mscale'\]",
                     id="scaling-mscale"),
    ],
)  # fmt: skip
def test_bad_config(make, error, match):
    with pytest.raises(error, match=match):
        make()


YARN = {"rope_type": "yarn", "rope_theta": 1e5, "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize(
    "rope_parameters, match",
    [
        pytest.param({"main": {**YARN, "rope_theta": 1e4}, "compress": {"rope_type": "default", "rope_theta": 1e5}},
                     "sliding layers use plain RoPE", id="scaled-main"),
        pytest.param({"main": {"rope_type": "default", "rope_theta": 1e4},
                      "compress": {**YARN, "attention_factor": 1.2}}, "without attention_factor", id="yarn-mscale"),
    ],
)  # fmt: skip
def test_from_hf_rejects_rope_v4_does_not_use(rope_parameters, match):
    hf_config = DeepseekV4Config(**{**tiny().hf_kwargs(), "rope_parameters": rope_parameters})
    with pytest.raises(ValueError, match=match):
        V4Config.from_hf(hf_config)


def test_transformers_cached_decode_equals_its_one_shot_once_topk_is_stable(monkeypatch):
    """The evidence for the module docstring's tie finding, kept as a check: a tiny CSA model
    of transformers (index_topk 3 of up to 10 entries) decodes token by token exactly as its
    one-shot forward once `Tensor.topk` breaks ties to the lower index. With torch.topk this
    seed's steps differ by 0.04 (torch 2.13 on CPU): a zero score tied at the k-th place."""
    monkeypatch.setattr(torch.Tensor, "topk", stable_topk)
    model = hf_model(tiny(num_hidden_layers=2, layer_types=(CSA, CSA)))  # transformers reads the HCA rate in CSA caches too
    with torch.no_grad():
        ids = torch.randint(0, 97, (1, 40))
        one_shot = model(ids, use_cache=False).logits
        out = model(ids[:, :20], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(20, 40):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    assert_close(torch.cat(steps, dim=1), one_shot, 1e-5, "cached decode vs one-shot")
