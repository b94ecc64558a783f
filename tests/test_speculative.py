"""mla.speculative.generate: lossless speculative decoding on MLAForCausalLM and a transformers Qwen2.

- Greedy: every drafter, batch 1 and a ragged batch of 4, draft lengths 1..6, gives exactly the
  tokens of plain greedy decoding (MLA: `generate_greedy`, one token per decode step; Qwen2: a
  full forward per token, no cache at all).
- Sampling: the empirical law of 3-token continuations equals the target's exact law, computed
  by enumerating all V^2 prefixes, within the total-variation bound of test_rejection_sampling
  (false-failure probability 1e-6); the same check rejects a sampler that always accepts.
- Rollback: a probe drafter checks, after every step, that each row's cache equals a fresh
  prefill of the tokens the row kept (and that the draft caches are in step too).

Weights are re-drawn at unit scale with a sharpened LM head: transformers' 0.02 init gives
near-uniform attention and logits, where greedy ties and a draft that never differs from the
target would hide bugs. The models are tiny, float32 (the latent cache has no float64); along
the greedy reference generations the smallest gap between the top two logits is ~7e-3, far
above the ~1e-5 by which the chunked verify and one-token decode paths differ.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mla import hf
from mla import MLAConfig, MLAForCausalLM
from mla.speculative import (
    CausalLM,
    Draft,
    DraftModelDrafter,
    Drafter,
    HFCausalLM,
    MLACausalLM,
    MTPDrafter,
    MultiTokenPredictor,
    NgramDrafter,
    attach_mtp,
    generate,
    load_mtp_state_dict,
    probabilities,
)

from .stats import always_accept, assert_distribution, resample_from_target
from .utils import assert_close

import mla.speculative.loop as generate_module  # noqa: E402  (patched by the biased-sampler test)
VOCAB = 64
PAGE = 4  # small pages, so rollbacks cross page boundaries and free pages


pytestmark = pytest.mark.usefixtures("one_thread")


def redraw(model: nn.Module, seed: int, head_scale: float) -> nn.Module:
    """Unit-scale weights (1/sqrt(fan_in)), norms near 1, LM head (if any) times head_scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        if hasattr(model, "lm_head"):
            model.lm_head.weight.mul_(head_scale)
    return model.eval()


def mla_model(vocab: int, layers: int, seed: int, head_scale: float = 3.0, backend: str | None = None):
    config = MLAConfig(
        hidden_size=32, num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, vocab_size=vocab, num_hidden_layers=layers, intermediate_size=48,
    )  # fmt: skip
    torch.manual_seed(seed)
    return redraw(MLAForCausalLM(config, backend), seed, head_scale)


def with_mtp(model: MLAForCausalLM, seed: int) -> MLAForCausalLM:
    torch.manual_seed(seed)
    return attach_mtp(model, redraw(MultiTokenPredictor(model.config), seed, 1.0))


