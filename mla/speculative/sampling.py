"""Token distributions and the lossless acceptance rule of speculative sampling.

The rule (Leviathan et al. 2023; Chen et al. 2023): with target distribution p and draft
distribution q at each draft position, accept draft token x with probability min(1, p(x) / q(x));
at the first rejection emit a token drawn from norm(max(0, p - q)); if all k drafts are accepted,
emit a bonus token from p at position k. Every emitted token is then distributed exactly as if it
had been sampled from p token by token.
"""

from __future__ import annotations

import torch

# Emitted-token slots past `num_emitted` hold this value, so using one by mistake fails loudly.
# In draft_tokens, any negative id (this one included) is a placeholder: see `rejection_sample`.
PAD = -1


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise ValueError for a temperature < 0 or a top_p outside (0, 1]."""
    if not temperature >= 0:  # written so that NaN fails too
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution we sample from: softmax(logits / temperature), then nucleus (top-p) filtering.

    Top-p keeps, in order of decreasing probability, every token whose preceding mass is < top_p
    (so at least the most likely token), and renormalises. A drafter must build its q with this
    same function and the same temperature/top_p, or the draft it proposes is not from the q the
    acceptance rule divides by, and sampling is no longer lossless.

    Args:
        logits: [..., V] any float dtype.
        temperature: > 0 (temperature 0 means argmax and never reaches this function).
        top_p: in (0, 1].

    Returns:
        float32 [..., V], each row summing to 1.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [..., V] -> int64 [...], without a host-device synchronisation.

    argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i (E_i / p_i ~ Exp(p_i) and the
    smallest of independent exponentials is i with probability p_i / sum p); unlike
    torch.multinomial it never checks its input on the host. E is clamped away from 0 so a
    zero-probability token can never produce 0/0.
    """
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _check_below_vocab(draft_tokens: torch.Tensor, vocab: int) -> None:
    """Raise ValueError naming the first draft id >= vocab (CPU tensors only: no sync)."""
    bad = (draft_tokens >= vocab).nonzero()
    if len(bad):
        row, j = bad[0].tolist()
        raise ValueError(
            f"draft_tokens[{row}, {j}] = {draft_tokens[row, j].item()} is not in the target's vocabulary "
            f"[0, {vocab}) (negative ids are placeholders; ids >= {vocab} are errors)"
        )


def rejection_sample(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a prefix of each row's draft and emit the tokens the target would have produced.

    Args:
        target_logits: [b, k+1, V] float; position j scores the token after draft token j-1
            (position 0: after the last accepted token; position k: the bonus position).
        draft_tokens: int64 [b, k], a chain of draft tokens per row (k may be 0). A negative id is
            a placeholder, "no draft here" (a row with fewer drafts than k fills the rest with -1):
            it is always rejected, and so is everything after it; the token emitted there is the
            target's own (greedy: its argmax; sampling: drawn from p, as if q were 0 there, so
            the output stays exactly p's). An id >= V is a drafter bug (a vocabulary mismatch):
            on CPU tensors it raises ValueError naming the row, position and value; on other
            devices it is treated as a placeholder, because reading the values there would cost
            a host-device synchronisation (and indexing with it a device-side assert).
        draft_probs: [b, k, V] float, the distribution q each draft token was drawn from, built with
            the same temperature and top_p as the target (see `probabilities`). None means the
            drafter is deterministic: q is one-hot at the draft token.
        temperature: 0 for greedy (accept while the draft equals the target's argmax; q is then
            ignored), > 0 for sampling.
        top_p: nucleus filter applied to the target distribution p.
        generator: torch.Generator for the uniform draws and the residual/bonus sample.

    Returns:
        emitted: int64 [b, k+1]; row i's first num_emitted[i] entries are its accepted draft tokens
            followed by one token from the target (the correction at the first rejection, or the
            bonus token after a fully accepted draft); the rest are -1.
        num_emitted: int64 [b], in [1, k+1] (accepted drafts + 1).
    """
    if target_logits.dim() != 3 or draft_tokens.dim() != 2:
        raise ValueError(
            f"target_logits must be [b, k+1, V] and draft_tokens [b, k], got {tuple(target_logits.shape)} "
            f"and {tuple(draft_tokens.shape)}"
        )
    if draft_tokens.dtype != torch.int64:
        raise TypeError(f"draft_tokens must be int64, got {draft_tokens.dtype}")
    b, k = draft_tokens.shape
    if target_logits.shape[:2] != (b, k + 1):
        raise ValueError(
            f"target_logits must be [{b}, {k + 1}, V] for draft_tokens of shape {tuple(draft_tokens.shape)}, "
            f"got {tuple(target_logits.shape)}"
        )
    vocab = target_logits.shape[-1]
    if draft_probs is not None and draft_probs.shape != (b, k, vocab):
        raise ValueError(f"draft_probs must be [{b}, {k}, {vocab}], got {tuple(draft_probs.shape)}")
    check_sampling(temperature, top_p)
    if draft_tokens.device.type == "cpu":
        _check_below_vocab(draft_tokens, vocab)
    positions = torch.arange(k + 1, device=target_logits.device)

    if temperature == 0:
        # Greedy: the target's own choices at every position; the draft survives while it agrees
        # (a placeholder never equals an argmax, so it is rejected with no special case).
        target_tokens = target_logits.argmax(dim=-1)  # [b, k+1]
        accepted = (target_tokens[:, :k] == draft_tokens).long().cumprod(dim=1).sum(dim=1)  # [b]
        emitted = target_tokens
    else:
        p = probabilities(target_logits, temperature, top_p)  # [b, k+1, V]
        drafted = (draft_tokens >= 0) & (draft_tokens < vocab)  # [b, k], False at placeholders
        index = draft_tokens.clamp(0, vocab - 1).unsqueeze(-1)  # [b, k, 1], in range for gather
        if draft_probs is None:
            q = torch.zeros_like(p[:, :k]).scatter_(-1, index, drafted.unsqueeze(-1).to(p.dtype))
        else:
            q = draft_probs.float().masked_fill(~drafted.unsqueeze(-1), 0.0)
        p_x = p[:, :k].gather(-1, index).squeeze(-1)  # [b, k]
        q_x = q.gather(-1, index).squeeze(-1)  # [b, k]
        # Accept x when u < p(x)/q(x), written u*q(x) < p(x) so that q(x) = 0 (a token the drafter
        # gave no mass) is accepted iff p(x) > 0, and p(x) = 0 is never accepted.
        u = torch.rand(b, k, generator=generator, device=p.device)
        accepted = ((u * q_x < p_x) & drafted).long().cumprod(dim=1).sum(dim=1)  # [b], first rejection or k
        # Position `accepted` emits one token from max(0, p - q) normalised; at position k q is
        # taken as 0, so this is the bonus token from p, and so is the token at a placeholder,
        # whose q row is 0. If p <= q everywhere there (possible only when the drafter proposed
        # a token outside its own q), fall back to p.
        q_ext = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # [b, k+1, V]
        idx = accepted.view(b, 1, 1).expand(b, 1, vocab)
        p_j = p.gather(1, idx).squeeze(1)  # [b, V]
        residual = (p_j - q_ext.gather(1, idx).squeeze(1)).clamp_min(0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(mass.dtype).tiny), p_j)
        last = sample(residual, generator)  # [b]
        emitted = torch.cat([draft_tokens, last.unsqueeze(1)], dim=1)
        emitted = emitted.scatter(1, accepted.unsqueeze(1), last.unsqueeze(1))
    emitted = emitted.masked_fill(positions > accepted.unsqueeze(1), PAD)
    return emitted, accepted + 1
