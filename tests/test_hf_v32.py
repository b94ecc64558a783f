"""mla.hf.patch on transformers' DeepseekV32ForCausalLM: MLA + lightning indexer on our caches.

Which transformers results to hold us to. transformers 5.24 picks each query's top-k with
`torch.topk`, whose order among equal scores is unspecified; ReLU makes exact ties (scores of
0) common, so its one-shot forward, its prefix forwards and its cached decode choose different
tied positions and disagree (max logit difference ~0.1 on these models). With ties broken by
position (`stable_topk` below, our rule) all three agree to float32 rounding, so:
- index_topk >= context: patched == unpatched transformers as it is;
- index_topk < context: patched == unpatched transformers with the tie rule fixed, and ==
  our own one-shot forward (`MLAForCausalLM.from_hf`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, DynamicCache

import mla.kernels
from mla import MLAForCausalLM, hf

from .test_hf import DEFAULT_ROPE, MOE, PAD, VOCAB, _logits, _prompt, _randomize
from .utils import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def _v32(index_topk: int, attn: str = "sdpa", layers: int = 2) -> DeepseekV32ForCausalLM:
    config = DeepseekV32Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, max_position_embeddings=128, rope_parameters=DEFAULT_ROPE, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=PAD, attn_implementation=attn, n_group=1, topk_group=1, index_topk=index_topk,
        index_head_dim=16, index_n_heads=4, **MOE,
    )  # fmt: skip
    return DeepseekV32ForCausalLM(config)


def _pair(index_topk: int, seed: int, **settings):
    plain = _randomize(_v32(index_topk), seed)
    return plain, hf.patch(copy.deepcopy(plain), **{"backend": "reference", "page_size": 4, **settings})


def stable_topk(scores, k, dim=-1, **_):
    """torch.topk with ties to the lower position (a stable descending sort)."""
    values, indices = torch.sort(scores, dim=dim, descending=True, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


def test_generate_matches_unpatched_when_every_position_is_chosen():
    """index_topk >= context: transformers is self-consistent; greedy tokens of a ragged,
    left-padded batch are identical, prefill decompressed and decode through the sparse path."""
    plain, patched = _pair(index_topk=64, seed=1)
    ids, mask = _prompt(3, 12, [0, 5, 2], seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    expected = plain.generate(ids, **kwargs)
    actual = patched.generate(ids, **kwargs)
    assert torch.equal(actual, expected)


def test_sparse_decode_matches_transformers_and_our_one_shot(monkeypatch):
    """index_topk = 5 < context: prefill, single-token steps, a 4-token step and a crop (the
    speculative shapes) give transformers' logits once its ties are broken by position, and
    the cached steps equal our own uncached forward of the same tokens."""
    plain, patched = _pair(index_topk=5, seed=3)
    ids, mask = _prompt(2, 20, [0, 0], seed=4)
    new_ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    actual = _logits(patched, ids, mask, new_ids, hf.MLACache.for_model(patched, 2, 32))
    with monkeypatch.context() as patch_topk:
        patch_topk.setattr(torch.Tensor, "topk", stable_topk)
        expected = _logits(plain, ids, mask, new_ids, DynamicCache(config=plain.config))
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert_close(f"step {step} vs transformers", a, e, atol=1e-4)
    # ours, one shot: prompt, then the steps' kept tokens (the crop drops three of the four)
    ours = MLAForCausalLM.from_hf(plain, backend="reference")
    kept = torch.cat([ids, new_ids[:, :2], new_ids[:, 5:]], dim=1)
    with torch.no_grad():
        one_shot = ours(kept)
    assert_close("first step vs one shot", actual[0][:, 0], one_shot[:, 20], atol=1e-4)
    assert_close("last step vs one shot", actual[2][:, 0], one_shot[:, 22], atol=1e-4)
    with torch.no_grad():
        unchosen = MLAForCausalLM.from_hf(_randomize(_v32(index_topk=64), 3), backend="reference")(kept)
    assert (unchosen[:, 20] - one_shot[:, 20]).abs().max() > 1e-2, "the selection changed nothing"


def test_triton_runs_the_indexer_kernels_and_the_sparse_kernel(monkeypatch):
    """backend="triton" (the interpreter here): every decode step of every layer scores with
    mla.kernels.indexer, selects with its top-k kernel and attends with one sparse kernel call;
    float32 and FP8 caches; the float32 tokens equal the reference backend's."""
    plain, reference = _pair(index_topk=5, seed=6)
    ids, mask = _prompt(2, 7, [0, 2], seed=7)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    calls = []
    for name in ("index_scores", "index_topk"):
        original = getattr(mla.kernels.indexer, name)
        monkeypatch.setattr(mla.kernels.indexer, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    kernel = mla.kernels.flash_mla_with_kvcache

    def counted(*args, **kwargs):
        calls.append("sparse" if kwargs.get("indices") is not None else "dense")
        return kernel(*args, **kwargs)

    monkeypatch.setattr(mla.kernels, "flash_mla_with_kvcache", counted)
    for cache_dtype in (None, "fp8"):
        calls.clear()
        patched = hf.patch(copy.deepcopy(plain), backend="triton", cache_dtype=cache_dtype, page_size=4)
        actual = patched.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        decode_calls = calls[-2 * 2 * 3 :]  # 2 decode steps x 2 layers x (scores, top-k, attention)
        assert decode_calls == ["index_scores", "index_topk", "sparse"] * 4, calls
        if cache_dtype is None:
            assert torch.equal(actual, expected)
