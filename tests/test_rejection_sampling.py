"""mla.speculative.rejection_sample: greedy matching, and the lossless sampling rule checked statistically.

The statistical check is `tests.stats.assert_distribution` (a total-variation bound with a 1e-6
false-failure probability); each check is paired with deliberately biased samplers that the same
assertion must reject.
"""

from __future__ import annotations

import math

import pytest
import torch

from mla.speculative import probabilities, rejection_sample, sampling
from mla.speculative.sampling import sample

from .stats import always_accept, assert_distribution, resample_from_target, tv_threshold

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tv_threshold_is_calibrated():
    # Draws from the exact distribution itself, 200 times: the bound must never be hit. It is not
    # absurdly loose either: the mean TV is within a factor 8 of it (the McDiarmid term, which buys
    # the 1e-6 false-failure rate, is most of the bound at this N).
    g = torch.Generator().manual_seed(0)
    expected = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    tvs = [assert_distribution("exact", torch.multinomial(expected, 4000, True, generator=g), expected)
           for _ in range(200)]
    assert sum(tvs) / len(tvs) > tv_threshold(expected, 4000) / 8


# Hand examples for greedy: target argmax per position is [2, 0, 3, 1].
GREEDY_LOGITS = torch.tensor([[[0.0, 1.0, 5.0, 2.0], [4.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 9.0], [0.0, 7.0, 0.0, 0.0]]])


@pytest.mark.parametrize(
    "draft, emitted, num",
    [
        pytest.param([2, 0, 3], [2, 0, 3, 1], 4, id="all-accepted-bonus"),
        pytest.param([2, 0, 1], [2, 0, 3, -1], 3, id="third-rejected"),
        pytest.param([1, 0, 3], [2, -1, -1, -1], 1, id="first-rejected-rest-ignored"),
        pytest.param([2, 1, 3], [2, 0, -1, -1], 2, id="second-rejected"),
    ],
)
def test_greedy_matches_argmax(draft, emitted, num):
    out, n = rejection_sample(GREEDY_LOGITS, torch.tensor([draft]), temperature=0.0)
    assert out.tolist() == [emitted] and n.tolist() == [num]


def test_greedy_ignores_draft_probs_and_is_batched():
    logits = torch.cat([GREEDY_LOGITS, GREEDY_LOGITS.flip(-1)])  # second row's argmax: [1, 3, 0, 2]
    draft = torch.tensor([[2, 0, 0], [1, 3, 0]])
    q = torch.full((2, 3, 4), 0.25)
    out, n = rejection_sample(logits, draft, q, temperature=0.0)
    assert out.tolist() == [[2, 0, 3, -1], [1, 3, 0, 2]] and n.tolist() == [3, 4]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_no_draft_tokens_is_a_plain_decode_step(temperature):
    logits = torch.tensor([[[0.0, 0.0, 30.0]], [[30.0, 0.0, 0.0]]])
    out, n = rejection_sample(logits, torch.empty(2, 0, dtype=torch.long), temperature=temperature)
    assert out.tolist() == [[2], [0]] and n.tolist() == [1, 1]


