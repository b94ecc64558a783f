"""mla.hf.patch on transformers' DeepseekV4ForCausalLM: its attention and cache become ours
(V4Attention's cached path over one V4Cache), transformers keeps MoE, hyper-connections and
generate().

Which transformers results to hold us to: with index_topk >= the entry count, transformers is
self-consistent and the patched model must equal it; with CSA sparsity active its `torch.topk`
breaks ties (exact zeros after ReLU) arbitrarily, so we compare against it with `Tensor.topk`
made stable (ties to the lower position, our rule; mla.v4_attention's docstring).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV4ForCausalLM, DynamicCache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention

import mla.hf
from mla.hf import MLACache
from mla.hf_v4 import MLADeepseekV4Attention, V4HFCache
from mla.speculative import generate as speculative_generate
from mla.speculative.drafters import DraftModelDrafter, NgramDrafter
from mla.v4 import CSA, HCA, SLIDING

from .test_v4_attention import assert_close, hf_model, stable_topk, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
PROMPT = 19  # 2 sliding windows, 4 CSA entries, 2 HCA entries and open windows of each
NEW = 14  # decode steps close CSA windows at 20, 24, 28, 32 and HCA windows at 24, 32
GREEDY = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)


def tiny_model(index_topk: int, **changes) -> DeepseekV4ForCausalLM:
    """A transformers V4 model (`hf_model`) of sliding, CSA, HCA and CSA layers."""
    return hf_model(tiny(num_hidden_layers=4, layer_types=(SLIDING, CSA, HCA, CSA), index_topk=index_topk, **changes),
                    VOCAB)  # fmt: skip


@pytest.fixture(scope="module")
def dense_model():
    """index_topk 16 >= the 8 CSA entries of PROMPT + NEW tokens: transformers is self-consistent."""
    return tiny_model(index_topk=16)


@pytest.fixture
def patched(dense_model):
    yield mla.hf.patch(dense_model, backend="reference")
    mla.hf.unpatch(dense_model)


def prompts(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(3))


def generate_both(model, ids, **kwargs):
    """(unpatched, patched) generate outputs with logits."""
    kwargs = {**GREEDY, "output_logits": True, "return_dict_in_generate": True, **kwargs}
    reference = model.generate(ids, **kwargs)
    mla.hf.patch(model, backend="reference")
    try:
        ours = model.generate(ids, **kwargs)
    finally:
        mla.hf.unpatch(model)
    assert isinstance(ours.past_key_values, V4HFCache)
    return reference, ours


def test_greedy_generate_equals_transformers(dense_model):
    reference, ours = generate_both(dense_model, prompts())
    assert torch.equal(ours.sequences, reference.sequences)
    assert_close(torch.stack(ours.logits), torch.stack(reference.logits), 2e-6, "patched vs transformers logits")


def test_greedy_generate_with_sparse_csa_equals_transformers_with_stable_topk(monkeypatch):
    """index_topk 3 of up to 8 entries: the indexer's choice matters at every decode step."""
    monkeypatch.setattr(torch.Tensor, "topk", stable_topk)
    reference, ours = generate_both(tiny_model(index_topk=3), prompts())
    assert torch.equal(ours.sequences, reference.sequences)
    assert_close(torch.stack(ours.logits), torch.stack(reference.logits), 2e-6, "patched vs stable-topk logits")


def test_left_padded_batch_equals_each_row_alone(dense_model):
    """Rows of 19 and 11 tokens (8 pad columns): each row's tokens and logits are those of
    transformers on that row alone (transformers' own padded V4 pools pads into its windows)."""
    ids = prompts()
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    ids[1, :8] = 0
    kwargs = {**GREEDY, "output_logits": True, "return_dict_in_generate": True}
    alone = [dense_model.generate(ids[row : row + 1, 8 * row :], **kwargs) for row in range(2)]
    mla.hf.patch(dense_model, backend="reference")
    try:
        ours = dense_model.generate(ids, attention_mask=mask, **kwargs)
    finally:
        mla.hf.unpatch(dense_model)
    for row, reference in enumerate(alone):
        assert torch.equal(ours.sequences[row, PROMPT:], reference.sequences[0, PROMPT - 8 * row :]), f"row {row}"
        logits = torch.stack(ours.logits)[:, row]
        assert_close(logits, torch.stack(reference.logits)[:, 0], 2e-6, f"row {row} logits")


