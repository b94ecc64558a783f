"""mla.hf.patch: transformers' DeepSeek-V2/V3 attention decoding in latent space.

Every test compares a patched model with an unpatched deep copy holding the same weights.
Weights are re-drawn at unit scale (transformers' 0.02 init gives near-uniform attention,
which would hide a wrong score) and norm weights are perturbed away from 1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from mla import hf

from .utils import assert_close, max_error

VOCAB = 97
PAD = 0
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _common(attn: str, yarn: bool, q_lora_rank: int | None) -> dict:
    # Awkward, unequal head dims (qk_nope 16, rope 8, v 12) so a swapped W_UK/W_UV split fails.
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=128,
        rope_parameters=YARN if yarn else DEFAULT_ROPE,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=None,
        attn_implementation=attn,
    )


def _v3(attn="sdpa", yarn=False, interleave=True, q_lora_rank=24):
    # first_k_dense_replace = num layers: dense MLPs, so expert routing cannot amplify rounding.
    config = DeepseekV3Config(
        **_common(attn, yarn, q_lora_rank),
        rope_interleave=interleave,
        first_k_dense_replace=2,
        moe_intermediate_size=32,
    )
    return DeepseekV3ForCausalLM(config)


def _v2(attn="sdpa", yarn=False, q_lora_rank=None):
    # Layer 1 is a small MoE (4 experts, top 2); eager experts also run in float64 (grouped_mm does not).
    config = DeepseekV2Config(
        **_common(attn, yarn, q_lora_rank),
        experts_implementation="eager",
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=32,
    )
    return DeepseekV2ForCausalLM(config)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _pair(build, seed=0, dtype=torch.float32):
    """(unpatched, patched) models with identical weights."""
    plain = _randomize(build(), seed).to(dtype)
    return plain, hf.patch(copy.deepcopy(plain))


def _prompt(batch: int, length: int, pads: list[int], seed: int):
    """Left-padded prompt: row i starts with pads[i] pad tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n] = PAD
        mask[row, :n] = 0
    return ids, mask


def _attentions(model):
    return [m for m in model.modules() if isinstance(m, (DeepseekV2Attention, DeepseekV3Attention))]


def _spy(model, monkeypatch) -> dict:
    """Count expand_kv (the naive path) and _attend_absorbed calls on every attention module."""
    calls = {"expand_kv": 0, "absorbed": 0}
    for module in _attentions(model):
        for attr, key in (("expand_kv", "expand_kv"), ("_attend_absorbed", "absorbed")):
            bound = getattr(module, attr)

            def counted(*args, _bound=bound, _key=key, **kwargs):
                calls[_key] += 1
                return _bound(*args, **kwargs)

            monkeypatch.setattr(module, attr, counted)
    return calls


MODELS = [
    pytest.param(lambda: _v3("sdpa", yarn=True, interleave=True), id="v3-sdpa-yarn-interleave"),
    pytest.param(lambda: _v3("eager", interleave=False), id="v3-eager-rotate_half"),
    pytest.param(lambda: _v3("sdpa", interleave=False, q_lora_rank=None), id="v3-sdpa-q_proj"),
    pytest.param(lambda: _v2("sdpa", yarn=True), id="v2-sdpa-yarn-moe"),
    pytest.param(lambda: _v2("eager", q_lora_rank=24), id="v2-eager-q_lora-moe"),
]


@pytest.mark.parametrize("build", MODELS)
@pytest.mark.parametrize(
    "prompt_len, pad, cache_impl",
    [
        pytest.param(20, 5, "dynamic", id="prefill20-leftpad5-dynamic"),
        pytest.param(9, 5, "dynamic", id="prefill9-leftpad5-dynamic"),
        pytest.param(9, 0, "dynamic", id="prefill9-nopad-dynamic"),
        pytest.param(20, 5, "static", id="prefill20-leftpad5-static"),
    ],
)
def test_generate_greedy_matches_unpatched(build, prompt_len, pad, cache_impl, monkeypatch):
    """Batch 2, 16 greedy tokens: identical to the unpatched model, every decode step absorbed.
    A 20-token prompt prefills naively (one expand_kv per layer, nothing after); a 9-token one
    (<= 16) prefills absorbed too: with left padding through the causal + padding mask, whose
    pad-query rows are fully masked; without, SDPA gets no mask at all (its `is_causal` case).
    The static cache returns its whole zero-filled buffer, which only the mask hides."""
    plain, patched = _pair(build, seed=prompt_len + pad)
    ids, mask = _prompt(2, prompt_len, [0, pad], seed=1)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, cache_implementation=cache_impl)
    calls = _spy(patched, monkeypatch)
    with torch.no_grad():
        expected = plain.generate(ids, **kwargs)
        actual = patched.generate(ids, **kwargs)
    assert torch.equal(actual, expected), f"new tokens {actual[:, prompt_len:]} != {expected[:, prompt_len:]}"
    layers = len(_attentions(patched))
    naive_prefill = prompt_len > hf.DEFAULT_MAX_ABSORBED_QUERY_LEN
    assert calls["expand_kv"] == (layers if naive_prefill else 0)
    assert calls["absorbed"] == layers * (15 if naive_prefill else 16)


