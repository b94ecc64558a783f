"""MLAForCausalLM against transformers' DeepseekV3ForCausalLM (all layers dense) on the paged cache."""

import copy

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from mla import LatentCache, MLAConfig, MLAForCausalLM
from mla.cache import CacheFullError
from tests.utils import assert_close, max_error, randomize_

VOCAB = 101
YARN = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 4, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 1.2}  # fmt: skip
VARIANTS = {
    "v3": {},
    "v3-tied": {"tie_word_embeddings": True},
    "v3-lite-yarn": {"q_lora_rank": None, "rope_parameters": YARN},
    "v2": {"version": "v2"},
}
# Tolerance rule (as in test_attention): transformers in float64 is the expected value; our
# error may be at most 3x transformers' own float32 error against it (float64 transformers
# still runs softmax and RMSNorm in float32, so the two errors add). Measured worst 1.2x.
HF_ERROR_FACTOR = 3.0
# Our own two backends differ by summation order: measured 4e-7 * max|logit|.
REL_TOL = 5e-6
# LatentCache stores at most float32, so float64 models keep a float32 cache.
CACHE_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float32}


def hf_model(dtype=torch.float32, seed=0, version="v3", **overrides):
    """A dense 2-layer transformers DeepSeek LM with random weights (norm weights perturbed)."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, first_k_dense_replace=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0}, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    kwargs.update(overrides)
    cls = DeepseekV3ForCausalLM if version == "v3" else DeepseekV2ForCausalLM
    model = cls(DeepseekV3Config(**kwargs) if version == "v3" else DeepseekV2Config(**kwargs)).to(dtype).eval()
    return randomize_(model, seed)


def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits of one whole sequence: [T] -> [T, vocab]."""
    with torch.no_grad():
        return hf(tokens[None]).logits[0]


def assert_matches_hf(name, actual, hf32, tokens, last: int | None = None):
    """Our logits for `tokens` (the last `last` positions, or all) against float64 transformers,
    within HF_ERROR_FACTOR x float32 transformers' own error."""
    expected = hf_logits(copy.deepcopy(hf32).double(), tokens)
    own_error = max_error(hf_logits(hf32, tokens), expected)
    if last is not None:
        expected = expected[-last:]
    assert_close(name, actual, expected, atol=HF_ERROR_FACTOR * own_error)


def new_cache(model: MLAForCausalLM, dtype, pages=40, page_size=4) -> LatentCache:
    c = model.config
    return LatentCache(c.num_hidden_layers, pages, page_size, c.kv_lora_rank, c.qk_rope_head_dim, dtype=dtype,
                       backend="reference")  # fmt: skip


def run_plan(model: MLAForCausalLM, seqs, plan, cache: LatentCache) -> list[torch.Tensor]:
    """Feed token sequences step by step ((rows, n): next n tokens of `rows`); logits per sequence [T_i, vocab]."""
    ids = [cache.add_sequence() for _ in seqs]
    done, outs = [0] * len(seqs), [[] for _ in seqs]
    for rows, n in plan:
        tokens = torch.stack([seqs[r][done[r] : done[r] + n] for r in rows])
        logits = model.decode_step(tokens, cache, [ids[r] for r in rows])
        for k, r in enumerate(rows):
            outs[r].append(logits[k])
            done[r] += n
    return [torch.cat(o) for o in outs]


PLANS = {
    "prefill-then-decode": [((0,), 11), ((1,), 6), ((0, 1), 1), ((1, 0), 1), ((0, 1), 1), ((0, 1), 4)],
    "chunked-prefill": [((0, 1), 10), ((1, 0), 9), ((1,), 1)],
}
CASES = (
    [("v3", dt, plan) for dt in (torch.float32, torch.float64) for plan in PLANS]
    + [(v, torch.float32, "prefill-then-decode") for v in ("v3-tied", "v3-lite-yarn", "v2")]
)  # fmt: skip


