"""DeepSeek-V3.2 sparse attention (the lightning indexer + top-k + sparse decode) in our modules.

Tiny models whose index_topk is smaller than the context, so the selection is active: every
cached decode step must equal our own one-shot (uncached) forward of the same tokens, which
chooses among the same causally visible positions (`mla.attention`'s semantics note). The
indexer's scoring and top-k kernels have their own tests (tests/test_indexer.py); the
transformers comparisons are in tests/test_hf_v32.py.
"""

from __future__ import annotations

import pytest
import torch

from mla import LatentCache, MLAConfig, MLAForCausalLM
from mla.attention import MLAttention
from mla.speculative import NgramDrafter, generate

from .utils import assert_close, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 101
TINY = dict(
    hidden_size=64, num_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=256,
    index_n_heads=4, index_head_dim=16, index_topk=6,
)  # fmt: skip


def tiny_model(seed: int = 0, backend: str = "reference", **overrides) -> MLAForCausalLM:
    torch.manual_seed(seed)
    return randomize_(MLAForCausalLM(MLAConfig(**{**TINY, **overrides}), backend=backend), seed).eval()


def tokens(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def cached_logits(model, ids, cache_dtype, prefill: int, steps: list[int]) -> torch.Tensor:
    """Prefill ids[:, :prefill], then cached steps of the given sizes; logits [b, s, vocab] of
    every token from the prefill's last on."""
    cache = model.new_cache(64, 4, dtype=cache_dtype)
    seq_ids = [cache.add_sequence() for _ in range(ids.shape[0])]
    out = [model.prefill(ids[:, :prefill], cache, seq_ids)[:, None]]
    start = prefill
    for n in steps:
        out.append(model(ids[:, start : start + n], cache, seq_ids))
        start += n
    return torch.cat(out, dim=1)


def test_config_presets_bytes_and_hf():
    v32 = MLAConfig.deepseek_v32()
    assert (v32.index_n_heads, v32.index_head_dim, v32.index_topk) == (64, 128, 2048)
    assert v32.kv_bytes_per_token(torch.bfloat16) == 1152 + 256
    assert v32.kv_bytes_per_token("fp8") == 656 + 132 == 788
    assert v32.index_bytes_per_token("fp8") == 132
    assert MLAConfig.deepseek_v3().kv_bytes_per_token("fp8") == 656 and not MLAConfig.deepseek_v3().has_indexer
    cache = LatentCache(3, 2, 4, 512, 64, dtype="fp8", index_head_dim=128)
    assert cache.bytes_per_token == v32.kv_bytes_per_token("fp8")
    assert cache.index_pages[0].shape == (2, 4, 1, 132)

    from transformers import DeepseekV32Config

    config = MLAConfig.from_hf(DeepseekV32Config(index_topk=7, index_head_dim=96, index_n_heads=3))
    assert (config.index_n_heads, config.index_head_dim, config.index_topk) == (3, 96, 7)


@pytest.mark.parametrize(
    "overrides, match",
    [
        pytest.param(dict(index_topk=0), "index_topk must be a positive int, got 0", id="topk0"),
        pytest.param(dict(index_topk=None), r"\['index_topk'\] are None", id="partial"),
        pytest.param(dict(index_head_dim=4), "index_head_dim=4 must hold the qk_rope_head_dim=8", id="dim-below-rope"),
        pytest.param(dict(q_lora_rank=None), "need a q_lora_rank", id="no-q-lora"),
        pytest.param(dict(index_n_heads=2.0), "index_n_heads must be a positive int, got 2.0", id="float-heads"),
    ],
)
def test_config_rejects_bad_indexer(overrides, match):
    with pytest.raises(ValueError, match=match):
        MLAConfig(**{**TINY, **overrides})


def test_cache_and_layer_check_index_keys():
    config = MLAConfig(**TINY)
    layer = MLAttention(config, backend="reference")
    plain = LatentCache(1, 4, 4, 32, 8, dtype=torch.float32)
    sid = plain.add_sequence()
    plain.reserve([sid], 2)
    with pytest.raises(ValueError, match="cache index_head_dim is None, the layers' indexer needs 16"):
        layer(torch.randn(1, 2, 64), torch.tensor([[0, 1]]), plain, [sid])
    wrong = LatentCache(1, 4, 4, 32, 8, dtype=torch.float32, index_head_dim=32)
    sid = wrong.add_sequence()
    wrong.reserve([sid], 2)
    with pytest.raises(ValueError, match="cache index_head_dim is 32, the layers' indexer needs 16"):
        layer(torch.randn(1, 2, 64), torch.tensor([[0, 1]]), wrong, [sid])
    cache = LatentCache(1, 4, 4, 32, 8, dtype=torch.float32, index_head_dim=16)
    sid = cache.add_sequence()
    cache.reserve([sid], 2)
    slots = cache.slot_mapping([sid], [[0, 1]])
    with pytest.raises(ValueError, match=r"index_keys must be given exactly when .*index_head_dim=16\), got none"):
        cache.write(0, slots, torch.randn(2, 32), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"index_keys must be \[n=2, 16\], got \(2, 15\)"):
        cache.write(0, slots, torch.randn(2, 32), torch.randn(2, 8), torch.randn(2, 15))
    keys = torch.randn(2, 16)
    cache.write(0, slots, torch.randn(2, 32), torch.randn(2, 8), keys)
    assert torch.equal(cache.read_index(0, sid), keys)
    with pytest.raises(ValueError, match="holds no indexer keys"):
        plain.read_index(0, 0)


# Decode steps: single tokens and a 4-token step (the shape of a speculative verification).
STEPS = [1, 4, 1, 2, 1]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_equals_one_shot_forward(backend):
    """Cached prefill + decode (absorbed, through the sparse attention over the indexer's slots)
    equals the uncached forward of the same tokens (decompressed, masked by the indexer's
    positions), with index_topk = 6 far below the context: float64 weights, float32 cache, so
    the only differences are float32 roundings of the cached rows."""
    model = tiny_model(seed=1, backend=backend).double()
    # the interpreter runs the top-k's 34 passes per query slowly: a shorter prefill there
    prefill, steps = (20, STEPS) if backend == "reference" else (8, STEPS[:2])
    ids = tokens(2, prefill + sum(steps), seed=2)
    with torch.no_grad():
        expected = model(ids)[:, prefill - 1 :]
        actual = cached_logits(model, ids, torch.float32, prefill, steps)
        dense = tiny_model(seed=1, backend="reference", index_topk=64).double()(ids)[:, prefill - 1 :]
    assert_close("cached vs one-shot logits", actual, expected, atol=1e-5)
    assert (dense - expected).abs().max() > 1e-2, "the selection changed nothing: the test would be vacuous"


def test_fp8_cache_within_fp8_rounding():
    """With every position chosen (index_topk >= context) an FP8 cache (latent rows and 20-byte
    index keys) stays within the latent rows' FP8 rounding of the float32 cache: measured 11%
    relative logit error on these unit-scale two-layer models, the same as without an indexer.
    With sparsity active, near-tied index scores may choose differently under FP8 (as under
    bf16): there the FP8 scores are held to FP8 rounding in tests/test_indexer.py instead."""
    model = tiny_model(seed=3, index_topk=64)
    ids = tokens(2, 20 + sum(STEPS), seed=4)
    with torch.no_grad():
        exact = cached_logits(model, ids, torch.float32, 20, STEPS)
        fp8 = cached_logits(model, ids, "fp8", 20, STEPS)
    rel = ((fp8 - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.15, f"FP8 cache relative logit error {rel:.4f}"


def test_greedy_is_stable_across_batch_sizes():
    """Ragged prompts generate the same tokens alone and together (batch 1 and 3)."""
    model = tiny_model(seed=5)
    prompts = [tokens(1, n, seed=10 + n)[0] for n in (9, 17, 13)]
    with torch.no_grad():
        together = model.generate_greedy(prompts, 8, page_size=4)
        alone = [model.generate_greedy([p], 8, page_size=4)[0] for p in prompts]
    assert torch.equal(together, torch.stack(alone))


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_plain_greedy(k):
    """Verification of k + 1 tokens selects top-k per query token, so speculative greedy
    decoding is lossless on a V3.2 model."""
    model = tiny_model(seed=6)
    prompts = [torch.cat([p, p, p]) for p in (tokens(1, 5, seed=20)[0], tokens(1, 7, seed=21)[0])]
    with torch.no_grad():
        expected = model.generate_greedy(prompts, 10, page_size=4)
        out = generate(model, prompts, NgramDrafter(1, 3), max_new_tokens=10, num_draft_tokens=k)
    new = [row[len(p) : len(p) + 10] for row, p in zip(out.sequences, prompts)]
    assert torch.equal(torch.stack(new), expected)
    assert out.stats.accepted > 0