def _steps(model, ids, mask, new_ids):
    """Prefill `ids`, then three cached steps; returns their logits [b, s, vocab].

    Steps: one token; four tokens at once (a speculative-verification shape); crop the last
    three from the cache (rejected drafts) and decode one token on the cropped cache.
    """
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    out = []
    for n, crop in ((1, 0), (4, 3), (1, 0)):
        step, new_ids = new_ids[:, :n], new_ids[:, n:]
        mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
        positions = positions[:, -1:] + 1 + torch.arange(n)
        logits = model(input_ids=step, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits
        out.append(logits)
        if crop:
            cache.crop(-crop)
            mask, positions = mask[:, :-crop], positions[:, :-crop]
    return out


@pytest.mark.parametrize("build", MODELS)
def test_decode_logits_agree_to_float32_rounding(build):
    """Decode-step logits of the patched float32 model are as close to the float64 truth as the
    unpatched float32 model's: the absorbed and expanded forms are two float32 roundings of the
    same product, (W_UK^T q).c vs q.(W_UK c), so |patched32 - ref64| <= 2 * max|plain32 - ref64|
    plus 8 float32 ulps of the largest logit (that max over ~200 logits is a noisy estimate:
    measured ratios are 0.7-1.7; the bound is ~1e-5, a real defect moves logits by > 1e-3).
    In float64 the patched model agrees with the truth to 1e-10 (logits are O(1-10): ~1e5
    float64 ulps of slack for summation order, far below any real defect, which moves logits
    by > 1e-3). Both float64 models run SDPA: transformers' eager attention rounds its softmax
    to float32 even in a float64 model, where its finfo(float64).min mask then becomes -inf and
    left-pad rows NaN (which the naive prefill would put in the cache)."""
    ref64, patched64 = _pair(build, seed=3, dtype=torch.float64)
    plain32 = copy.deepcopy(ref64).float()
    patched32 = hf.patch(copy.deepcopy(ref64).float())
    ref64.set_attn_implementation("sdpa")
    patched64.set_attn_implementation("sdpa")
    ids, mask = _prompt(2, 20, [0, 7], seed=4)
    new_ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        truth = _steps(ref64, ids, mask, new_ids)
        plain = _steps(plain32, ids, mask, new_ids)
        absorbed = _steps(patched32, ids, mask, new_ids)
        absorbed64 = _steps(patched64, ids, mask, new_ids)
    for step, (t, p, a, a64) in enumerate(zip(truth, plain, absorbed, absorbed64)):
        own_error = max_error(p, t)
        assert own_error > 0, "float32 and float64 logits identical: the comparison would be vacuous"
        ulps = 8 * torch.finfo(torch.float32).eps * t.abs().max().item()
        assert_close(f"step {step} float32", a, t, atol=2 * own_error + ulps)
        assert_close(f"step {step} float64", a64, t, atol=1e-10)


def test_parameters_shared_and_unpatch():
    model = _randomize(_v3(), seed=6)
    before = {name: p for name, p in model.named_parameters()}
    state = model.state_dict()
    modules = _attentions(model)
    assert hf.patch(model) is model
    assert [type(m) for m in modules] == [hf.AbsorbedDeepseekV3Attention] * 2
    assert _attentions(model) == modules, "patch must convert the modules in place"
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    weight = modules[0].kv_b_proj.weight
    for view in modules[0].absorbed_weights():
        assert view.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr(), "W_UK/W_UV must be views"
    assert hf.patch(model, max_absorbed_query_len=4) is model and modules[0].max_absorbed_query_len == 4
    assert hf.unpatch(model) is model
    assert [type(m) for m in modules] == [DeepseekV3Attention] * 2
    assert "_absorbed_weights_value" not in vars(modules[0])


def test_absorbed_weights_follow_weight_changes():
    """The cached W_UK/W_UV views follow in-place edits, a replaced Parameter and a dtype move."""
    plain, patched = _pair(_v3, seed=7)
    ids, mask = _prompt(2, 20, [0, 3], seed=8)
    new_ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(10)

    # 1e-4: float32 logits of the two forms differ by ~3e-6 (see the test above); a stale W_UK/W_UV
    # (weights scaled by 1.5 or redrawn) moves them by O(0.1).
    def check(label, atol):
        with torch.no_grad():
            for step, (a, e) in enumerate(zip(_steps(patched, ids, mask, new_ids), _steps(plain, ids, mask, new_ids))):
                assert_close(f"{label} step {step}", a, e, atol=atol)

    check("initial", 1e-4)
    with torch.no_grad():
        for model in (plain, patched):
            model.model.layers[0].self_attn.kv_b_proj.weight.mul_(1.5)
    check("in place", 1e-4)
    new = torch.randn(plain.model.layers[1].self_attn.kv_b_proj.weight.shape, generator=gen) / 32**0.5
    for model in (plain, patched):
        model.model.layers[1].self_attn.kv_b_proj.weight = nn.Parameter(new.clone())
    check("replaced", 1e-4)
    plain.double()
    patched.double()
    assert patched.model.layers[0].self_attn.absorbed_weights()[0].dtype == torch.float64
    check("float64", 1e-10)


def test_gradients_match_unpatched():
    """Decode steps with grad enabled, after no_grad ones, backpropagate into kv_b_proj and the
    query projection exactly like the unpatched model (float64, so 1e-10 is ~1e5 ulps of
    summation-order slack): the W_UK/W_UV views are not stale no_grad views."""
    plain, patched = _pair(_v2, seed=11, dtype=torch.float64)
    ids, mask = _prompt(2, 20, [0, 2], seed=12)
    new_ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        _steps(patched, ids, mask, new_ids)
    grads = []
    for model in (plain, patched):
        loss = sum(logits.square().mean() for logits in _steps(model, ids, mask, new_ids))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "kv_b_proj" in n or "q_proj" in n})
    for name in grads[0]:
        assert grads[1][name] is not None, f"{name}: no gradient through the absorbed path"
        assert_close(name, grads[1][name], grads[0][name], atol=1e-10, rtol=1e-8)


