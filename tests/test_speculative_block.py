"""The block drafter (mla.speculative.block): one drafter forward per step, adaptive verify length.

- The cached drafting step equals the cache-free training forward (the two paths of one network).
- Greedy: fixed and adaptive verify, batch 1 and a ragged batch of 4, on our MLA model and a
  transformers Qwen2, give exactly plain greedy's tokens. The drafter is first fitted for a few
  steps on the target's own greedy continuations, so that drafts are accepted and rejected.
- Sampling: with adaptive verify (different lengths per row) the law of 4-token continuations is
  the target's exact law (the total-variation check of test_speculative).
- Adaptive verify: lower survival estimates or dearer verification choose shorter lengths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mla import MLAConfig
from mla.speculative import (
    BlockDrafter,
    BlockDrafterConfig,
    BlockDraftModel,
    CostProfile,
    expected_calibration_error,
    generate,
    measure_cost_profile,
)
from mla.speculative.block import GREEDY, SAMPLED, monotone

from .stats import assert_distribution
from .test_speculative import (
    NEW_TOKENS,
    PAGE,
    SMALL_VOCAB,
    VOCAB,
    adapted,
    exact_continuation_law,
    mla_target,
    models,
    new_tokens,
    plain_greedy,
    prompts_for,
    redraw,
)

pytestmark = pytest.mark.usefixtures("one_thread")

W = 4


def drafter_config(vocab: int, target_layers: tuple[int, ...], layers: int = 1) -> BlockDrafterConfig:
    config = MLAConfig(
        hidden_size=32, num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, vocab_size=vocab, num_hidden_layers=layers, intermediate_size=48,
    )  # fmt: skip
    return BlockDrafterConfig(config, target_layers, block_size=W, markov_rank=8)


def block_drafter(model: BlockDraftModel, adaptive=None, record: bool = False) -> BlockDrafter:
    return BlockDrafter(model, adaptive=adaptive, page_size=PAGE, cache_backend="reference", record=record)


FITTED = {}


def fitted(kind: str) -> BlockDraftModel:
    """A block drafter for models(kind)'s target, trained for a few full-batch Adam steps on the
    target's greedy continuations of the test prompts and a few others (cross entropy of the
    drafts, binary cross entropy of the greedy confidence): it drafts some of the test
    continuations right and some wrong."""
    if kind in FITTED:
        return FITTED[kind]
    target = models(kind)[0]
    lm = adapted(kind)
    layers = (1, lm.num_layers)
    torch.manual_seed(0)
    model = BlockDraftModel(drafter_config(VOCAB, layers), backend="reference").attach(target)
    g = torch.Generator().manual_seed(7)
    prompts = prompts_for(4) + prompts_for(1) + [torch.randint(VOCAB, (6,), generator=g) for _ in range(3)]
    length = 20
    tokens = torch.stack([torch.cat([p, torch.tensor(plain_greedy(kind, [p], length - len(p))[0])]) for p in prompts])
    with torch.no_grad():
        features = torch.stack(lm.prefill(list(tokens), 1, return_hidden=layers)[1])
    lm.release()
    anchors = torch.arange(1, length - W + 1).expand(len(tokens), -1)
    labels = tokens.gather(1, (anchors[..., None] + torch.arange(1, W + 1)).flatten(1).clamp_max(length - 1))
    valid = (anchors[..., None] + torch.arange(1, W + 1) < length).flatten(1)  # the last block's last label is past the end
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        hidden, base, logits = model.teacher_forced(features, tokens, anchors)
        logits = logits.flatten(1, 2)  # [b, N * W, V], as labels
        right = (logits.argmax(-1) == labels).float()
        confidence = model.confidence_logits(hidden.detach(), base.detach())[..., GREEDY].flatten(1)
        loss = (F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
                + F.binary_cross_entropy_with_logits(confidence, right, reduction="none"))[valid].mean()  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    FITTED[kind] = model.eval()
    return FITTED[kind]


def test_cached_drafting_equals_the_training_forward():
    """Two drafting steps through the drafter's cache, rows adding different numbers of context
    entries, give the block states of the cache-free forward at the same pending positions."""
    target = models("mla")[0]
    torch.manual_seed(0)
    model = redraw(BlockDraftModel(drafter_config(VOCAB, (1, 2), layers=2), backend="reference"), 3, 1.0)
    model.attach(target)
    tokens = torch.randint(VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))
    lm = mla_target(target)
    with torch.no_grad():
        features = torch.stack(lm.prefill(list(tokens), 1, return_hidden=(1, 2))[1])
        lm.release()
        anchors = torch.tensor([[3, 9], [5, 6]])  # second step: 6 and 1 new context entries
        expected = model(features, tokens, anchors)
        cache = model.new_cache(16, PAGE, "reference")
        ids = [cache.add_sequence() for _ in range(2)]
        context = model.context(features)
        done = [0, 0]
        for n in range(2):
            counts = [a - d for a, d in zip(anchors[:, n].tolist(), done)]
            chunk = torch.nn.utils.rnn.pad_sequence([context[r, d : d + c] for r, (d, c) in enumerate(zip(done, counts))],
                                                    batch_first=True)  # fmt: skip
            states = model.draft_block(chunk, counts, tokens.gather(1, anchors[:, n : n + 1])[:, 0], cache, ids)
            done = anchors[:, n].tolist()
            assert [cache.length(i) for i in ids] == done  # the context stays, the block does not
            torch.testing.assert_close(states, expected[:, n], atol=2e-5, rtol=2e-5)


GREEDY_CASES = [
    pytest.param(kind, batch, adaptive, id=f"{kind}-b{batch}-{'adaptive' if adaptive else 'fixed'}")
    for kind in ("mla", "qwen2")
    for batch in (1, 4)
    for adaptive in (False, True)
]
# verifying is dear here, so adaptive rows put up fewer than W drafts when unsure
STEEP = CostProfile((1.0, 1.3, 1.6, 1.9, 2.2))


@pytest.mark.parametrize("kind, batch, adaptive", GREEDY_CASES)
def test_greedy_equals_plain_greedy(kind, batch, adaptive):
    prompts = prompts_for(batch)
    drafter = block_drafter(fitted(kind), STEEP if adaptive else None, record=True)
    out = generate(adapted(kind), prompts, drafter, max_new_tokens=NEW_TOKENS, num_draft_tokens=W)
    assert new_tokens(out, prompts) == plain_greedy(kind, prompts, NEW_TOKENS)
    s = out.stats
    if batch == 4:
        assert 0 < s.accepted < s.drafted
    if adaptive:
        assert s.drafted < W * s.row_steps  # some rows verified fewer than W
    assert len(drafter.calibration_pairs) == s.drafted
    assert sum(o for _, o in drafter.calibration_pairs) == s.accepted


def test_adaptive_verifies_less_when_less_confident():
    prompts = prompts_for(4)
    model = fitted("mla")
    lengths = {}
    for shift in (4.0, -4.0):  # calibration pushing every survival estimate up, then down
        model.calibration[GREEDY] = torch.tensor([1.0, shift])
        out = generate(adapted("mla"), prompts, block_drafter(model, STEEP), max_new_tokens=NEW_TOKENS,
                       num_draft_tokens=W)  # fmt: skip
        assert new_tokens(out, prompts) == plain_greedy("mla", prompts, NEW_TOKENS)
        lengths[shift] = out.stats.drafted / out.stats.row_steps
    model.calibration[GREEDY] = torch.tensor([1.0, 0.0])
    assert lengths[-4.0] < 1.0 < lengths[4.0]


def test_choose_trades_survival_against_cost():
    survival = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.25, 0.1, 0.03, 0.01], [0.9, 0.5, 0.4, 0.3]])
    flat = CostProfile((1.0,) * 5)
    assert flat.choose(survival).tolist() == [4, 4, 4]  # free verification: put everything up
    assert STEEP.choose(survival).tolist() == [4, 0, 2]
    # (1 + 0.25) / 1.04 > 1 / 1: a cheap step verifies even an unlikely first draft
    assert CostProfile((1.0, 1.04, 1.5, 2.0, 2.5)).choose(survival).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="up to 2"):
        CostProfile((1.0, 1.1, 1.2)).choose(survival)
    with pytest.raises(ValueError, match="positive"):
        CostProfile((1.0, 0.0))


def test_measured_costs_are_made_non_decreasing():
    assert monotone([1.0, 1.2, 0.9, 1.5]) == pytest.approx((1.0, 1.05, 1.05, 1.5))
    assert monotone([1.0, 1.55, 1.01, 1.23, 1.5]) == pytest.approx((1.0, 3.79 / 3, 3.79 / 3, 3.79 / 3, 1.5))
    assert monotone([2.0, 1.0]) == (1.5, 1.5) and monotone([1.0, 2.0]) == (1.0, 2.0)


def test_cost_profile_measures_and_round_trips(tmp_path):
    target = models("mla")[0]
    model = BlockDraftModel(drafter_config(VOCAB, (2,)), backend="reference").attach(target)
    profile = measure_cost_profile(mla_target(target), model, temperature=1.0, prompt_length=8, repeats=1,
                                   page_size=PAGE)  # fmt: skip
    assert len(profile.step) == W + 1 and min(profile.step) > 0 and "cpu" in profile.device
    assert list(profile.step) == sorted(profile.step)
    profile.save(tmp_path / "cost.json")
    assert CostProfile.load(tmp_path / "cost.json") == profile
    assert len(CostProfile.default().step) > W


def test_expected_calibration_error():
    assert expected_calibration_error([0.25, 0.25, 0.75, 0.75], [0, 0.5, 1, 0.5]) == pytest.approx(0.0)
    # one bin predicts 0.9 where half come true, the other 0.1 where none do
    assert expected_calibration_error([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0]) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)


@pytest.mark.parametrize("kind", ["mla", "qwen2"])
def test_sampled_continuations_follow_the_target_law(kind):
    """Adaptive verify at temperature 1: lengths differ per row and step, the law stays p's."""
    target = models(kind, SMALL_VOCAB)[0]
    layers = (1,)
    torch.manual_seed(0)
    model = redraw(BlockDraftModel(drafter_config(SMALL_VOCAB, layers)), 4, 1.0).attach(target)
    with torch.no_grad():
        model.markov_out.weight.mul_(4.0)  # a strong Markov bias: a q that left it out would show
    model.calibration[SAMPLED] = torch.tensor([3.0, 1.0])  # spread the estimates, so lengths differ
    n = {"mla": 2000, "qwen2": 6000}[kind]
    prompt = torch.tensor([1, 3, 1, 3])
    g = torch.Generator().manual_seed(11)
    lm = mla_target(target) if kind == "mla" else target
    out = generate(lm, prompt.expand(n, -1), block_drafter(model, CostProfile((1.0, 1.1, 1.25))),
                   max_new_tokens=4, num_draft_tokens=2, temperature=1.0, generator=g)  # fmt: skip
    outcomes = torch.zeros(n, dtype=torch.long)
    for t in range(4):
        outcomes = outcomes * SMALL_VOCAB + out.sequences[:, len(prompt) + t]
    assert_distribution(f"{kind} block drafter, adaptive", outcomes, exact_continuation_law(kind, prompt, 1.0, 1.0))
    s = out.stats
    assert 0 < s.accepted and 0 < s.drafted < 2 * s.row_steps