def test_bfloat16_checkpoint_layout_within_twice_transformers_error(dense_model):
    """bfloat16 with transformers' float32 modules (`_keep_in_fp32_modules_strict`: norms,
    sinks, position biases, hyper-connections), as from_pretrained loads V4: the patched model
    shares those mixed-dtype parameters and errs, against float32 transformers, at most twice
    as much as bfloat16 transformers does."""
    model = tiny_model(index_topk=16).to(torch.bfloat16)
    keep = set(model._keep_in_fp32_modules_strict)
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in keep:
            module.float()
    for name, p in model.named_parameters():
        if name.rpartition(".")[2] in keep:
            p.data = p.data.float()
    kwargs = {**GREEDY, "output_logits": True, "return_dict_in_generate": True}
    exact = torch.stack(dense_model.generate(prompts(), **kwargs).logits)
    reference, ours = generate_both(model, prompts())
    assert torch.equal(ours.sequences, reference.sequences)
    transformers_error = (torch.stack(reference.logits).float() - exact).abs().max().item()
    assert_close(torch.stack(ours.logits).float(), exact, 2 * transformers_error, "bfloat16 patched vs float32")


def test_sampling_draws_what_transformers_draws(dense_model):
    kwargs = dict(do_sample=True, top_k=0, temperature=1.5, num_return_sequences=2)
    torch.manual_seed(11)
    reference = dense_model.generate(prompts(1), **{**GREEDY, **kwargs})
    mla.hf.patch(dense_model, backend="reference")
    try:
        torch.manual_seed(11)
        ours = dense_model.generate(prompts(1), **{**GREEDY, **kwargs})
    finally:
        mla.hf.unpatch(dense_model)
    assert torch.equal(ours, reference)


def test_speculative_decoding_equals_greedy(patched):
    """Ragged prompts (right-padded prefill, cut back), ngram drafts accepted and rejected
    (rollback by truncation), rows finishing at the same budget."""
    ids = prompts()
    rows = [ids[0], ids[1, :13]]
    out = speculative_generate(patched, rows, NgramDrafter(), max_new_tokens=NEW, num_draft_tokens=3)
    for row, prompt in enumerate(rows):
        greedy = patched.generate(prompt[None], **GREEDY)[0]
        assert torch.equal(out.sequences[row, : out.lengths[row]], greedy), f"row {row}"


def test_failed_step_rolls_back_and_crop_is_exact(patched):
    ids = prompts()
    cache = V4HFCache.for_model(patched, 2, 64)
    with torch.no_grad():
        patched(ids[:, :12], cache=cache, use_cache=True)
        layer = patched.model.layers[2].mlp
        layer.forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            patched(ids[:, 12:15], cache=cache, use_cache=True)
        del layer.forward
        assert cache.lengths() == [12, 12]
        after_crop = patched(ids[:, 12:17], cache=cache, use_cache=True).logits
        cache.crop(-3)
        assert cache.lengths() == [14, 14]
        again = patched(ids[:, 14:17], cache=cache, use_cache=True).logits
    assert_close(again, after_crop[:, 2:], 1e-6, "after crop")


def test_patch_shares_parameters_and_unpatch_restores(dense_model):
    keys = list(dense_model.state_dict())
    mla.hf.patch(dense_model, backend="reference")
    attention = dense_model.model.layers[1].self_attn
    assert type(attention) is MLADeepseekV4Attention
    assert attention.mla_v4.compressor.indexer.q_b_proj.weight is attention.compressor.indexer.q_b_proj.weight
    assert list(dense_model.state_dict()) == keys
    mla.hf.unpatch(dense_model)
    assert all(type(layer.self_attn) is DeepseekV4Attention for layer in dense_model.model.layers)
    assert "mla_v4" not in vars(attention) and "mla_causal_lm" not in vars(dense_model)


def test_refused_inputs(patched):
    ids = prompts()
    with pytest.raises(ValueError, match="beam search"):
        patched.generate(ids, num_beams=2, **GREEDY)
    with pytest.raises(ValueError, match="left padding only"):
        patched.generate(ids, attention_mask=(torch.arange(PROMPT) < 15).long().expand(2, -1), **GREEDY)
    with pytest.raises(ValueError, match="generates on mla.hf_v4.V4HFCache"):
        patched.generate(ids, cache=DynamicCache(config=patched.config), **GREEDY)
    v3 = DeepseekV3Config(hidden_size=64, num_attention_heads=2, kv_lora_rank=32, qk_rope_head_dim=8,
                          qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=None, num_hidden_layers=4)  # fmt: skip
    with pytest.raises(TypeError, match="not a V4 cache"), torch.no_grad():
        patched(ids, cache=MLACache(v3, dtype=torch.float32), use_cache=True)
    cache = V4HFCache.for_model(patched, 2, 32)
    with pytest.raises(ValueError, match="no_grad"):
        patched(ids, cache=cache, use_cache=True)
    assert cache.lengths() == []  # the failed first step freed the rows it made
    with pytest.raises(ValueError, match="cache_dtype='fp8'.*head_dim=512"):
        mla.hf.patch(tiny_model(index_topk=3), cache_dtype="fp8")


