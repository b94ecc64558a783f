"""mla.hf.patch: transformers' DeepSeek-V2/V3 MoE models attending through our paged latent cache.

Every test compares a patched model with an unpatched deep copy holding the same weights: tiny
float32 mixture-of-experts models (layer 0 dense, layer 1 four routed experts top-2 plus a
shared one). Weights are re-drawn at unit scale (transformers' 0.02 init gives near-uniform
attention, which would hide a wrong score) and norm weights are perturbed away from 1.

Most tests run the PyTorch reference backend (the Triton interpreter costs ~0.1 s per launch);
test_triton_kernel_decodes proves the kernel is what runs with backend="triton".
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

import mla.kernels
from mla import hf

from .utils import assert_close, max_error

VOCAB = 97
# pad = eos, as in DeepSeek's configs (otherwise transformers re-infers an assistant model's mask
# from its ids and masks a generated pad id in mid-sequence, which MLACache refuses)
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
# Layer 0 dense, the others MoE: 4 routed experts (top 2, one group) and a shared expert; eager
# experts run any dtype.
MOE = dict(
    first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
    experts_implementation="eager",
)  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _common(attn: str, yarn: bool, q_lora_rank: int | None, layers: int) -> dict:
    # Awkward, unequal head dims (qk_nope 16, rope 8, v 12) so a swapped W_UK/W_UV split fails.
    return dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, max_position_embeddings=128, rope_parameters=YARN if yarn else DEFAULT_ROPE,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=PAD, attn_implementation=attn, **MOE,
    )  # fmt: skip


def _v3(attn="sdpa", yarn=False, interleave=True, q_lora_rank=24, layers=2):
    config = DeepseekV3Config(**_common(attn, yarn, q_lora_rank, layers), rope_interleave=interleave, n_group=1,
                              topk_group=1)  # fmt: skip
    return DeepseekV3ForCausalLM(config)


def _v2(attn="sdpa", yarn=False, q_lora_rank=None, layers=2):
    return DeepseekV2ForCausalLM(DeepseekV2Config(**_common(attn, yarn, q_lora_rank, layers)))


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


def _pair(build, seed=0, dtype=torch.float32, **settings):
    """(unpatched, patched) models with identical weights; the patch on the reference backend."""
    plain = _randomize(build(), seed).to(dtype)
    return plain, hf.patch(copy.deepcopy(plain), **{"backend": "reference", **settings})


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


def _spy(monkeypatch) -> dict:
    """Count the adapters' absorbed and decompressed attention calls and transformers' expand_kv
    (the original path), over every model."""
    calls = {"absorbed": 0, "decompressed": 0, "expand_kv": 0}
    targets = [
        (hf._MLAAttention, "_attend_absorbed", "absorbed"),
        (hf._MLAAttention, "_attend_decompressed", "decompressed"),
        (DeepseekV3Attention, "expand_kv", "expand_kv"),
        (DeepseekV2Attention, "expand_kv", "expand_kv"),
    ]
    for cls, attr, key in targets:
        original = getattr(cls, attr)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, attr, counted)
    return calls


MODELS = [
    pytest.param(lambda: _v3("sdpa", yarn=True), id="v3-moe-sdpa-yarn-interleave"),
    pytest.param(lambda: _v2("eager", q_lora_rank=24), id="v2-moe-eager-q_lora"),
]
# (generate kwargs, batch, pads): greedy over a ragged left-padded batch (three prefill plans);
# sampling; beam search with more returned sequences than rows (rows forked by page copies);
# assisted decoding with a patched draft model (4 drafted tokens a round; both caches cropped
# every round); prompt lookup (3-token candidates); a chunked prefill whose first chunk is all
# padding in one row. Assisted modes are batch 1 in transformers.
MODES = {
    "greedy-ragged": (dict(do_sample=False), 3, [0, 5, 2]),
    "sample": (dict(do_sample=True, top_k=0, temperature=1.5), 2, [0, 3]),
    "beam": (dict(do_sample=False, num_beams=3, num_return_sequences=2), 2, [0, 4]),
    "assisted": (dict(do_sample=False), 1, [0]),
    "prompt-lookup": (dict(do_sample=False, prompt_lookup_num_tokens=3), 1, [0]),
    "chunked-prefill": (dict(do_sample=False, prefill_chunk_size=5), 2, [0, 7]),
}


@pytest.mark.parametrize("build", MODELS)
@pytest.mark.parametrize("mode", MODES)
def test_generate_matches_unpatched(build, mode, monkeypatch):
    """generate() on the patched model makes its MLACache, attends only through it (prefill
    decompressed, decode absorbed, never transformers' expand_kv) and returns the unpatched
    model's tokens."""
    kwargs, batch, pads = MODES[mode]
    plain, patched = _pair(build, seed=len(mode))
    ids, mask = _prompt(batch, 12, pads, seed=1)
    if mode == "prompt-lookup":
        ids = torch.cat([ids, ids[:, 2:8]], dim=1)  # a repeat for the lookup to find
        mask = torch.ones_like(ids)
    kwargs = dict(kwargs, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True)
    expected_kwargs, actual_kwargs = dict(kwargs), dict(kwargs)
    if mode == "assisted":
        draft = _randomize(_v3(layers=1), seed=9)
        draft.generation_config.num_assistant_tokens_schedule = "constant"  # 4 drafted tokens a round
        draft.generation_config.num_assistant_tokens = 4
        expected_kwargs["assistant_model"] = draft
        actual_kwargs["assistant_model"] = hf.patch(copy.deepcopy(draft), backend="reference", page_size=4)
    torch.manual_seed(0)
    expected = plain.generate(ids, **expected_kwargs)
    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    actual = patched.generate(ids, **actual_kwargs)
    assert torch.equal(actual.sequences, expected.sequences), f"{actual.sequences} != {expected.sequences}"
    assert isinstance(actual.cache, hf.MLACache) and isinstance(expected.cache, DynamicCache)
    assert calls["expand_kv"] == 0, "the patched model ran transformers' attention"
    assert calls["absorbed"] > 0 and calls["decompressed"] > 0


def test_generate_continues_a_returned_cache():
    """A second generate() on the MLACache the first returned (the old tokens, then new ones):
    transformers slices the input by get_seq_length() and the rows carry on, as with a DynamicCache."""
    plain, patched = _pair(_v3, seed=19)
    ids, mask = _prompt(2, 10, [0, 6], seed=20)
    more = torch.randint(2, VOCAB, (2, 3), generator=torch.Generator().manual_seed(21))
    results = []
    for model in (plain, patched):
        kwargs = dict(max_new_tokens=4, do_sample=False)
        first = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
        ids2 = torch.cat([first.sequences, more], dim=1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
        results.append(model.generate(ids2, attention_mask=mask2, cache=first.cache, **kwargs))
    assert torch.equal(results[1], results[0])


def test_triton_kernel_decodes(monkeypatch):
    """With backend="triton" (under the interpreter here) every decode step of every layer is one
    call of mla.kernels.flash_mla_with_kvcache, on a float32 and an FP8 cache."""
    plain, _ = _pair(_v3, seed=2)
    ids, mask = _prompt(2, 7, [0, 2], seed=3)
    calls = []
    kernel = mla.kernels.flash_mla_with_kvcache

    def counted(*args, **kwargs):
        calls.append(kwargs["is_fp8_kvcache"])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(mla.kernels, "flash_mla_with_kvcache", counted)
    with torch.no_grad():
        expected = plain.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for cache_dtype in (None, "fp8"):
        calls.clear()
        patched = hf.patch(copy.deepcopy(plain), backend="triton", cache_dtype=cache_dtype)
        actual = patched.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert calls == [cache_dtype == "fp8"] * 2 * 4, "one kernel call per layer and decode step"
        if cache_dtype is None:
            assert torch.equal(actual, expected)


def _logits(model, ids, mask, new_ids, cache):
    """Prefill `ids`, then three cached steps; returns their logits [b, s, vocab].

    Steps: one token; four tokens at once (a speculative-verification shape); crop the last
    three from the cache (rejected drafts) and decode one token on the cropped cache.
    """
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        out = []
        for n, crop in ((1, 0), (4, 3), (1, 0)):
            step, new_ids = new_ids[:, :n], new_ids[:, n:]
            mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
            positions = positions[:, -1:] + 1 + torch.arange(n)
            out.append(model(input_ids=step, attention_mask=mask, position_ids=positions, cache=cache).logits)
            if crop:
                cache.crop(-crop)
                mask, positions = mask[:, :-crop], positions[:, :-crop]
    return out


def _steps_inputs(pads):
    ids, mask = _prompt(len(pads), 20, pads, seed=4)
    return ids, mask, torch.randint(2, VOCAB, (len(pads), 6), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("build", MODELS)
def test_decode_logits_agree_to_float32_rounding(build):
    """Decode-step logits of the patched float32 model (float32 cache) are as close to the float64
    truth as the unpatched float32 model's: the absorbed and expanded forms are two float32
    roundings of the same product, (W_UK^T q).c vs q.(W_UK c), so |patched - truth| <= 2 *
    max|plain32 - truth| plus 8 float32 ulps of the largest logit (that max over a few hundred
    logits is a noisy estimate: measured ratios 0.7-1.7). Real tokens only: pad rows are left out of
    the cache (left padding of 0 and 7 tokens)."""
    ref64, patched = _pair(build, seed=3)
    ref64 = ref64.double()
    ref64.set_attn_implementation("sdpa")  # eager float64 rounds its softmax to float32
    plain32 = copy.deepcopy(ref64).float()
    ids, mask, new_ids = _steps_inputs([0, 7])
    truth = _logits(ref64, ids, mask, new_ids, DynamicCache(config=ref64.config))
    plain = _logits(plain32, ids, mask, new_ids, DynamicCache(config=plain32.config))
    absorbed = _logits(patched, ids, mask, new_ids, hf.MLACache.for_model(patched, 2, 32))
    for step, (t, p, a) in enumerate(zip(truth, plain, absorbed)):
        own_error = max_error(p, t)
        assert own_error > 0, "float32 and float64 logits identical: the comparison would be vacuous"
        ulps = 8 * torch.finfo(torch.float32).eps * t.abs().max().item()
        assert_close(f"step {step}", a, t, atol=2 * own_error + ulps)


def _rel_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# As tests/test_fp8_cache.py: e4m3 rounds each latent 16x more coarsely than bf16 (2^-4 vs
# 2^-8 relative), so to first order the FP8 cache's attention error is <= 16x the bf16 cache's,
# asserted with a factor 2 for one sample's spread: 32x. Attention outputs, not logits: expert
# routing is discontinuous, so a routing flip can move logits by more than the error model says.
# Measured (decode steps of both layers, 8 seeds): FP8 3.0-5.7e-2, bf16 3.1-4.0e-3, ratio 9-15.
FP8_VS_BF16 = 32.0
# First greedy token over 16 prompts, FP8 cache vs bf16 cache: measured 14-16 of 16 over 4
# seeds (a token flips only where the top-2 logit margin is within the FP8 logit error); 0.75
# as in test_fp8_cache.
MIN_FIRST_TOKEN_MATCH = 0.75


def test_fp8_cache_within_fp8_tolerance_of_bf16(record_property):
    """Patched with cache_dtype="fp8": decode-step attention outputs within FP8_VS_BF16 x the bf16
    cache's error (and above it: it does quantize), and generate()'s first tokens mostly match
    those of a bf16 cache."""
    _, patched = _pair(_v3, seed=5)
    ids, mask, new_ids = _steps_inputs([0, 3])
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16, "fp8"):
        hf.patch(patched, backend="reference", cache_dtype=dtype)
        captured = []

        def capture(module, args, out, captured=captured):
            captured.append(out[0])

        hooks = [m.register_forward_hook(capture) for m in _attentions(patched)]
        _logits(patched, ids, mask, new_ids, hf.MLACache.for_model(patched, 2, 32))
        for hook in hooks:
            hook.remove()
        outputs[dtype] = torch.cat([out.flatten() for out in captured[2:]])  # after the prefill's two layers
    err_bf16 = _rel_error(outputs[torch.bfloat16], outputs[torch.float32])
    err_fp8 = _rel_error(outputs["fp8"], outputs[torch.float32])
    record_property("fp8_rel_error", err_fp8)
    record_property("bf16_rel_error", err_bf16)
    assert err_bf16 < err_fp8 <= FP8_VS_BF16 * err_bf16, (err_fp8, err_bf16)

    prompts, prompt_mask = _prompt(16, 9, [i % 4 for i in range(16)], seed=6)
    first = {}
    for dtype in (torch.bfloat16, "fp8"):
        hf.patch(patched, backend="reference", cache_dtype=dtype)
        out = patched.generate(prompts, attention_mask=prompt_mask, max_new_tokens=3, do_sample=False,
                               return_dict_in_generate=True)  # fmt: skip
        assert out.cache.dtype == (torch.float8_e4m3fn if dtype == "fp8" else dtype)
        first[dtype] = out.sequences[:, 9]
    rate = (first["fp8"] == first[torch.bfloat16]).float().mean().item()
    record_property("first_token_match_rate", rate)
    assert rate >= MIN_FIRST_TOKEN_MATCH


def test_cache_rows_fork_crop_and_grow():
    """MLACache bookkeeping against transformers' DynamicCache on the same steps: a one-page pool
    that must grow, rows reordered with duplicates (beam search), selected, repeated and cropped;
    every step's logits agree, each row holds exactly its real tokens, freed rows free pages."""
    plain, patched = _pair(_v3, seed=7, page_size=4)
    ids, mask = _prompt(3, 6, [0, 2, 5], seed=8)
    theirs, ours = DynamicCache(config=plain.config), hf.MLACache.for_model(patched, 1, 4)
    gen = torch.Generator().manual_seed(9)

    def step(ids, mask):
        with torch.no_grad():
            expected = plain(input_ids=ids, attention_mask=mask, cache=theirs).logits
            actual = patched(input_ids=ids, attention_mask=mask, cache=ours).logits
        real = mask[:, -ids.shape[1] :].bool()
        assert_close("logits", actual[real], expected[real], atol=1e-4)
        assert ours.get_seq_length() == theirs.get_seq_length() == mask.shape[1]

    def decode(mask):
        token = torch.randint(2, VOCAB, (mask.shape[0], 1), generator=gen)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        step(token, mask)
        return mask

    step(ids, mask)
    assert ours.latent.num_pages > 1, "the one-page pool grew"
    rearrangements = [("reorder_cache", [2, 0, 0]), ("batch_select_indices", [1, 2]), ("reorder_cache", [0, 0, 1, 1])]
    for method, index in rearrangements:
        for cache in (theirs, ours):
            getattr(cache, method)(torch.tensor(index))
        mask = decode(mask[index])
    for cache in (theirs, ours):
        cache.batch_repeat_interleave(2)
        cache.crop(-2)
    mask = decode(mask.repeat_interleave(2, dim=0)[:, :-2])
    lengths = mask.sum(-1).tolist()
    assert [ours.latent.length(sid) for sid in ours._rows] == lengths
    used = sum(-(-n // 4) for n in lengths)
    assert ours.latent.num_free_pages == ours.latent.num_pages - used, "dropped rows must return their pages"


def test_from_dynamic_cache_continues_an_unpatched_prefill():
    """A left-padded batch prefilled by the unpatched model into a DynamicCache, moved into an
    MLACache: the patched model's decode steps on it agree with the unpatched model's on the
    DynamicCache to float32 rounding (measured 1-3e-6 for logits of magnitude ~3)."""
    plain, patched = _pair(_v3, seed=16)
    ids, mask = _prompt(2, 8, [0, 3], seed=17)
    theirs = DynamicCache(config=plain.config)
    with torch.no_grad():
        plain(input_ids=ids, attention_mask=mask, cache=theirs)
        ours = hf.MLACache.from_dynamic_cache(patched, theirs, attention_mask=mask)
        assert ours.get_seq_length() == 8 and [ours.latent.length(s) for s in ours._rows] == [8, 5]
        for token in torch.randint(2, VOCAB, (3, 2, 1), generator=torch.Generator().manual_seed(18)):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            expected = plain(input_ids=token, attention_mask=mask, cache=theirs).logits
            actual = patched(input_ids=token, attention_mask=mask, cache=ours).logits
            assert_close("logits", actual, expected, atol=2e-5)


def test_output_attentions_follow_transformers():
    """sdpa: transformers returns no attention weights, nor does the patched model. eager: the
    weights of every real query over transformers' mask columns (pad columns zero), prefill and
    decode (float32: p * |d score| stays below 1e-6; measured 0.6-3e-7)."""
    for attn in ("sdpa", "eager"):
        plain, patched = _pair(lambda attn=attn: _v3(attn), seed=10)
        ids, mask = _prompt(2, 8, [0, 3], seed=11)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=-1)
        out = []
        with torch.no_grad():
            caches = (DynamicCache(config=plain.config), hf.MLACache.for_model(patched, 2, 16))
            for model, cache in zip((plain, patched), caches):
                prefill = model(input_ids=ids, attention_mask=mask, cache=cache, output_attentions=True)
                step = model(input_ids=ids[:, -1:], attention_mask=step_mask, cache=cache, output_attentions=True)
                out.append((prefill.attentions, step.attentions))
        if attn == "sdpa":
            assert out[0] == out[1] == ((), ())
            continue
        real = mask.bool()
        for layer in range(2):
            expected, actual = out[0][0][layer], out[1][0][layer]  # [b, h, s, s]
            actual, expected = actual.transpose(1, 2)[real], expected.transpose(1, 2)[real]  # real queries
            assert_close(f"prefill layer {layer}", actual, expected, atol=1e-6)
            assert_close(f"decode layer {layer}", out[1][1][layer], out[0][1][layer], atol=1e-6)


def test_training_and_transformers_caches_run_the_original_attention():
    """Without a cache (training) and with a transformers cache the adapters run transformers'
    own code: same loss and gradients as unpatched (float64, summation-order slack 1e-10). Our
    cache refuses gradients instead of returning wrong ones (its latents are detached)."""
    plain, patched = _pair(_v2, seed=11, dtype=torch.float64, cache_dtype=torch.float32)
    ids, mask = _prompt(2, 10, [0, 2], seed=12)
    grads = []
    for model in (plain, patched):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        cached = model(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config)).logits
        grads.append((loss, cached, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert_close("loss", grads[1][0], grads[0][0], atol=1e-10)
    assert_close("logits with a DynamicCache", grads[1][1], grads[0][1], atol=1e-10)
    assert grads[1][2].keys() == grads[0][2].keys()
    for name in grads[0][2]:
        assert_close(name, grads[1][2][name], grads[0][2][name], atol=1e-10, rtol=1e-8)
    with pytest.raises(RuntimeError, match="no backward"):
        patched(input_ids=ids, attention_mask=mask, cache=hf.MLACache.for_model(patched, 2, 16))


def test_parameters_shared_and_unpatch():
    model = _randomize(_v3(), seed=13)
    before = dict(model.named_parameters())
    state = model.state_dict()
    modules = _attentions(model)
    assert hf.patch(model, page_size=16) is model
    assert [type(m) for m in modules] == [hf.MLADeepseekV3Attention] * 2
    assert _attentions(model) == modules, "patch must convert the modules in place"
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    weight = modules[0].kv_b_proj.weight
    for view in modules[0].absorbed_weights():
        assert view.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr(), "W_UK/W_UV must be views"
    assert hf.patch(model, page_size=8) is model and modules[0].mla_settings.page_size == 8
    assert len(model.model._forward_pre_hooks) == len(model.model._forward_hooks) == 1, "patching twice hooks once"
    ids = torch.tensor([[5, 6, 7]])
    assert isinstance(model.generate(ids, max_new_tokens=2, return_dict_in_generate=True).cache, hf.MLACache)
    assert hf.unpatch(model) is model
    assert [type(m) for m in modules] == [DeepseekV3Attention] * 2
    assert "mla_settings" not in vars(modules[0]) and "_prepare_cache_for_generation" not in vars(model)
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert isinstance(model.generate(ids, max_new_tokens=2, return_dict_in_generate=True).cache, DynamicCache)


def test_generate_refuses_transformers_caches_and_right_padding():
    _, patched = _pair(_v3, seed=14)
    ids, mask = _prompt(2, 6, [0, 2], seed=15)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        patched.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="got a DynamicCache"):
        patched.generate(ids, attention_mask=mask, max_new_tokens=2, cache=DynamicCache(config=patched.config))
    cache = hf.MLACache.for_model(patched, 2, 16)
    with pytest.raises(ValueError, match="row 1 has a pad"):
        patched(input_ids=ids, attention_mask=mask.flip(-1), cache=cache)
    assert cache.get_seq_length() == 0 and not cache._rows, "a refused step leaves the cache empty"
    with pytest.raises(ValueError, match=r"attention_mask \[batch, cached \+ new\] = \[2, 6\]"):
        patched(input_ids=ids, attention_mask=mask[:, 1:], cache=cache)


def test_patch_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        hf.patch("DeepseekV3ForCausalLM")
    with pytest.raises(ValueError, match="only DeepSeek-V2/V3"):
        hf.patch(nn.Linear(2, 2))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match="Qwen2ForCausalLM contains no DeepseekV2Attention"):
        hf.patch(qwen)
    for bad, match in [
        (dict(cache_dtype="int8"), "cache_dtype 'int8'"),
        (dict(cache_dtype=torch.float64), "cache_dtype torch.float64"),
        (dict(page_size=0), "page_size must be a positive int, got 0"),
        (dict(page_size=16.0), "page_size must be a positive int, got 16.0"),
        (dict(backend="cuda"), "backend must be one of .* got 'cuda'"),
    ]:
        with pytest.raises(ValueError, match=match):
            hf.patch(_v3(), **bad)
    odd = DeepseekV3ForCausalLM(DeepseekV3Config(**{**_common("sdpa", False, None, 1), "kv_lora_rank": 30}))
    with pytest.raises(ValueError, match="cache_dtype 'fp8'.*kv_lora_rank=30"):
        hf.patch(odd, cache_dtype="fp8")
    model = _v3()
    attn = model.model.layers[1].self_attn
    # What accelerate's hooks do; an instance-level forward would silently bypass the adapter.
    attn.forward = attn.forward
    with pytest.raises(ValueError, match="model.layers.1.self_attn"):
        hf.patch(model)
    assert type(model.model.layers[0].self_attn) is DeepseekV3Attention, "a rejected patch must change nothing"
    with pytest.raises(ValueError, match="is not patched"):
        hf.MLACache.for_model(_v3(), 1, 8)
    with pytest.raises(ValueError, match="float64 and the cache holds"):
        hf.MLACache.for_model(hf.patch(_v3().double()), 1, 8)


def test_import_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "mla.hf")
    with pytest.raises(ImportError, match=r'pip install "mla-latent\[hf\]"'):
        import mla.hf  # noqa: F401