@pytest.mark.parametrize(
    "layers, k, match",
    [
        pytest.param((2,), W + 1, "at most its block size", id="k-above-W"),
        pytest.param((3,), W, r"hidden-state indices in \[0, 2\], got \(3,\)", id="target-layer-out-of-range"),
    ],
)
def test_bad_inputs(layers, k, match):
    target = models("mla")[0]
    model = BlockDraftModel(drafter_config(VOCAB, layers)).attach(target)
    with pytest.raises(ValueError, match=match):
        generate(mla_target(target), prompts_for(1), block_drafter(model), max_new_tokens=12, num_draft_tokens=k)


def test_the_drafter_shares_a_matching_target_head():
    target = models("mla")[0]
    with pytest.raises(ValueError, match="attach"):
        generate(mla_target(target), prompts_for(1), block_drafter(BlockDraftModel(drafter_config(VOCAB, (2,)))))
    with pytest.raises(ValueError, match="LM head"):
        BlockDraftModel(drafter_config(VOCAB + 1, (2,))).attach(target)


def test_config_round_trips_and_rejects_bad_values():
    config = drafter_config(VOCAB, (0, 2))
    assert BlockDrafterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="target_layers"):
        BlockDrafterConfig(config.layers, ())
    with pytest.raises(ValueError, match="block_size"):
        BlockDrafterConfig(config.layers, (1,), block_size=0)