def test_output_attentions_match_eager():
    """Attention probabilities returned for a decode step equal eager attention's (float32:
    scores of size O(1) round at ~1e-7 and p * |d score| stays below 1e-6; measured 8e-8)."""
    plain, patched = _pair(lambda: _v3("eager"), seed=14)
    ids, mask = _prompt(2, 20, [0, 4], seed=15)
    with torch.no_grad():
        out = []
        for model in (plain, patched):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=-1)
            step = model(input_ids=ids[:, -1:], attention_mask=step_mask, cache=cache, output_attentions=True)
            out.append(step.attentions)
    for layer, (a, e) in enumerate(zip(out[1], out[0])):
        assert_close(f"layer {layer} probabilities", a, e, atol=1e-6)


def test_patch_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        hf.patch("DeepseekV3ForCausalLM")
    with pytest.raises(ValueError, match="no DeepseekV2Attention or DeepseekV3Attention"):
        hf.patch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_absorbed_query_len"):
        hf.patch(_v3(), max_absorbed_query_len=0)
    with pytest.raises(TypeError, match="max_absorbed_query_len"):
        hf.patch(_v3(), max_absorbed_query_len=2.0)
    model = _v3()
    attn = model.model.layers[1].self_attn
    # What accelerate's hooks do; an instance-level forward would silently bypass the adapter.
    attn.forward = attn.forward
    with pytest.raises(ValueError, match="model.layers.1.self_attn"):
        hf.patch(model)
    assert type(model.model.layers[0].self_attn) is DeepseekV3Attention, "a rejected patch must change nothing"