def test_triton_backend_runs_the_kernels_and_equals_the_reference(dense_model, monkeypatch):
    """backend="triton" (the interpreter here): each decode step of each layer attends in one
    sparse kernel call (window + entries + sinks), CSA layers choose with the indexer kernels,
    and closing windows pool with the compressor kernel; tokens equal the reference backend's."""
    import mla.kernels
    import mla.kernels.compressor
    import mla.kernels.indexer

    ids = prompts()[:, :9]
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True)  # fmt: skip
    mla.hf.patch(dense_model, backend="reference")
    try:
        expected = dense_model.generate(ids, **kwargs)
    finally:
        mla.hf.unpatch(dense_model)
    calls = []
    for module, name in ((mla.kernels, "flash_mla_with_kvcache"), (mla.kernels.indexer, "index_scores"),
                         (mla.kernels.indexer, "index_topk"), (mla.kernels.compressor, "write_compressed")):  # fmt: skip
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    mla.hf.patch(dense_model, backend="triton")
    try:
        actual = dense_model.generate(ids, **kwargs)
    finally:
        mla.hf.unpatch(dense_model)
    assert torch.equal(actual.sequences, expected.sequences)
    assert_close(torch.stack(actual.logits), torch.stack(expected.logits), 1e-4, "triton vs reference logits")
    # the last decode step (token 10 -> 11: no window closes): layers sliding, CSA, HCA, CSA
    step = ["flash_mla_with_kvcache", "index_scores", "index_topk", "flash_mla_with_kvcache",
            "flash_mla_with_kvcache", "index_scores", "index_topk", "flash_mla_with_kvcache"]  # fmt: skip
    assert calls[-len(step) :] == step, calls
    assert "write_compressed" in calls


def test_fp8_cache_through_the_kernels_within_fp8_rounding(monkeypatch):
    """cache_dtype="fp8" (MODEL1 window rows and entries, MXFP4 indexer keys) on a model of
    DeepSeek's head_dim 512 / rope 64 with CSA sparsity active: backend="triton" attends with the
    MODEL1 sparse kernel and gives the reference backend's tokens; the prompt's logits stay within
    FP8 rounding of the float32 cache's (this random model's top tokens are near ties, so the
    generated tokens may differ after that)."""
    import mla.kernels

    model = tiny_model(index_topk=2, head_dim=512, rope_dim=64, num_heads=2, index_head_dim=64)
    ids = prompts()[:, :9]
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True)  # fmt: skip
    runs = {}
    fp8_calls = []
    kernel = mla.kernels.flash_mla_with_kvcache

    def counted(*args, **kw):
        fp8_calls.append(kw.get("is_fp8_kvcache"))
        return kernel(*args, **kw)

    monkeypatch.setattr(mla.kernels, "flash_mla_with_kvcache", counted)
    for name, cache_dtype, backend in (("fp32", None, "reference"), ("fp8", "fp8", "reference"),
                                       ("fp8-triton", "fp8", "triton")):  # fmt: skip
        mla.hf.patch(model, cache_dtype=cache_dtype, backend=backend, page_size=4)
        try:
            runs[name] = model.generate(ids, **kwargs)
        finally:
            mla.hf.unpatch(model)
    assert fp8_calls and all(fp8_calls)  # every kernel call read MODEL1 pages
    assert torch.equal(runs["fp8-triton"].sequences, runs["fp8"].sequences)
    fp8, fp32 = torch.stack(runs["fp8"].logits), torch.stack(runs["fp32"].logits)
    assert_close(torch.stack(runs["fp8-triton"].logits), fp8, 1e-4, "triton vs reference over MODEL1 pages")
    assert (fp8[0] - fp32[0]).abs().max() <= 2**-4 * fp32[0].abs().max()


def test_speculative_decoding_with_a_draft_model_equals_greedy(patched):
    """A second patched tiny V4 model drafts 4 tokens a step: its own compact cache rolls back
    across its k single-token steps (V4HFCache keeps max_rollback tokens for that)."""
    draft = mla.hf.patch(tiny_model(index_topk=3), backend="reference", page_size=2)  # pages released early
    ids = prompts()
    rows = [ids[0], ids[1, :13]]
    out = speculative_generate(patched, rows, DraftModelDrafter(draft), max_new_tokens=NEW, num_draft_tokens=4)
    for row, prompt in enumerate(rows):
        greedy = patched.generate(prompt[None], **GREEDY)[0]
        assert torch.equal(out.sequences[row, : out.lengths[row]], greedy), f"row {row}"