@pytest.mark.parametrize(
    "variant, dtype, plan", [pytest.param(*c, id=f"{c[0]}-{c[2]}-{str(c[1])[6:]}") for c in CASES]
)
def test_logits_match_transformers(variant, dtype, plan):
    hf = hf_model(torch.float32, **VARIANTS[variant])
    model = MLAForCausalLM.from_hf(hf).to(dtype)
    steps = PLANS[plan]
    lengths = [sum(n for rows, n in steps if r in rows) for r in (0, 1)]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    got = run_plan(model, seqs, steps, new_cache(model, CACHE_DTYPE[dtype]))
    for i, (tokens, logits) in enumerate(zip(seqs, got)):
        assert_matches_hf(f"sequence {i}", logits, hf, tokens)


def test_tied_model_shares_embedding():
    model = MLAForCausalLM.from_hf(hf_model(**VARIANTS["v3-tied"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_prefill_ragged_prompts_returns_last_logits():
    hf = hf_model()
    model = MLAForCausalLM.from_hf(hf)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (5, 12, 5, 1)]
    cache = new_cache(model, torch.float32)
    ids = [cache.add_sequence() for _ in prompts]
    logits = model.prefill(prompts, cache, ids)
    assert logits.shape == (4, VOCAB)
    assert [cache.length(i) for i in ids] == [5, 12, 5, 1]
    for i, p in enumerate(prompts):
        assert_matches_hf(f"prompt {i}", logits[i : i + 1], hf, p, last=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_greedy_generation_matches_transformers(dtype):
    hf = hf_model(dtype, seed=3)
    model = MLAForCausalLM.from_hf(hf)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (6, 2, 9)]
    cache = new_cache(model, CACHE_DTYPE[dtype], pages=12, page_size=8)
    got = model.generate_greedy(prompts, max_new_tokens=10, cache=cache)
    assert cache.num_free_pages == 12  # generate_greedy frees its sequences
    for p, tokens in zip(prompts, got):
        want = hf.generate(p[None], do_sample=False, max_new_tokens=10, min_new_tokens=10)[0, p.numel() :]
        assert tokens.tolist() == want.tolist()


def test_generate_greedy_makes_its_own_cache():
    model = MLAForCausalLM.from_hf(hf_model())
    prompts = torch.randint(0, VOCAB, (2, 4))
    with_cache = model.generate_greedy(prompts, 3, cache=new_cache(model, torch.float32))
    assert torch.equal(model.generate_greedy(prompts, 3), with_cache)


def test_draft_verify_and_truncate_like_speculative_decoding():
    """decode_step with k + 1 tokens on ragged sequences, then roll rejected tokens back."""
    hf = hf_model(seed=5)
    model = MLAForCausalLM.from_hf(hf)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (7, 3)]
    cache = new_cache(model, torch.float32)
    ids = [cache.add_sequence() for _ in prompts]
    model.prefill(prompts, cache, ids)
    draft = torch.randint(0, VOCAB, (2, 4), generator=g)
    verify = model.decode_step(draft, cache, ids)
    assert verify.shape == (2, 4, VOCAB)
    accepted = [2, 0]  # keep two draft tokens of sequence 0, none of sequence 1
    for sid, p, k in zip(ids, prompts, accepted):
        cache.truncate(sid, p.numel() + k)
    nxt = torch.randint(0, VOCAB, (2, 1), generator=g)
    last = model.decode_step(nxt, cache, ids)[:, -1]
    for i, (p, k) in enumerate(zip(prompts, accepted)):
        assert_matches_hf(f"verify {i}", verify[i], hf, torch.cat([p, draft[i]]), last=4)
        assert_matches_hf(f"after rollback {i}", last[i : i + 1], hf, torch.cat([p, draft[i, :k], nxt[i]]), last=1)


def test_return_hidden_is_what_the_head_reads():
    hf = hf_model()
    model = MLAForCausalLM.from_hf(hf)
    tokens = torch.randint(0, VOCAB, (1, 9))
    cache = new_cache(model, torch.float32)
    with torch.no_grad():
        logits, hidden = model(tokens, cache, [cache.add_sequence()], return_hidden=True)
        want = copy.deepcopy(hf.model).double()(tokens).last_hidden_state
        own_error = max_error(hf.model(tokens).last_hidden_state, want)
    assert hidden.shape == (1, 9, 64)
    assert_close("hidden", hidden, want, atol=HF_ERROR_FACTOR * own_error)
    assert torch.equal(logits, model.lm_head(hidden))


@pytest.fixture
def triton_kernels():
    try:
        import mla.kernels  # noqa: F401
    except Exception as e:  # the kernel package is optional on the CPU
        pytest.skip(f"mla.kernels does not import: {type(e).__name__}: {e}")


def test_triton_backend_matches_reference(triton_kernels):
    hf = hf_model(seed=7)
    kernel, reference = MLAForCausalLM.from_hf(hf, backend="triton"), MLAForCausalLM.from_hf(hf, backend="reference")
    plan = [((0,), 9), ((1,), 4), ((0, 1), 1), ((1, 0), 3)]
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (13, 8)]
    got = run_plan(kernel, seqs, plan, new_cache(kernel, torch.float32))
    want = run_plan(reference, seqs, plan, new_cache(reference, torch.float32))
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(f"sequence {i}", a, b, atol=REL_TOL * b.abs().max().item())


