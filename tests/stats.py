"""Statistical checks for samplers, shared by the speculative-decoding tests.

`assert_distribution` compares an empirical distribution over M outcomes with the exact one by
total variation. With N independent samples, E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / N) (Jensen
on each |p_hat_i - p_i|), and TV moves by at most 1/N when one sample changes, so by McDiarmid
P(TV > E[TV] + t) <= exp(-2 N t^2). The threshold uses t = sqrt(ln(1/delta) / (2N)) with
delta = 1e-6: a correct sampler fails with probability < 1e-6 (and the seeds are fixed, so the
suite is deterministic anyway). The biased samplers below must fail the same assertion.
"""

from __future__ import annotations

import math

import torch

from mla.speculative import probabilities
from mla.speculative.sampling import sample

FALSE_FAILURE = 1e-6


def tv_threshold(expected: torch.Tensor, n: int, delta: float = FALSE_FAILURE) -> float:
    """Total-variation bound a correct sampler's empirical distribution stays under w.p. >= 1 - delta."""
    p = expected.double()
    return 0.5 * (p * (1 - p) / n).sqrt().sum().item() + math.sqrt(math.log(1 / delta) / (2 * n))


def assert_distribution(name: str, outcomes: torch.Tensor, expected: torch.Tensor) -> float:
    """outcomes: int64 [N] in [0, M); expected: [M] exact probabilities. Returns the TV distance."""
    n, m = outcomes.numel(), expected.numel()
    empirical = torch.bincount(outcomes, minlength=m).double() / n
    tv = 0.5 * (empirical - expected.double()).abs().sum().item()
    bound = tv_threshold(expected, n)
    if tv > bound:
        worst = (empirical - expected.double()).abs().topk(min(3, m)).indices.tolist()
        detail = ", ".join(f"outcome {i}: {empirical[i]:.4f} vs {expected[i]:.4f}" for i in worst)
        raise AssertionError(f"{name}: TV {tv:.4f} > bound {bound:.4f} over {n} samples ({detail})")
    return tv


def always_accept(target_logits, draft_tokens, draft_probs=None, temperature=1.0, top_p=1.0, generator=None):
    """Biased: skips the acceptance test; the bonus token comes from p as it should."""
    bonus = sample(probabilities(target_logits[:, -1], temperature, top_p), generator)
    return torch.cat([draft_tokens, bonus[:, None]], 1), torch.full((draft_tokens.shape[0],), draft_tokens.shape[1] + 1)


def resample_from_target(target_logits, draft_tokens, draft_probs=None, temperature=1.0, top_p=1.0, generator=None):
    """Biased: the classic mistake of drawing the correction from p instead of norm(max(0, p - q))."""
    b, k = draft_tokens.shape
    p = probabilities(target_logits, temperature, top_p)
    q = torch.nn.functional.one_hot(draft_tokens, p.shape[-1]).float() if draft_probs is None else draft_probs.float()
    p_x = p[:, :k].gather(-1, draft_tokens[..., None])[..., 0]
    q_x = q.gather(-1, draft_tokens[..., None])[..., 0]
    u = torch.rand(b, k, generator=generator)
    accepted = (u * q_x < p_x).long().cumprod(1).sum(1)
    last = sample(p[torch.arange(b), accepted], generator)
    emitted = torch.cat([draft_tokens, last[:, None]], 1).scatter(1, accepted[:, None], last[:, None])
    return emitted, accepted + 1
