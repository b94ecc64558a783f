"""Speculative generation: the whole algorithm, once, for every model kind and drafter.

Each step, for every active row with newest token x (not yet in the target's cache):

    draft   d_1..d_k ~ q            the drafter proposes k tokens (q one-hot if deterministic)
    verify  p_0..p_k = target(x, d_1..d_k)      one pass over k+1 tokens per row, appended
                                                to the row's cache (for MLA: the decode kernel
                                                with s_q = k+1 and the causal in-block mask)
    accept  a = rejection_sample(p, d, q)       row-wise: accept d_j with prob min(1, p/q) up
                                                to the first rejection; emit a+1 tokens: the a
                                                accepted drafts and one from norm(max(0, p_a - q_a))
                                                (or from p_k if all k were accepted)
    rollback  the cache keeps x, d_1..d_a       the rejected tokens' entries are dropped
    the last emitted token becomes the row's new x.

Rows may verify different numbers of tokens in one step: a draft with per-row `lengths` k_i <= k
puts k_i tokens of row i up (its later tokens are -1 placeholders), the target runs one ragged
pass of k_i + 1 tokens per row (the decode kernel's per-row query lengths), and a placeholder is
never accepted, so at position k_i the target's own token is emitted: the bonus token.

The emitted tokens are distributed exactly as plain token-by-token sampling from p (greedy:
identical tokens), whatever the drafter proposes. Rows accept different counts; the only
host-device synchronisation per step is one `.tolist()` of the emitted tokens and counts,
which the loop needs anyway (to stop at EOS / max_new_tokens and to cut the caches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import CausalLM, as_causal_lm
from .drafters import Draft, Drafter, Verified, chain_parents
from .mtp import MultiTokenPredictor
from .sampling import check_sampling, rejection_sample


@dataclass
class SpeculativeStats:
    """steps: verify passes. drafted / accepted: draft tokens proposed / accepted, summed over
    rows and steps. acceptance_rate: accepted / drafted. mean_accepted_length: tokens a row
    gains per verify pass, accepted drafts plus the target's own token (1 + accepted / row-steps),
    the figure speedups are usually quoted with. tokens_per_second: new tokens of all rows over
    the wall time of the whole call (prefill included)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    row_steps: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.accepted / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def __repr__(self) -> str:
        return (
            f"SpeculativeStats(steps={self.steps}, drafted={self.drafted}, accepted={self.accepted}, "
            f"acceptance_rate={self.acceptance_rate:.3f}, mean_accepted_length={self.mean_accepted_length:.2f}, "
            f"tokens_per_second={self.tokens_per_second:.1f})"
        )


@dataclass
class SpeculativeOutput:
    """sequences: int64 [b, max_i lengths[i]], row i = its prompt then its new tokens, then
    pad_token_id up to the width. lengths: int64 [b] valid tokens per row. prompt_lengths: int64 [b]."""

    sequences: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    stats: SpeculativeStats