def test_new_cache_follows_the_model():
    model = MLAForCausalLM(MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=None, kv_lora_rank=32,
                                     qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=VOCAB,
                                     num_hidden_layers=3, intermediate_size=32)).to(torch.bfloat16)  # fmt: skip
    cache = model.new_cache(num_pages=5, page_size=16)
    assert (cache.num_layers, cache.kv_lora_rank, cache.rope_dim, cache.dtype) == (3, 32, 8, torch.bfloat16)
    assert cache.pages[0].shape == (5, 16, 1, 40)
    assert model.new_cache(5, 16, dtype=torch.float32).dtype == torch.float32


def test_failed_forward_leaves_cache_as_it_was():
    model = MLAForCausalLM.from_hf(hf_model())
    cache = new_cache(model, torch.float32, pages=4, page_size=4)
    ids = [cache.add_sequence(), cache.add_sequence()]
    model.prefill(torch.randint(0, VOCAB, (2, 5)), cache, ids)
    free = cache.num_free_pages
    with pytest.raises(ValueError, match=f"token id {VOCAB}, outside the vocabulary"):
        model.decode_step(torch.tensor([[1, 2], [3, VOCAB]]), cache, ids)
    model.model.layers[1].mlp.forward = lambda x: x[:, :, :-1]  # fails after the tokens were reserved
    with pytest.raises(RuntimeError):
        model.decode_step(torch.zeros(2, 1, dtype=torch.long), cache, ids)
    del model.model.layers[1].mlp.forward
    with pytest.raises(CacheFullError):
        model.decode_step(torch.zeros(2, 4, dtype=torch.long), cache, ids)
    assert [cache.length(i) for i in ids] == [5, 5] and cache.num_free_pages == free


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda m, c, i: m.decode_step(torch.zeros(3, dtype=torch.long), c, i[:1]), "input_ids",
                     id="1d-ids"),
        pytest.param(lambda m, c, i: m.decode_step(torch.zeros(2, 1), c, i), "input_ids", id="float-ids"),
        pytest.param(lambda m, c, i: m.decode_step(torch.zeros(2, 1, dtype=torch.long), c, i[:1]),
                     "1 ids for a batch of 2", id="seq-ids-short"),
        pytest.param(lambda m, c, i: m.prefill([torch.zeros(2, dtype=torch.long)], c, i), "1 prompts for 2",
                     id="prompts-vs-ids"),
        pytest.param(lambda m, c, i: m.prefill([torch.zeros(2, dtype=torch.long), torch.zeros(0, dtype=torch.long)],
                                               c, i), "prompt 1", id="empty-prompt"),
        pytest.param(lambda m, c, i: m.generate_greedy([torch.zeros(2, dtype=torch.long)], 0), "max_new_tokens",
                     id="no-new-tokens"),
    ],
)  # fmt: skip
def test_bad_inputs_raise(call, match):
    model = MLAForCausalLM.from_hf(hf_model())
    cache = new_cache(model, torch.float32)
    ids = [cache.add_sequence(), cache.add_sequence()]
    with pytest.raises(ValueError, match=match):
        call(model, cache, ids)
    assert [cache.length(i) for i in ids] == [0, 0]