def qwen_model(vocab: int, layers: int, seed: int, head_scale: float = 3.0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return redraw(Qwen2ForCausalLM(config), seed, head_scale)


def mla_target(model: MLAForCausalLM) -> MLACausalLM:
    # The reference cache write keeps the suite fast; `test_greedy_through_triton_kernels` runs the Triton path.
    return MLACausalLM(model, page_size=PAGE, cache_backend="reference")


def perturbed(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """A copy with every weight matrix jittered by scale * its std: a draft model that agrees with
    the target often but not always (mixed acceptance, the interesting case)."""
    copy_ = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy_.parameters():
            if p.dim() >= 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return copy_


def deepseek_v3(vocab: int, seed: int) -> DeepseekV3ForCausalLM:
    config = DeepseekV3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, first_k_dense_replace=2, moe_intermediate_size=16, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return redraw(DeepseekV3ForCausalLM(config), seed, 3.0)


MODELS = {}


def models(kind: str, vocab: int = VOCAB):
    """(target, draft, reference) of a kind, built once per session; `reference` decodes the
    plain greedy baseline (the target itself, or the unpatched original of a patched model).

    - "mla": MLAForCausalLM carrying an MTP module; draft: a jittered copy.
    - "qwen2": transformers Qwen2ForCausalLM; draft: a jittered copy.
    - "deepseek-v3-patched": transformers DeepseekV3ForCausalLM (dense) after `mla.hf.patch`;
      draft: a smaller random one-layer Qwen2 (drafting across model kinds).
    The small-vocabulary pairs of the sampling tests use a one-layer target and a random
    one-layer Qwen2 draft: those tests run thousands of rows, and the MLA reference decode
    path loops over rows in Python.
    """
    key = (kind, vocab)
    if key not in MODELS:
        layers = 2 if vocab == VOCAB else 1
        if kind == "mla":
            target = mla_model(vocab, layers, seed=0)
            draft = perturbed(target, seed=1) if vocab == VOCAB else qwen_model(vocab, 1, seed=1)
            MODELS[key] = (with_mtp(target, seed=2), draft, target)
        elif kind == "qwen2":
            target = qwen_model(vocab, layers, seed=0)
            draft = perturbed(target, seed=1) if vocab == VOCAB else qwen_model(vocab, 1, seed=1)
            MODELS[key] = (target, draft, target)
        else:
            plain = deepseek_v3(vocab, seed=0)
            MODELS[key] = (hf.patch(copy.deepcopy(plain)), qwen_model(vocab, 1, seed=1), plain)
    return MODELS[key]


def make_drafter(name: str, kind: str, vocab: int = VOCAB) -> Drafter:
    target, draft, _ = models(kind, vocab)
    if name == "ngram":
        return NgramDrafter(1, 3)
    if name == "draft-model":
        return DraftModelDrafter(mla_target(draft) if isinstance(draft, MLAForCausalLM) else draft)
    if name == "mtp":
        return MTPDrafter(target, page_size=PAGE, cache_backend="reference")
    raise AssertionError(name)


def adapted(kind: str, vocab: int = VOCAB) -> CausalLM:
    target, _, _ = models(kind, vocab)
    return mla_target(target) if kind == "mla" else HFCausalLM(target)


def prompts_for(batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    lengths = [6] if batch == 1 else [3, 9, 1, 5]  # ragged, one single-token prompt
    return [torch.randint(VOCAB, (n,), generator=g) for n in lengths]


@torch.no_grad()
def plain_greedy(kind: str, prompts: list[torch.Tensor], n: int) -> list[list[int]]:
    """The tokens plain greedy decoding produces, one token per model call."""
    target = models(kind)[2]
    if kind == "mla":
        cache = target.new_cache(sum(-(-(len(p) + n) // PAGE) for p in prompts), PAGE)
        cache.backend = "reference"
        return target.generate_greedy(prompts, n, cache=cache).tolist()
    out = []
    for p in prompts:
        ids = p[None]
        for _ in range(n):
            ids = torch.cat([ids, target(ids).logits[:, -1:].argmax(-1)], dim=1)
        out.append(ids[0, len(p) :].tolist())
    return out


GREEDY_REFERENCE = {}
NEW_TOKENS = 14


def new_tokens(out, prompts) -> list[list[int]]:
    return [out.sequences[i, len(p) : out.lengths[i]].tolist() for i, p in enumerate(prompts)]


GREEDY_CASES = [
    pytest.param(kind, drafter, batch, k, id=f"{kind}-{drafter}-b{batch}-k{k}")
    for kind, drafters in (("mla", ("ngram", "draft-model", "mtp")), ("qwen2", ("ngram", "draft-model")))
    for drafter in drafters
    for batch in (1, 4)
    for k in ((1, 2, 3, 4, 5, 6) if batch == 4 else (1, 4))
] + [
    pytest.param("deepseek-v3-patched", drafter, 4, k, id=f"deepseek-v3-patched-{drafter}-b4-k{k}")
    for drafter in ("ngram", "draft-model")
    for k in (2, 5)
]


@pytest.mark.parametrize("kind, drafter, batch, k", GREEDY_CASES)
def test_greedy_equals_plain_greedy(kind, drafter, batch, k):
    prompts = prompts_for(batch)
    if (kind, batch) not in GREEDY_REFERENCE:
        GREEDY_REFERENCE[kind, batch] = plain_greedy(kind, prompts, NEW_TOKENS)
    out = generate(adapted(kind), prompts, make_drafter(drafter, kind), max_new_tokens=NEW_TOKENS, num_draft_tokens=k)
    assert new_tokens(out, prompts) == GREEDY_REFERENCE[kind, batch]
    s = out.stats
    assert s.new_tokens == NEW_TOKENS * batch
    assert 0 <= s.accepted <= s.drafted and s.steps >= math.ceil((NEW_TOKENS - 1) / (k + 1))


class RaggedDrafter(Drafter):
    """Wraps a drafter and puts up a random number of its k tokens per row (placeholders after):
    every verify pass is ragged."""

    def __init__(self, base: Drafter, seed: int = 0):
        self.base, self.g = base, torch.Generator().manual_seed(seed)
        self.needs_hidden = base.needs_hidden

    def start(self, *args):
        self.base.start(*args)

    def propose(self, pending, k):
        draft = self.base.propose(pending, k)
        lengths = torch.randint(0, k + 1, (len(pending),), generator=self.g)
        cut = torch.arange(k) >= lengths[:, None]
        tokens = draft.tokens.masked_fill(cut.to(draft.tokens.device), -1)
        return Draft(tokens, draft.probs, lengths=lengths.tolist())

    def accept(self, verified):
        self.base.accept(verified)

    def retain(self, rows):
        self.base.retain(rows)

    def release(self):
        self.base.release()


@pytest.mark.parametrize(
    "kind, drafter", [("mla", "mtp"), ("mla", "draft-model"), ("qwen2", "ngram"), ("deepseek-v3-patched", "ngram")]
)
def test_ragged_verify_equals_plain_greedy(kind, drafter):
    """Rows verifying different numbers of tokens in one pass (0..k each): still plain greedy."""
    prompts = prompts_for(4)
    if (kind, 4) not in GREEDY_REFERENCE:
        GREEDY_REFERENCE[kind, 4] = plain_greedy(kind, prompts, NEW_TOKENS)
    ragged = RaggedDrafter(make_drafter(drafter, kind), seed=3)
    out = generate(adapted(kind), prompts, ragged, max_new_tokens=NEW_TOKENS, num_draft_tokens=4)
    assert new_tokens(out, prompts) == GREEDY_REFERENCE[kind, 4]
    assert out.stats.drafted < 4 * 4 * out.stats.steps  # some rows put up fewer than k


def test_greedy_through_triton_kernels():
    # Verify runs the Triton decode kernel (s_q = k + 1, causal in-block mask) and the Triton
    # cache write under the interpreter; the reference is the same model decoding one token at a time.
    target = with_mtp(mla_model(VOCAB, 1, seed=3, backend="triton"), seed=4)
    prompts = prompts_for(4)[:2]
    expected = target.generate_greedy(prompts, 6, page_size=PAGE).tolist()
    for drafter in (NgramDrafter(), MTPDrafter(target, page_size=PAGE)):
        out = generate(MLACausalLM(target, page_size=PAGE), prompts, drafter, max_new_tokens=6, num_draft_tokens=3)
        assert new_tokens(out, prompts) == expected


def test_greedy_on_an_fp8_latent_cache():
    # Lossless relative to plain decoding over the same FP8 cache (quantized latents change logits).
    target = models("mla")[0]
    prompts = prompts_for(4)
    cache = target.new_cache(sum(-(-(len(p) + NEW_TOKENS) // PAGE) for p in prompts), PAGE, dtype="fp8")
    cache.backend = "reference"
    expected = target.generate_greedy(prompts, NEW_TOKENS, cache=cache).tolist()
    lm = MLACausalLM(target, page_size=PAGE, cache_backend="reference", cache_dtype="fp8")
    lm.prefill(prompts, 1)
    assert lm.cache.is_fp8
    lm.release()
    for drafter in (NgramDrafter(), make_drafter("mtp", "mla")):
        out = generate(lm, prompts, drafter, max_new_tokens=NEW_TOKENS, num_draft_tokens=3)
        assert new_tokens(out, prompts) == expected


def test_self_drafting_accepts_everything():
    # The target as its own draft model: every draft token is accepted, k + 1 tokens per step.
    target = models("qwen2")[0]
    k, n = 3, 13
    out = generate(target, prompts_for(4), DraftModelDrafter(target), max_new_tokens=n, num_draft_tokens=k)
    s = out.stats
    assert s.acceptance_rate == 1.0
    assert s.steps == math.ceil((n - 1) / (k + 1)) and s.mean_accepted_length == k + 1
    assert s.tokens_per_second > 0


@pytest.mark.parametrize("kind", ["mla", "qwen2"])
def test_eos_stops_each_row_and_pads(kind):
    prompts = prompts_for(4)
    greedy = plain_greedy(kind, prompts, NEW_TOKENS)
    eos = greedy[1][4]  # row 1 stops at its 5th token; others wherever eos first shows up, if at all
    out = generate(adapted(kind), prompts, NgramDrafter(), max_new_tokens=NEW_TOKENS, num_draft_tokens=3,
                   eos_token_id=eos, pad_token_id=VOCAB + 7)
    for i, (p, g) in enumerate(zip(prompts, greedy)):
        expected = g[: g.index(eos) + 1] if eos in g else g
        row = out.sequences[i].tolist()
        assert row[: len(p)] == p.tolist()
        assert row[len(p) : out.lengths[i]] == expected
        assert all(t == VOCAB + 7 for t in row[out.lengths[i] :])
    assert out.sequences.shape[1] == max(out.lengths.tolist())
    assert out.prompt_lengths.tolist() == [len(p) for p in prompts]


def test_tensor_input_and_default_padding():
    target = models("qwen2")[0]
    ids = torch.stack([prompts_for(1)[0], prompts_for(1)[0].flip(0)])
    greedy = plain_greedy("qwen2", list(ids), 8)
    eos = greedy[0][2]
    stop = greedy[0].index(eos) + 1
    out = generate(target, ids, NgramDrafter(), max_new_tokens=8, num_draft_tokens=2, eos_token_id=[eos, VOCAB + 1])
    width = out.sequences.shape[1]
    assert out.lengths[0] == ids.shape[1] + stop
    # padded with the first EOS id
    assert out.sequences[0].tolist() == ids[0].tolist() + greedy[0][:stop] + [eos] * (width - ids.shape[1] - stop)


# ----- rollback: after every step each row's cache is what a fresh prefill would build -----


class Probe(Drafter):
    """Wraps a drafter; after each step checks the target's (and the drafter's own) caches."""

    def __init__(self, inner: Drafter):
        self.inner, self.needs_hidden, self.checked = inner, inner.needs_hidden, 0

    def start(self, target, prompts, pending, hidden, *args):
        self.target = target
        self.texts = [p.tolist() + [t] for p, t in zip(prompts, pending.tolist())]
        self.inner.start(target, prompts, pending, hidden, *args)

    def propose(self, pending, k):
        return self.inner.propose(pending, k)

    def accept(self, verified):
        self.inner.accept(verified)
        for text, new in zip(self.texts, verified.new_tokens):
            text.extend(new)
        self.check()

    def retain(self, rows):
        self.inner.retain(rows)
        self.texts = [self.texts[r] for r in rows]

    def release(self):
        self.inner.release()

    @torch.no_grad()
    def check(self):
        kept = [text[:-1] for text in self.texts]  # everything but the pending token
        assert self.target.lengths == [len(t) for t in kept]
        fresh = type(self.target)(*self.fresh_args(self.target))
        fresh.prefill([torch.tensor(t) for t in kept], 1)
        self.assert_same_cache(self.target, fresh, "target")
        if isinstance(self.inner, DraftModelDrafter):
            lm = self.inner.lm
            assert lm.lengths == [len(t) - 1 for t in kept], "the draft cache must trail the target's by one"
            fresh = type(lm)(*self.fresh_args(lm))
            fresh.prefill([torch.tensor(t[:-1]) for t in kept], 1)
            self.assert_same_cache(lm, fresh, "draft model")
        if isinstance(self.inner, MTPDrafter):
            self.check_mtp(kept)
        self.checked += 1

    @staticmethod
    def fresh_args(lm):
        return (lm.model, PAGE, "reference") if isinstance(lm, MLACausalLM) else (lm.model,)

    def assert_same_cache(self, lm, fresh, what):
        # Same tokens through different float32 paths (chunked verify vs one prefill): agreement
        # to ~1e-6; a latent of a wrong or stale token differs by O(1).
        if isinstance(lm, MLACausalLM):
            for r, (sid, fid) in enumerate(zip(lm.seq_ids, fresh.seq_ids)):
                for layer in range(lm.cache.num_layers):
                    for name, a, b in zip(("latent", "k_pe"), lm.cache.read(layer, sid), fresh.cache.read(layer, fid)):
                        assert_close(f"{what} row {r} layer {layer} {name}", a, b, atol=1e-4)
            used = lm.cache.num_pages - lm.cache.num_free_pages
            assert used == sum(-(-n // PAGE) for n in lm.lengths), f"{what}: pages of rejected tokens were not freed"
        else:
            # Rows are right-aligned: row r's tokens are the last lengths[r] slots of each layer.
            for layer, ref in zip(lm.cache.layers, fresh.cache.layers):
                for r, n in enumerate(lm.lengths):
                    for name in ("keys", "values"):
                        a = getattr(layer, name)[r, :, lm.mask.shape[1] - n :]
                        b = getattr(ref, name)[r, :, ref.keys.shape[2] - n :]
                        assert_close(f"{what} row {r} {name}", a, b, atol=1e-4)
            assert lm.mask.sum(1).tolist() == lm.lengths and lm.mask.shape[1] == max(lm.lengths)

    def check_mtp(self, kept):
        """The MTP cache holds exactly the pairs (h_i, t_{i+1}) run before the pending token's pair."""
        d = self.inner
        fresh = mla_target(self.target.model)
        _, hidden = fresh.prefill([torch.tensor(t) for t in kept], 1, return_hidden=True)
        for r, (sid, text, h) in enumerate(zip(d.seq_ids, kept, hidden)):
            n = len(text) - 1 - (d.counts[r] - 1)  # pairs the next propose still has to run: counts[r]
            assert d.cache.length(sid) == n, f"MTP row {r}: {d.cache.length(sid)} cached pairs, expected {n}"
            if n == 0:
                continue
            cache = d.mtp.new_cache(-(-n // PAGE), PAGE, "reference")
            ref_sid = cache.add_sequence()
            d.mtp(h[None, :n], torch.tensor(text[1 : n + 1])[None], cache, [ref_sid])
            for name, a, b in zip(("latent", "k_pe"), d.cache.read(0, sid), cache.read(0, ref_sid)):
                assert_close(f"MTP row {r} {name}", a, b, atol=1e-4)


@pytest.mark.parametrize(
    "kind, drafter, temperature",
    [
        pytest.param("mla", "ngram", 0.0, id="mla-ngram-greedy"),
        pytest.param("mla", "draft-model", 1.0, id="mla-draft-model-sampled"),
        pytest.param("mla", "mtp", 1.0, id="mla-mtp-sampled"),
        pytest.param("qwen2", "ngram", 0.0, id="qwen2-ngram-greedy"),
        pytest.param("qwen2", "draft-model", 1.0, id="qwen2-draft-model-sampled"),
        pytest.param("deepseek-v3-patched", "draft-model", 1.0, id="deepseek-v3-patched-draft-model-sampled"),
    ],
)
def test_rollback_leaves_each_row_as_a_fresh_prefill(kind, drafter, temperature):
    probe = Probe(make_drafter(drafter, kind))
    g = torch.Generator().manual_seed(5)
    out = generate(adapted(kind), prompts_for(4), probe, max_new_tokens=10, num_draft_tokens=4,
                   temperature=temperature, generator=g)
    assert probe.checked == out.stats.steps > 0
    assert 0 < out.stats.accepted < out.stats.drafted, "want ragged acceptance"


# ----- sampling: the law of the continuations is the target's -----

# 4 new tokens: the first comes from the prefill, the next three from one step verifying k = 2
# drafts plus a bonus token (or from later steps after a rejection).
SMALL_VOCAB, CONTINUATION = 4, 4


@torch.no_grad()
def exact_continuation_law(kind: str, prompt: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """P(x1..xT | prompt) over all V^T continuations (T = CONTINUATION), [V^T] float64, by enumeration."""
    target = models(kind, SMALL_VOCAB)[0]
    v = SMALL_VOCAB
    law = torch.ones(1, dtype=torch.float64)  # over the prefixes of length t, in lexicographic order
    for t in range(CONTINUATION):
        prefixes = torch.cartesian_prod(*[torch.arange(v)] * t).view(-1, t) if t else torch.zeros(1, 0).long()
        seqs = torch.cat([prompt.expand(len(prefixes), -1), prefixes], dim=1)
        logits = mla_target(target).prefill(list(seqs), 1)[0] if kind == "mla" else target(seqs).logits[:, -1]
        law = (law[:, None] * probabilities(logits, temperature, top_p).double()).flatten()
    return law


SAMPLES = {"mla": 2000, "qwen2": 10000}
SAMPLING_CASES = [
    pytest.param("mla", "draft-model", 1.0, 1.0, id="mla-draft-model"),
    pytest.param("mla", "mtp", 1.0, 1.0, id="mla-mtp"),
    pytest.param("mla", "ngram", 1.0, 1.0, id="mla-ngram"),
    pytest.param("qwen2", "draft-model", 1.0, 1.0, id="qwen2-draft-model"),
    pytest.param("qwen2", "ngram", 1.0, 1.0, id="qwen2-ngram"),
    pytest.param("qwen2", "draft-model", 0.8, 0.9, id="qwen2-draft-model-t0.8-top-p0.9"),
]


def sample_continuations(kind, drafter, temperature, top_p, seed, ragged=False):
    prompt = torch.tensor([1, 3, 1, 3])  # a repeat, so the n-gram drafter finds matches
    n = SAMPLES[kind]
    target = mla_target(models(kind, SMALL_VOCAB)[0]) if kind == "mla" else models(kind, SMALL_VOCAB)[0]
    drafter = make_drafter(drafter, kind, SMALL_VOCAB)
    if ragged:
        drafter = RaggedDrafter(drafter, seed)
    g = torch.Generator().manual_seed(seed)
    out = generate(target, prompt.expand(n, -1), drafter, max_new_tokens=CONTINUATION, num_draft_tokens=2,
                   temperature=temperature, top_p=top_p, generator=g)
    outcomes = torch.zeros(n, dtype=torch.long)
    for t in range(CONTINUATION):
        outcomes = outcomes * SMALL_VOCAB + out.sequences[:, len(prompt) + t]
    return outcomes, exact_continuation_law(kind, prompt, temperature, top_p), out.stats


@pytest.mark.parametrize("kind, drafter, temperature, top_p", SAMPLING_CASES)
def test_sampled_continuations_follow_the_target_law(kind, drafter, temperature, top_p):
    outcomes, exact, stats = sample_continuations(kind, drafter, temperature, top_p, seed=11)
    assert_distribution(f"{kind} {drafter}", outcomes, exact)
    assert stats.accepted > 0


@pytest.mark.parametrize("kind", ["mla", "qwen2"])
def test_ragged_verify_keeps_the_target_law(kind):
    outcomes, exact, stats = sample_continuations(kind, "draft-model", 1.0, 1.0, seed=11, ragged=True)
    assert_distribution(f"{kind} draft-model, ragged verify", outcomes, exact)
    assert stats.accepted > 0


@pytest.mark.parametrize(
    "kind, drafter, biased",
    [
        pytest.param("mla", "draft-model", always_accept, id="mla-draft-model-always-accept"),
        pytest.param("qwen2", "ngram", always_accept, id="qwen2-ngram-always-accept"),
        pytest.param("mla", "mtp", resample_from_target, id="mla-mtp-resample-from-p", marks=pytest.mark.slow),
        pytest.param("qwen2", "ngram", resample_from_target, id="qwen2-ngram-resample-from-p"),
    ],
)
def test_sampling_check_rejects_biased_samplers(kind, drafter, biased, monkeypatch):
    # always-accept is grossly wrong (TV ~0.9 here); drawing the correction from p instead of
    # norm(max(0, p - q)) is subtle (TV ~0.1-0.16 against bounds of 0.05-0.08 at these sizes).
    monkeypatch.setattr(generate_module, "rejection_sample", biased)
    outcomes, exact, _ = sample_continuations(kind, drafter, 1.0, 1.0, seed=11)
    with pytest.raises(AssertionError, match="TV"):
        assert_distribution(f"{kind} {drafter} {biased.__name__}", outcomes, exact)


# ----- the n-gram drafter -----


class HostTarget:
    device = torch.device("cpu")


def ngram_proposal(text: list[int], k: int, min_n: int = 1, max_n: int = 3) -> tuple[list[int], int]:
    d = NgramDrafter(min_n, max_n)
    d.start(HostTarget(), [torch.tensor(text[:-1])], torch.tensor(text[-1:]), None, 0, 0.0, 1.0, None)
    return d.propose(torch.tensor(text[-1:]), k).tokens[0].tolist(), d.fallbacks


@pytest.mark.parametrize(
    "text, k, expected",
    [
        pytest.param([5, 6, 7, 8, 1, 6, 7], 2, [8, 1], id="longest-suffix"),
        pytest.param([1, 2, 9, 2, 4, 2], 1, [4], id="most-recent-occurrence"),
        pytest.param([3, 4, 3, 4, 3], 5, [4, 3, 4, 3, 4], id="copy-runs-into-itself"),
        pytest.param([7, 1, 2, 3, 0, 1, 2, 3], 3, [0, 1, 2], id="max-n-wins-over-shorter"),
    ],
)
def test_ngram_lookup(text, k, expected):
    assert ngram_proposal(text, k) == (expected, 0)


def test_ngram_without_match_repeats_the_last_token_and_says_so():
    assert ngram_proposal([1, 2, 3, 4], 3) == ([4, 4, 4], 1)
    assert ngram_proposal([1, 2, 1, 2], 2, min_n=3) == ([2, 2], 1)  # a 2-gram match, but min_n is 3


# ----- the MTP module -----


def test_a_trained_mtp_module_drafts_what_the_target_says():
    # Distil an MTP module on the target's own samples with DeepSeek's alignment ((h_i, t_{i+1})
    # predicts t_{i+2}, through the cache-free training forward). Drafting through the caches,
    # chunks and chains must use the same alignment: acceptance rises from ~0 to well above it.
    target = with_mtp(mla_model(VOCAB, 2, seed=0), seed=8)
    g = torch.Generator().manual_seed(0)
    data = generate(mla_target(target), torch.randint(VOCAB, (128, 4), generator=g), NgramDrafter(),
                    max_new_tokens=24, temperature=1.0, generator=g).sequences
    prompts = prompts_for(4)

    def acceptance():
        out = generate(mla_target(target), prompts, MTPDrafter(target, page_size=PAGE, cache_backend="reference"),
                       max_new_tokens=24, num_draft_tokens=1)
        return out.stats.acceptance_rate

    before = acceptance()
    with torch.no_grad():
        _, hidden = target(data, return_hidden=True)
    opt = torch.optim.Adam(target.mtp.parameters(), lr=3e-3)
    for _ in range(120):
        logits, _ = target.mtp(hidden[:, :-2], data[:, 1:-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 2:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = acceptance()
    assert before < 0.1 and after > 0.25, (before, after)


def deepseek_mtp_state_dict(model: MLAForCausalLM, mtp: MultiTokenPredictor) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    sd = {prefix + k: v.clone() for k, v in mtp.state_dict().items()}
    sd[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.clone()
    sd[prefix + "shared_head.head.weight"] = model.lm_head.weight.clone()
    return sd


def test_mtp_loads_deepseek_names():
    source = with_mtp(mla_model(VOCAB, 2, seed=6), seed=7)
    sd = deepseek_mtp_state_dict(source, source.mtp)
    expected_names = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                      "self_attn.kv_b_proj.weight", "mlp.gate_proj.weight", "input_layernorm.weight"}
    assert expected_names <= {k.split("layers.2.", 1)[1] for k in sd}
    model = mla_model(VOCAB, 2, seed=6)
    model.load_state_dict({k: v for k, v in source.state_dict().items() if not k.startswith("mtp.")})
    mtp = load_mtp_state_dict(model, sd)
    assert model.mtp is mtp and not any("embed" in k or "head.weight" in k for k in mtp.state_dict())
    prompts = prompts_for(4)
    a = generate(mla_target(source), prompts, MTPDrafter(source, page_size=PAGE, cache_backend="reference"),
                 max_new_tokens=8, num_draft_tokens=3)
    b = generate(mla_target(model), prompts, MTPDrafter(model, page_size=PAGE, cache_backend="reference"),
                 max_new_tokens=8, num_draft_tokens=3)
    assert torch.equal(a.sequences, b.sequences) and a.stats.accepted == b.stats.accepted


@pytest.mark.parametrize(
    "edit, match",
    [
        pytest.param(lambda sd, p: sd[p + "embed_tokens.weight"].add_(1), "embed_tokens", id="embedding-differs"),
        pytest.param(lambda sd, p: sd.pop(p + "eh_proj.weight"), "missing", id="missing-key"),
        pytest.param(lambda sd, p: sd.__setitem__(p + "mlp.experts.0.up_proj.weight", torch.zeros(1)), "unexpected",
                     id="moe-key"),
        pytest.param(lambda sd, p: [sd.pop(k) for k in list(sd)], "no MTP layer", id="no-mtp-layer"),
        pytest.param(lambda sd, p: sd.__setitem__(p + "eh_proj.weight", torch.zeros(3, 3)), "config", id="wrong-shape"),
    ],
)
def test_mtp_load_rejects_mismatched_weights(edit, match):
    model = with_mtp(mla_model(VOCAB, 2, seed=6), seed=7)
    sd = deepseek_mtp_state_dict(model, model.mtp)
    edit(sd, "model.layers.2.")
    with pytest.raises(ValueError, match=match):
        load_mtp_state_dict(model, sd)


# ----- bad inputs -----


class WrongBatchDrafter(NgramDrafter):
    def propose(self, pending, k):
        draft = super().propose(pending, k)
        return Draft(torch.cat([draft.tokens, draft.tokens[:1]]))


class TreeDrafter(NgramDrafter):
    def propose(self, pending, k):
        draft = super().propose(pending, k)
        return Draft(draft.tokens, parents=(-1,) * k)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(dict(num_draft_tokens=0), ValueError, "num_draft_tokens", id="no-draft-tokens"),
        pytest.param(dict(temperature=-1.0), ValueError, "temperature", id="negative-temperature"),
        pytest.param(dict(top_p=0.0), ValueError, "top_p", id="top-p-zero"),
        pytest.param(dict(max_new_tokens=0), ValueError, "max_new_tokens", id="no-new-tokens"),
        pytest.param(dict(input_ids=torch.tensor([1, 2, 3])), ValueError, "input_ids", id="1d-input"),
        pytest.param(dict(input_ids=[torch.tensor([1]), torch.tensor([], dtype=torch.long)]), ValueError, "prompt 1",
                     id="empty-prompt"),
        pytest.param(dict(input_ids=torch.ones(1, 3)), TypeError, "integer", id="float-input"),
        pytest.param(dict(drafter="ngram"), TypeError, "drafter", id="not-a-drafter"),
        pytest.param(dict(model=nn.Linear(2, 2)), TypeError, "model", id="not-a-causal-lm"),
        pytest.param(dict(drafter=WrongBatchDrafter()), ValueError, "active rows", id="draft-batch-mismatch"),
        pytest.param(dict(drafter=TreeDrafter()), NotImplementedError, "tree", id="token-tree"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    target = models("qwen2")[0]
    args = dict(model=target, input_ids=prompts_for(4), drafter=NgramDrafter(), max_new_tokens=4, num_draft_tokens=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        generate(**args)


def test_draft_model_cannot_share_the_target_adapter():
    target = adapted("qwen2")
    with pytest.raises(ValueError, match="adapter"):
        generate(target, prompts_for(1), DraftModelDrafter(target), max_new_tokens=4)


@pytest.mark.parametrize("kind", ["mla", "qwen2"])
def test_draft_vocabulary_mismatch(kind):
    target = models(kind)[0]
    other = mla_model(VOCAB + 3, 1, seed=1) if kind == "mla" else qwen_model(VOCAB + 3, 1, seed=1)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, prompts_for(1), DraftModelDrafter(other), max_new_tokens=4)


def test_mtp_needs_an_mla_target_with_matching_vocabulary():
    mla_target_model = models("mla")[0]
    qwen = models("qwen2")[0]
    with pytest.raises(ValueError, match="hidden states"):
        generate(qwen, prompts_for(1), MTPDrafter(mla_target_model), max_new_tokens=4)
    small = with_mtp(mla_model(VOCAB + 3, 1, seed=1), seed=2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(mla_target_model, prompts_for(1), MTPDrafter(small), max_new_tokens=4)
    with pytest.raises(ValueError, match="no MTP module"):
        MTPDrafter(mla_model(VOCAB, 1, seed=1))


@pytest.mark.parametrize(
    "make_drafter_arg, hint",
    [
        pytest.param(lambda: models("qwen2")[1], r"pass DraftModelDrafter\(model\)$", id="transformers-model"),
        pytest.param(lambda: mla_model(VOCAB, 1, seed=1), r"pass DraftModelDrafter\(model\)$", id="mla-model"),
        pytest.param(lambda: adapted("qwen2"), r"pass DraftModelDrafter\(model\)$", id="causal-lm-adapter"),
        pytest.param(lambda: models("mla")[0], r"DraftModelDrafter\(model\), or MTPDrafter\(model\) to draft",
                     id="mla-model-with-mtp"),
        pytest.param(lambda: models("mla")[0].mtp, r"pass MTPDrafter\(mtp\)$", id="mtp-module"),
        pytest.param(lambda: 3, r"got int$", id="not-a-model"),
    ],
)  # fmt: skip
def test_a_model_passed_as_the_drafter_gets_the_wrapper_it_needs(make_drafter_arg, hint):
    with pytest.raises(TypeError, match=hint):
        generate(models("qwen2")[0], prompts_for(1), make_drafter_arg(), max_new_tokens=4)