# Target argmax per position [2, 0, 3, 1], each with probability > 1 - 1e-12 at temperature 1, so
# sampling is as deterministic as greedy on these logits.
SHARP_LOGITS = GREEDY_LOGITS * 10


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("with_probs", [False, True], ids=["one-hot-q", "draft-probs"])
@pytest.mark.parametrize(
    "draft, emitted, num",
    [
        pytest.param([-1, -1, -1], [2, -1, -1, -1], 1, id="whole-row-placeholder"),
        pytest.param([2, -1, 3], [2, 0, -1, -1], 2, id="placeholder-rejects-the-rest"),
        pytest.param([2, 0, -1], [2, 0, 3, -1], 3, id="placeholder-last"),
        pytest.param([2, 0, -7], [2, 0, 3, -1], 3, id="any-negative-id"),
    ],
)
def test_negative_draft_ids_are_placeholders(draft, emitted, num, temperature, with_probs):
    """Always rejected, and the target's own token is emitted there, whatever q says (here q puts
    all its mass on the target's argmax, which a placeholder must not borrow)."""
    q = torch.nn.functional.one_hot(torch.tensor([[2, 0, 3]]), 4).float() if with_probs else None
    logits = torch.cat([SHARP_LOGITS, SHARP_LOGITS])
    draft = torch.tensor([draft, [2, 0, 3]])
    out, n = rejection_sample(logits, draft, None if q is None else q.expand(2, 3, 4), temperature=temperature,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.tolist() == [emitted, [2, 0, 3, 1]] and n.tolist() == [num, 4]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_draft_ids_past_the_vocabulary_raise_on_cpu(temperature):
    draft = torch.tensor([[2, 0, 3], [2, 4, -1]])
    with pytest.raises(ValueError, match=r"draft_tokens\[1, 1\] = 4 is not in the target's vocabulary \[0, 4\)"):
        rejection_sample(torch.cat([SHARP_LOGITS, SHARP_LOGITS]), draft, temperature=temperature)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_draft_ids_are_never_read_on_the_host_off_cpu(temperature):
    """On the meta device reading any value raises, so this passes only if nothing syncs."""
    logits = SHARP_LOGITS.to("meta").expand(3, 4, 4)
    draft = torch.tensor([[2, 0, 3], [2, 9, 3], [-1, -1, -1]]).to("meta")
    out, n = rejection_sample(logits, draft, temperature=temperature)
    assert out.shape == (3, 4) and n.shape == (3,)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_draft_ids_past_the_vocabulary_are_placeholders_off_cpu(temperature, monkeypatch):
    """Off the CPU the only difference is the skipped check; what remains must reject the id."""
    monkeypatch.setattr(sampling, "_check_below_vocab", lambda draft_tokens, vocab: None)
    out, n = rejection_sample(SHARP_LOGITS, torch.tensor([[2, 4, 3]]), temperature=temperature,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.tolist() == [[2, 0, -1, -1]] and n.tolist() == [2]


def test_placeholders_keep_sampling_lossless():
    """Drafts where a random 30% of the tokens are replaced by placeholders still emit exactly P."""

    def with_placeholders(target_logits, draft_tokens, draft_probs=None, **kwargs):
        holes = torch.rand(draft_tokens.shape, generator=kwargs["generator"]) < 0.3
        return rejection_sample(target_logits, draft_tokens.masked_fill(holes, -1), draft_probs, **kwargs)

    g = torch.Generator().manual_seed(7)
    outcomes, exact = run_chain("dense-q", with_placeholders, g)
    assert_distribution("placeholders", outcomes, exact)


def test_probabilities_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1)
    assert torch.allclose(probabilities(logits, 1.0), logits.exp())
    assert torch.allclose(probabilities(logits, 0.5), torch.softmax(logits * 2, -1))
    p = logits.exp()  # [0.644, 0.237, 0.087, 0.032]
    # top_p 0.7 keeps tokens whose preceding mass is < 0.7: the first two (0 and 0.644).
    assert torch.allclose(probabilities(logits, 1.0, 0.7), torch.cat([p[:2] / p[:2].sum(), torch.zeros(2)]))
    # A tiny top_p still keeps the most likely token.
    assert probabilities(logits, 1.0, 1e-9).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_sample_follows_probabilities_and_never_picks_zero_mass():
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.0, 0.6, 0.0, 0.3, 0.1])
    draws = sample(probs.expand(100_000, 5), g)
    assert not torch.isin(draws, torch.tensor([0, 2])).any()
    assert_distribution("sample", draws, probs)


# A tiny "language model" as explicit tables over V = 4 tokens: the target P(y1), P(y2 | y1),
# P(y3 | y1, y2) and the draft Q(d1), Q(d2 | d1). k = 2 drafts, and a continuation of 3 tokens is
# completed by plain ancestral sampling from P after the emitted ones, so its exact law is P's.
V, K, N_SAMPLES = 4, 2, 200_000


def random_tables(g: torch.Generator, zeros: float) -> list[torch.Tensor]:
    """[P0 [V], P1 [V, V], P2 [V, V, V]] with about `zeros` of the entries set to 0 (never a whole row)."""
    tables = []
    for shape in [(V,), (V, V), (V, V, V)]:
        t = torch.rand(shape, generator=g, dtype=torch.float64) ** 2
        t = t.masked_fill(torch.rand(shape, generator=g) < zeros, 0.0)
        t[..., int(torch.randint(V, (1,), generator=g))] += 0.05
        tables.append(t / t.sum(-1, keepdim=True))
    return tables


def case_tables(case: str):
    """(target tables, target temperature, top_p, draft tables or None for a one-hot drafter)."""
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    if case == "dense-q":
        return random_tables(g, 0.0), 1.0, 1.0, random_tables(g, 0.0)[:2]
    if case == "disjoint-support":
        # p has mass where q has none and vice versa: q puts mass on tokens p never emits.
        p = random_tables(g, 0.0)
        p[0] = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
        q = random_tables(g, 0.0)[:2]
        q[0] = torch.tensor([0.0, 0.3, 0.7, 0.0], dtype=torch.float64)
        q[1][:, 0] = 0.0
        q[1][:, 3] = 0.6
        q[1] = q[1] / q[1].sum(-1, keepdim=True)
        return p, 1.0, 1.0, q
    if case == "sparse-both":
        return random_tables(g, 0.4), 1.0, 1.0, random_tables(g, 0.4)[:2]
    if case == "one-hot-draft":
        return random_tables(g, 0.2), 1.0, 1.0, None
    if case == "temperature-top-p":
        return random_tables(g, 0.0), 0.7, 0.8, random_tables(g, 0.0)[:2]
    raise AssertionError(case)