def _prompts(input_ids) -> list[torch.Tensor]:
    """input_ids int [b, s] or a list of b 1-D int tensors / int lists -> b int64 1-D CPU tensors."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, seq] (or a list of 1-D prompts), got shape {tuple(input_ids.shape)}"
            )
        rows = list(input_ids)
    elif isinstance(input_ids, (list, tuple)):
        rows = [torch.as_tensor(r) for r in input_ids]
    else:
        raise TypeError(
            f"input_ids must be a tensor [batch, seq] or a list of 1-D prompts, got {type(input_ids).__name__}"
        )
    if not rows:
        raise ValueError("input_ids holds no prompt")
    for i, r in enumerate(rows):
        if r.dim() != 1 or r.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of token ids, got shape {tuple(r.shape)}")
        if r.is_floating_point() or r.dtype == torch.bool:
            raise TypeError(f"prompt {i} must hold integer token ids, got {r.dtype}")
    return [r.to("cpu", torch.long) for r in rows]


@torch.no_grad()
def generate(
    model,
    input_ids,
    drafter: Drafter,
    max_new_tokens: int = 64,
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> SpeculativeOutput:
    """Generate up to max_new_tokens per row with speculative decoding; lossless.

    Args:
        model: `mla.MLAForCausalLM`, a transformers causal LM, or a `CausalLM` adapter (e.g.
            `MLACausalLM(model, page_size=16)` to choose the cache's page size).
        input_ids: int [b, s] (b prompts of length s, no padding) or a list of b 1-D prompts of any lengths.
        drafter: `NgramDrafter`, `DraftModelDrafter`, `MTPDrafter` or any `Drafter`.
        max_new_tokens: >= 1, new tokens per row at most.
        num_draft_tokens: k >= 1 draft tokens verified per step (fewer on the last steps).
        temperature: 0 for greedy, > 0 to sample from softmax(logits / temperature).
        top_p: nucleus filter in (0, 1] on the target distribution (and the drafter's q).
        eos_token_id: a row stops after emitting it (one id or a list).
        pad_token_id: fills each row after its end; defaults to the (first) EOS id, else 0.
        generator: torch.Generator on the model's device for every random draw.

    Returns:
        `SpeculativeOutput` with sequences [b, width] (prompt, new tokens, then padding) and stats.
    """
    prompts = _prompts(input_ids)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}")
    check_sampling(temperature, top_p)
    if not isinstance(drafter, Drafter):
        raise TypeError(_not_a_drafter(drafter))
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos_token_id if isinstance(eos_token_id, int) else next(iter(eos_token_id or []), 0)
    target = as_causal_lm(model)
    for i, p in enumerate(prompts):
        if p.min() < 0 or p.max() >= target.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {target.vocab_size})")
    stats = SpeculativeStats()
    start = time.perf_counter()
    prompts_dev = [p.to(target.device) for p in prompts]
    extra = max_new_tokens + num_draft_tokens + 1  # cache room past the prompt: a verify pass overshoots by <= k+1
    try:
        logits, hidden = target.prefill(prompts_dev, extra, return_hidden=drafter.needs_hidden)
        # The first new token comes from the prefill logits: a verify pass with k = 0.
        no_draft = torch.zeros(len(prompts), 0, dtype=torch.long, device=target.device)
        pending = rejection_sample(logits[:, None], no_draft, None, temperature, top_p, generator)[0][:, 0]
        drafter.start(target, prompts_dev, pending, hidden, extra, temperature, top_p, generator)
        new = [[t] for t in pending.tolist()]
        rows = [r for r in range(len(prompts)) if not (new[r][0] in eos or max_new_tokens == 1)]
        if len(rows) < len(prompts):
            pending = _retain(target, drafter, pending, rows)
        while rows:
            # Drafting past the furthest row's budget is wasted work: the last steps draft fewer.
            k = min(num_draft_tokens, max(max_new_tokens - len(new[r]) for r in rows) - 1)
            draft = drafter.propose(pending, k)
            _check_draft(draft, len(rows), k, target.vocab_size)
            drafts = [k] * len(rows) if draft.lengths is None else list(draft.lengths)
            draft_tokens, draft_probs, verify = draft.tokens, draft.probs, None
            if draft.lengths is not None:
                # a ragged step is as wide as its longest row; placeholders (-1 past a row's length)
                # enter the pass as token 0 and are stored nowhere
                width = max(drafts)
                draft_tokens = draft_tokens[:, :width]
                draft_probs = None if draft_probs is None else draft_probs[:, :width]
                verify = [1 + n for n in drafts]
            tokens = torch.cat([pending[:, None], draft_tokens.clamp_min(0)], dim=1)  # [b, k+1]
            logits, hidden = target.forward(tokens, return_hidden=drafter.needs_hidden, num_new_tokens=verify)
            emitted, num = rejection_sample(logits, draft_tokens, draft_probs, temperature, top_p, generator)
            host = torch.cat([num[:, None], emitted], dim=1).tolist()  # the step's one host-device sync
            counts = [h[0] for h in host]
            target.rollback([length - 1 - d + n for length, d, n in zip(target.lengths, drafts, counts)])
            new_tokens = [h[1 : 1 + h[0]] for h in host]
            drafter.accept(Verified(tokens, emitted, num, counts, new_tokens, hidden))
            pending = emitted.gather(1, (num - 1)[:, None]).squeeze(1)
            stats.steps += 1
            stats.drafted += sum(drafts)
            stats.accepted += sum(counts) - len(rows)
            stats.row_steps += len(rows)
            keep = []
            for i, (r, tokens_r) in enumerate(zip(rows, new_tokens)):
                for t in tokens_r:
                    new[r].append(t)
                    if t in eos or len(new[r]) == max_new_tokens:
                        break
                else:
                    keep.append(i)
            if len(keep) < len(rows):
                pending = _retain(target, drafter, pending, keep)
                rows = [rows[i] for i in keep]
    finally:
        target.release()
        drafter.release()
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = sum(map(len, new))
    lengths = [len(p) + len(n) for p, n in zip(prompts, new)]
    sequences = torch.full((len(prompts), max(lengths)), pad_token_id, dtype=torch.long)
    for i, (p, n) in enumerate(zip(prompts, new)):
        sequences[i, : lengths[i]] = torch.cat([p, torch.tensor(n, dtype=torch.long)])
    return SpeculativeOutput(sequences, torch.tensor(lengths), torch.tensor([len(p) for p in prompts]), stats)


def _not_a_drafter(obj) -> str:
    """The TypeError message for a drafter argument that is not a Drafter; a model passed there
    (the usual mistake) gets the wrapper it needs."""
    message = f"drafter must be a Drafter (NgramDrafter, DraftModelDrafter, MTPDrafter), got {type(obj).__name__}"
    if isinstance(obj, MultiTokenPredictor):
        return f"{message}: to draft with this MTP module, pass MTPDrafter(mtp)"
    if isinstance(obj, (nn.Module, CausalLM)):
        hint = f"{message}: to draft with this model, pass DraftModelDrafter(model)"
        if isinstance(getattr(obj, "mtp", None), MultiTokenPredictor):
            hint += ", or MTPDrafter(model) to draft with its MTP module"
        return hint
    return message


def _retain(target, drafter, pending: torch.Tensor, keep: list[int]) -> torch.Tensor:
    target.retain(keep)
    drafter.retain(keep)
    return pending[torch.tensor(keep, dtype=torch.long, device=pending.device)]


def _check_draft(draft: Draft, b: int, k: int, vocab: int) -> None:
    if not isinstance(draft, Draft) or tuple(draft.tokens.shape) != (b, k):
        shape = tuple(draft.tokens.shape) if isinstance(draft, Draft) else type(draft).__name__
        raise ValueError(f"the drafter must return a Draft with tokens [{b}, {k}] for {b} active rows, got {shape}")
    if draft.probs is not None and tuple(draft.probs.shape) != (b, k, vocab):
        raise ValueError(
            f"the drafter's probs must be [{b}, {k}, {vocab}] (target vocabulary), got {tuple(draft.probs.shape)}"
        )
    if draft.lengths is not None and (
        len(draft.lengths) != b or any(not isinstance(n, int) or not 0 <= n <= k for n in draft.lengths)
    ):
        raise ValueError(f"the draft's lengths must be {b} ints in [0, {k}], got {draft.lengths}")
    if tuple(draft.parents) != chain_parents(k):
        raise NotImplementedError(
            f"token-tree drafts (parents {tuple(draft.parents)}) are not verified yet; draft a chain"
        )
