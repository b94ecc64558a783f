"""Drafters: who proposes the k tokens the target verifies in one pass.

Every drafter implements the small `Drafter` interface that `generate` drives:

    start(target, prompts, pending, hidden, ...)  once, after the target's prefill
    propose(pending, k) -> Draft                  k tokens per row (+ their q when sampled)
    accept(verified)                              what the target kept this step
    retain(rows)                                  rows that keep going (the others finished)

State convention (shared with `generate`): the target's cache of a row holds every token of
the row except the newest one, `pending`, which the next verify pass feeds first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .adapters import CausalLM, as_causal_lm
from .sampling import probabilities, sample


@dataclass
class Draft:
    """Draft tokens of one step.

    tokens: int64 [b, k]. probs: float [b, k, V], the distribution q each token was drawn from
    (built with `probabilities` at the generation's temperature and top_p), or None for a
    deterministic drafter (q one-hot). parents: k ints, the draft index each token continues
    (-1: the row's pending token). A chain has parents (-1, 0, 1, ..., k-2); the field is there
    for token trees (EAGLE-style), which `generate` does not verify yet. lengths: b ints in
    [0, k], how many of its k tokens row i puts up for verification (each row's verify pass
    is then lengths[i] + 1 tokens long; the target runs one ragged step), or None: all k. A
    row's tokens past its length must be -1 (placeholders, never accepted).
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    parents: tuple[int, ...] | None = None
    lengths: list[int] | None = None

    def __post_init__(self):
        if self.parents is None:
            self.parents = chain_parents(self.tokens.shape[1])


def chain_parents(k: int) -> tuple[int, ...]:
    """Parents of a k-token chain: each token continues the one before, the first the pending token."""
    return tuple(range(-1, k - 1))


@dataclass
class Verified:
    """What one verify pass decided, handed to the drafter's `accept`.

    tokens: int64 [b, k+1], the pass's input (pending token, then the draft).
    emitted: int64 [b, k+1] and num_emitted int64 [b], from `rejection_sample`: the target kept
        tokens[:, :num_emitted] in its cache; emitted[:, num_emitted - 1] is the new pending token.
    num_emitted_host: the same counts as a list (already on the host: no further sync).
    new_tokens: per row, the emitted tokens as Python ints (accepted drafts + the target's token).
    hidden: [b, k+1, hidden_size] target hidden states of the pass when the drafter asked for them.
    """

    tokens: torch.Tensor
    emitted: torch.Tensor
    num_emitted: torch.Tensor
    num_emitted_host: list[int]
    new_tokens: list[list[int]]
    hidden: torch.Tensor | None


class Drafter(ABC):
    """Interface of a drafter. `needs_hidden`: `generate` asks the target for hidden states."""

    needs_hidden = False

    @abstractmethod
    def start(
        self,
        target: CausalLM,
        prompts: list[torch.Tensor],
        pending: torch.Tensor,
        hidden: list[torch.Tensor] | None,
        extra_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
    ) -> None:
        """Begin a batch: prompts (b 1-D int64), pending int64 [b] (each row's first new token),
        hidden (the target's prefill hidden states when `needs_hidden`), extra_tokens (most
        tokens a row may hold beyond its prompt), and the sampling settings of the generation."""

    @abstractmethod
    def propose(self, pending: torch.Tensor, k: int) -> Draft:
        """k >= 0 draft tokens for each row, continuing pending int64 [b]."""

    @abstractmethod
    def accept(self, verified: Verified) -> None:
        """Bring the drafter's state to the tokens the target kept."""

    @abstractmethod
    def retain(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""

    def release(self) -> None:
        """Free whatever the drafter holds for the batch."""



class _CachedDrafter(Drafter):
    """A drafter network with its own latent cache (`self.cache`, one sequence per row in
    `self.seq_ids`) fed the target's hidden states: `self.hidden` [b, ...] still to consume and
    `self.counts` (b ints) per row. Keeps that per-row state in step with the batch."""

    def __init__(self):
        self.cache, self.seq_ids = None, []

    def retain(self, rows):
        kept = [self.seq_ids[r] for r in rows]
        for sid in set(self.seq_ids) - set(kept):
            self.cache.free(sid)
        index = torch.tensor(rows, dtype=torch.long, device=self.hidden.device)
        self.seq_ids, self.hidden = kept, self.hidden[index]
        self.counts = [self.counts[r] for r in rows]

    def release(self):
        if self.cache is not None:
            for sid in self.seq_ids:
                self.cache.free(sid)
            self.cache, self.seq_ids = None, []

def _choose(
    logits: torch.Tensor, temperature: float, top_p: float, generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next draft token [b] from logits [b, V], with its q [b, V] when sampling (None when greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1), None
    q = probabilities(logits, temperature, top_p)
    return sample(q, generator), q


def _chain(logits: torch.Tensor, k: int, sampling: tuple, step, empty: torch.Tensor) -> Draft:
    """Draft k tokens by chaining: choose from logits [b, V], then step(token [b]) -> the next
    logits [b, V]. `empty` [b] gives the batch and device of the k = 0 draft."""
    tokens, probs = [], []
    for j in range(k):
        token, q = _choose(logits, *sampling)
        tokens.append(token)
        probs.append(q)
        if j < k - 1:
            logits = step(token)
    draft = torch.stack(tokens, dim=1) if k else empty.new_zeros(len(empty), 0)
    return Draft(draft, None if sampling[0] == 0 or not k else torch.stack(probs, dim=1))


class NgramDrafter(Drafter):
    """Prompt lookup: continue the longest suffix of the text that occurred before.

    For n from max_n down to min_n, the row's last n tokens (prompt + generated, pending
    included) are looked up among earlier n-grams; the k tokens that followed the most recent
    earlier occurrence are proposed. The copy may run into the tokens it is producing (as in
    LZ77), so a periodic text keeps its period. When no n-gram matches, the drafter proposes the
    last token repeated k times (a valid draft the target usually rejects) and counts it in
    `fallbacks` (`lookups` counts every row's lookups). Runs on the host over the token lists `generate`
    already has; q is one-hot (draft_probs None).
    """

    def __init__(self, min_n: int = 1, max_n: int = 3):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.lookups = self.fallbacks = 0

    def start(self, target, prompts, pending, hidden, extra_tokens, temperature, top_p, generator):
        self.device = target.device
        self.texts = [p.tolist() + [t] for p, t in zip(prompts, pending.tolist())]
        # Per row and n: n-gram -> start of its latest occurrence that has a following token.
        self.index = [{n: {} for n in range(self.min_n, self.max_n + 1)} for _ in self.texts]
        self.indexed = [0] * len(self.texts)  # tokens of each text already indexed as continuations
        for row in range(len(self.texts)):
            self._index(row)

    def _index(self, row: int) -> None:
        text, tables = self.texts[row], self.index[row]
        for end in range(self.indexed[row], len(text) - 1):  # n-grams ending at `end` continue with text[end + 1]
            for n, table in tables.items():
                if end + 1 >= n:
                    table[tuple(text[end + 1 - n : end + 1])] = end + 1 - n
        self.indexed[row] = max(self.indexed[row], len(text) - 1)

    def _lookup(self, row: int, k: int) -> list[int]:
        text = self.texts[row]
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(text) < n:
                continue
            start = self.index[row][n].get(tuple(text[-n:]))
            if start is not None:
                out = []
                for j in range(k):
                    src = start + n + j
                    out.append(text[src] if src < len(text) else out[src - len(text)])
                return out
        self.fallbacks += 1
        return [text[-1]] * k

    def propose(self, pending, k):
        self.lookups += len(self.texts)
        tokens = [self._lookup(row, k) for row in range(len(self.texts))]
        return Draft(torch.tensor(tokens, dtype=torch.long, device=self.device).view(len(tokens), k))

    def accept(self, verified):
        for row, new in enumerate(verified.new_tokens):
            self.texts[row].extend(new)
            self._index(row)

    def retain(self, rows):
        self.texts = [self.texts[r] for r in rows]
        self.index = [self.index[r] for r in rows]
        self.indexed = [self.indexed[r] for r in rows]


class DraftModelDrafter(Drafter):
    """A smaller causal LM with the target's vocabulary drafts k tokens autoregressively.

    The draft model's cache is kept one token behind the target's: each step first feeds
    [last cached token, pending] (the same 2 tokens for every row, so the pass stays
    rectangular however many tokens each row accepted), then k - 1 single tokens; after
    verification every row is cut back to the target's length minus one.

    Args:
        draft_model: an `mla.MLAForCausalLM`, a transformers causal LM or a `CausalLM` adapter,
            on the target's device.
    """

    def __init__(self, draft_model):
        self.lm = as_causal_lm(draft_model)

    def start(self, target, prompts, pending, hidden, extra_tokens, temperature, top_p, generator):
        if self.lm is target:
            raise ValueError("the draft model's adapter is the target's; give the drafter the model or its own adapter")
        if self.lm.vocab_size != target.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({self.lm.vocab_size}) differs from the target's ({target.vocab_size})"
            )
        self.sampling = (temperature, top_p, generator)
        self.lm.prefill([p[:-1] for p in prompts], extra_tokens + 1)
        self.last = torch.stack([p[-1] for p in prompts])  # [b], the token the next step feeds before pending

    def propose(self, pending, k):
        self.base = list(self.lm.lengths)
        logits, _ = self.lm.forward(torch.stack([self.last, pending], dim=1))
        return _chain(logits[:, -1], k, self.sampling, lambda token: self.lm.forward(token[:, None])[0][:, -1], pending)

    def accept(self, verified):
        # The target kept tokens[:, :n]; the draft keeps all but the last of them, which it feeds next step.
        self.lm.rollback([base + n for base, n in zip(self.base, verified.num_emitted_host)])
        self.last = verified.tokens.gather(1, (verified.num_emitted - 1)[:, None]).squeeze(1)

    def retain(self, rows):
        self.lm.retain(rows)
        self.last = self.last[torch.tensor(rows, dtype=torch.long, device=self.last.device)]

    def release(self):
        self.lm.release()