def filtered(table: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution actually sampled from: `probabilities` of log(table), in float64."""
    return probabilities(table.log(), temperature, top_p).double()


def run_chain(case: str, sampler, g: torch.Generator):
    """Draw N_SAMPLES drafts, let `sampler` accept/emit, complete to 3 tokens from P.

    Returns (outcome index [N] in [0, V^3), exact P over the V^3 outcomes)."""
    (p0, p1, p2), temperature, top_p, q_tables = case_tables(case)
    n = N_SAMPLES
    if q_tables is None:
        # A deterministic drafter: d1 fixed, d2 a function of d1 (q one-hot, draft_probs None).
        d1 = torch.full((n,), 3)
        d2 = (d1 + 2) % V
        q = None
    else:
        q0, q1 = (filtered(t, temperature, top_p) for t in q_tables)
        d1 = torch.multinomial(q0, n, replacement=True, generator=g)
        d2 = torch.multinomial(q1[d1], 1, generator=g).squeeze(1)
        q = torch.stack([q0.expand(n, V), q1[d1]], dim=1)
    draft = torch.stack([d1, d2], dim=1)
    logits = torch.stack([p0.log().expand(n, V), p1[d1].log(), p2[d1, d2].log()], dim=1)
    emitted, num = sampler(logits, draft, q, temperature=temperature, top_p=top_p, generator=g)
    assert ((num >= 1) & (num <= K + 1)).all()
    pf0, pf1, pf2 = (filtered(t, temperature, top_p) for t in (p0, p1, p2))
    y1 = emitted[:, 0]
    y2 = torch.where(num >= 2, emitted[:, 1], torch.multinomial(pf1[y1], 1, generator=g).squeeze(1))
    y3 = torch.where(num >= 3, emitted[:, 2], torch.multinomial(pf2[y1, y2], 1, generator=g).squeeze(1))
    exact = pf0[:, None, None] * pf1[:, :, None] * pf2
    return (y1 * V + y2) * V + y3, exact.flatten()


CASES = ["dense-q", "disjoint-support", "sparse-both", "one-hot-draft", "temperature-top-p"]


@pytest.mark.parametrize("case", CASES)
def test_emitted_tokens_follow_the_target_distribution(case):
    g = torch.Generator().manual_seed(7)
    outcomes, exact = run_chain(case, rejection_sample, g)
    assert_distribution(case, outcomes, exact)


@pytest.mark.parametrize("biased", [always_accept, resample_from_target], ids=["always-accept", "resample-from-p"])
@pytest.mark.parametrize("case", ["dense-q", "disjoint-support", "sparse-both"])
def test_biased_samplers_fail_the_same_check(case, biased):
    g = torch.Generator().manual_seed(7)
    outcomes, exact = run_chain(case, biased, g)
    with pytest.raises(AssertionError, match="TV"):
        assert_distribution(case, outcomes, exact)


def test_acceptance_probability_is_min_one_p_over_q():
    # One position, p = [0.6, 0.4, 0], q = [0.2, 0.5, 0.3]: P(accept) = sum_x min(p, q) = 0.2 + 0.4 = 0.6.
    g = torch.Generator().manual_seed(3)
    n = 100_000
    p = torch.tensor([0.6, 0.4, 0.0])
    q = torch.tensor([0.2, 0.5, 0.3])
    draft = torch.multinomial(q, n, replacement=True, generator=g)[:, None]
    logits = p.log().expand(n, 2, 3)
    emitted, num = rejection_sample(logits, draft, q.expand(n, 1, 3), temperature=1.0, generator=g)
    accepted = (num == 2).double().mean().item()
    assert abs(accepted - 0.6) < 5 * math.sqrt(0.24 / n)
    assert not (emitted[num == 2, 0] == 2).any(), "a token with p = 0 was accepted"
    # Rejections emit norm(max(0, p - q)) = [1, 0, 0].
    assert (emitted[num == 1, 0] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(temperature=-0.1), "temperature", id="negative-temperature"),
        pytest.param(dict(temperature=float("nan")), "temperature", id="nan-temperature"),
        pytest.param(dict(top_p=0.0), "top_p", id="top-p-zero"),
        pytest.param(dict(top_p=1.5), "top_p", id="top-p-above-one"),
        pytest.param(dict(target_logits=torch.zeros(2, 3, 5)), "target_logits", id="k-mismatch"),
        pytest.param(dict(target_logits=torch.zeros(3, 4, 5)), "target_logits", id="batch-mismatch"),
        pytest.param(dict(draft_probs=torch.zeros(2, 3, 4)), "draft_probs", id="probs-vocab-mismatch"),
        pytest.param(dict(draft_tokens=torch.zeros(2, 3, 1, dtype=torch.long)), "draft_tokens", id="tokens-rank"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, match):
    args = dict(target_logits=torch.zeros(2, 4, 5), draft_tokens=torch.zeros(2, 3, dtype=torch.long),
                draft_probs=None, temperature=1.0, top_p=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rejection_sample(**args)


def test_float_draft_tokens_raise_type_error():
    with pytest.raises(TypeError, match="draft_tokens"):
        rejection_sample(torch.zeros(1, 2, 3), torch.zeros(1, 1), temperature=0.0)
