"""Thin adapters that give every causal LM the same batched, per-row-rollback interface.

`generate` and `DraftModelDrafter` only talk to a `CausalLM`: prefill ragged prompts, run n
new tokens per row through the model (appending them to the row's cache), cut each row's cache
back to a given length, keep a subset of the rows. One adapter per model kind:

- `MLACausalLM`: `mla.MLAForCausalLM` on our paged `LatentCache`; a forward of n tokens is one
  `decode_step` (the decode kernel with s_q = n and the causal in-block mask), rollback is
  `LatentCache.truncate` (the latents of rejected tokens are dropped, emptied pages go back).
- `HFCausalLM`: any transformers causal LM through its own forward and a `DynamicCache`.

Use `as_causal_lm(model)` to pick the adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict

import torch


class CausalLM(ABC):
    """A model plus the cache of a batch of rows.

    Row r's cache holds `lengths[r]` tokens. `forward` appends n tokens to every row;
    `rollback` cuts rows back; `retain` drops rows. All methods take and return tensors on
    `device`.
    """

    vocab_size: int
    device: torch.device
    lengths: list[int]

    @abstractmethod
    def prefill(
        self, prompts: list[torch.Tensor], extra_tokens: int, return_hidden: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Start a batch: run each prompt through the model into a fresh cache.

        Args:
            prompts: b int64 1-D tensors (lengths may differ; a length of 0 gives an empty row
                whose logits are unspecified).
            extra_tokens: most tokens any row will hold beyond its prompt (sizes the cache).
            return_hidden: also return the final hidden states (the LM head's input).

        Returns:
            logits [b, V] at each prompt's last position, and with return_hidden the hidden
            states of every prompt position, a list of b tensors [len_i, hidden_size].
        """

    @abstractmethod
    def forward(
        self, tokens: torch.Tensor, return_hidden: bool = False, num_new_tokens: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append tokens int64 [b, n] to each row; returns logits [b, n, V] (and hidden [b, n, H]).

        num_new_tokens: None (every row appends n), or b counts c_i <= n: row i appends only its
        first c_i tokens (a ragged verify); its other columns are padding, appended nowhere, and
        their logits mean nothing."""

    @abstractmethod
    def rollback(self, lengths: list[int]) -> None:
        """Cut row r's cache back to its first lengths[r] tokens (lengths[r] <= self.lengths[r])."""

    @abstractmethod
    def retain(self, rows: list[int]) -> None:
        """Keep only the listed rows, in that order; the others' caches are released."""

    @abstractmethod
    def release(self) -> None:
        """Free the whole batch's cache (a no-op before `prefill`)."""

    def _check_rollback(self, lengths: list[int]) -> None:
        if len(lengths) != len(self.lengths) or any(not 0 <= n <= m for n, m in zip(lengths, self.lengths)):
            raise ValueError(f"rollback lengths {lengths} must be within the current lengths {self.lengths}")


def as_causal_lm(model) -> CausalLM:
    """The adapter for `model`: a `CausalLM` is returned as is (build one yourself to choose
    e.g. `MLACausalLM(model, page_size=16)`); `mla.MLAForCausalLM` gets `MLACausalLM`; a
    transformers `PreTrainedModel` gets `HFCausalLM`. Anything else is a TypeError."""
    if isinstance(model, CausalLM):
        return model
    from mla.model import MLAForCausalLM

    if isinstance(model, MLAForCausalLM):
        return MLACausalLM(model)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        return HFCausalLM(model)
    raise TypeError(
        f"model must be an mla.MLAForCausalLM, a transformers PreTrainedModel or a CausalLM adapter, "
        f"got {type(model).__name__}"
    )


def _groups_by_length(prompts: list[torch.Tensor]) -> dict[int, list[int]]:
    """Row indices grouped by prompt length, so each group prefills as one unpadded batch."""
    groups = defaultdict(list)
    for row, prompt in enumerate(prompts):
        groups[len(prompt)].append(row)
    return groups


class MLACausalLM(CausalLM):
    """`mla.MLAForCausalLM` on a `LatentCache` it allocates at prefill, one cache sequence per row.

    Args:
        model: the MLAForCausalLM (its attention backend is the model's own).
        page_size: tokens per cache page.
        cache_backend: the cache's write backend ("triton", "reference"; None: the cache's default).
        cache_dtype: the cache's dtype (None: the model's; "fp8" for the FP8 latent cache).

    A forward of n tokens is `decode_step` (n <= 8: the absorbed decode kernel with s_q = n and
    the causal in-block mask); rollback truncates each row's sequence, returning pages that no
    longer hold a token to the pool.
    """

    def __init__(self, model, page_size: int = 64, cache_backend: str | None = None, cache_dtype=None):
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if cache_backend not in (None, "triton", "reference"):
            raise ValueError(f"cache_backend must be 'triton', 'reference' or None, got {cache_backend!r}")
        self.model, self.page_size, self.cache_backend, self.cache_dtype = model, page_size, cache_backend, cache_dtype
        self.vocab_size = model.config.vocab_size
        self.device = model.lm_head.weight.device
        self.cache, self.seq_ids = None, []

    @property
    def lengths(self) -> list[int]:
        return [self.cache.length(sid) for sid in self.seq_ids]

    @torch.no_grad()
    def prefill(self, prompts, extra_tokens, return_hidden=False):
        pages = sum(-(-(len(p) + extra_tokens) // self.page_size) for p in prompts)
        self.cache = self.model.new_cache(pages, self.page_size, dtype=self.cache_dtype)
        if self.cache_backend is not None:
            self.cache.backend = self.cache_backend
        self.seq_ids = [self.cache.add_sequence() for _ in prompts]
        weight = self.model.lm_head.weight
        logits = torch.zeros(len(prompts), self.vocab_size, dtype=weight.dtype, device=self.device)
        hidden = [weight.new_zeros(0, weight.shape[1]) for _ in prompts]
        for length, rows in _groups_by_length(prompts).items():
            if length == 0:
                continue
            h = self.model.model(torch.stack([prompts[r] for r in rows]), self.cache, [self.seq_ids[r] for r in rows])
            logits[rows] = self.model.lm_head(h[:, -1])
            for i, r in enumerate(rows):
                hidden[r] = h[i]
        return logits, hidden if return_hidden else None

    @torch.no_grad()
    def forward(self, tokens, return_hidden=False, num_new_tokens=None):
        out = self.model(tokens, self.cache, self.seq_ids, return_hidden=return_hidden, num_new_tokens=num_new_tokens)
        return out if return_hidden else (out, None)

    def rollback(self, lengths):
        self._check_rollback(lengths)
        for sid, n in zip(self.seq_ids, lengths):
            self.cache.truncate(sid, n)

    def retain(self, rows):
        kept = [self.seq_ids[r] for r in rows]
        for sid in set(self.seq_ids) - set(kept):
            self.cache.free(sid)
        self.seq_ids = kept

    def release(self):
        if self.cache is not None:
            self.retain([])
            self.cache = None


class HFCausalLM(CausalLM):
    """A transformers causal LM with a `DynamicCache` shared by the batch.

    Rows are kept right-aligned (left padding) in the cache, with a 2-D attention mask marking
    each row's valid slots and explicit position ids, so every row sees exactly its own tokens
    at their own positions. Prompts are prefilled in groups of equal length (no padding ever
    enters a forward pass, so no fully masked query row can produce NaN). A rollback that
    removes the same number of tokens from every row is a plain `crop`; a ragged one gathers
    each row's kept slots back to right alignment (one gather per layer).

    Only full-attention `DynamicLayer` caches can be cut per row; models whose cache has
    sliding-window or recurrent layers raise ValueError.
    """

    def __init__(self, model):
        self.model = model
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.device = next(model.parameters()).device
        self.cache, self.lengths, self.trailing = None, [], []

    def _new_cache(self):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        unsupported = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
        if unsupported:
            raise ValueError(
                f"{type(self.model).__name__} uses cache layers {sorted(unsupported)}; speculative decoding cuts the "
                "cache per row and supports only full-attention DynamicLayer caches"
            )
        return cache

    @torch.no_grad()
    def prefill(self, prompts, extra_tokens, return_hidden=False):
        if return_hidden:
            raise ValueError("HFCausalLM does not return hidden states; the MTP drafter needs an mla.MLAForCausalLM")
        b, width = len(prompts), max(len(p) for p in prompts)
        weight = self.model.get_output_embeddings().weight
        logits = torch.zeros(b, self.vocab_size, dtype=weight.dtype, device=self.device)
        per_layer = None  # per layer: (keys [b, h, width, d], values [b, h, width, dv])
        for length, rows in _groups_by_length(prompts).items():
            if length == 0:
                continue
            cache = self._new_cache()
            out = self.model(input_ids=torch.stack([prompts[r] for r in rows]), cache=cache, use_cache=True)
            logits[rows] = out.logits[:, -1].to(logits.dtype)
            if per_layer is None:
                per_layer = [
                    tuple(t.new_zeros(b, t.shape[1], width, t.shape[3]) for t in (layer.keys, layer.values))
                    for layer in cache.layers
                ]
            for (keys, values), layer in zip(per_layer, cache.layers):
                keys[rows, :, width - length :] = layer.keys
                values[rows, :, width - length :] = layer.values
        self.cache = self._new_cache()
        if per_layer is not None:  # otherwise every prompt was empty and the cache stays empty
            for layer, (keys, values) in zip(self.cache.layers, per_layer):
                layer.update(keys, values)
        self.lengths = [len(p) for p in prompts]
        self.trailing = [0] * b
        self._set_mask(width)
        return logits, None

    def _set_mask(self, width: int) -> None:
        """mask int64 [b, width]: 1 on each row's right-aligned valid slots."""
        valid = torch.tensor(self.lengths, device=self.device)
        self.mask = (torch.arange(width, device=self.device) >= width - valid[:, None]).long()
        self.positions = valid

    @torch.no_grad()
    def forward(self, tokens, return_hidden=False, num_new_tokens=None):
        if return_hidden:
            raise ValueError("HFCausalLM does not return hidden states")
        if any(self.trailing):
            self.rollback(self.lengths)  # right-align the rows after a ragged step before appending
        b, n = tokens.shape
        counts = [n] * b if num_new_tokens is None else list(num_new_tokens)
        # a ragged step's padding columns are masked out, then cut by the next rollback
        new = torch.arange(n, device=self.device) < torch.tensor(counts, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, new.long()], dim=1)
        positions = self.positions[:, None] + torch.arange(n, device=self.device)
        out = self.model(
            input_ids=tokens, attention_mask=self.mask, position_ids=positions, cache=self.cache, use_cache=True
        )
        self.positions = self.positions + torch.tensor(counts, device=self.device)
        self.lengths = [length + c for length, c in zip(self.lengths, counts)]
        self.trailing = [n - c for c in counts]
        return out.logits, None

    def rollback(self, lengths):
        self._check_rollback(lengths)
        width = self.mask.shape[1]
        new_width = max(lengths, default=0)
        # row r's real tokens end `trailing[r]` padding columns before the right edge
        drop = [old - new + pad for old, new, pad in zip(self.lengths, lengths, self.trailing)]
        self.lengths, self.trailing = list(lengths), [0] * len(lengths)
        if len(set(drop)) == 1 and width - drop[0] == new_width:
            # Same cut for every row and no all-padding columns left: crop the tail.
            if drop[0]:
                self.cache.crop(-drop[0])
        else:
            # Row r's kept slots end at width - drop[r]; move them to end at new_width.
            end = width - torch.tensor(drop, device=self.device)
            index = torch.arange(new_width, device=self.device) - new_width + end[:, None]  # [b, new_width]
            index = index.clamp_min(0)  # the padding slots read slot 0; the mask hides them
            for layer in self.cache.layers:
                if layer.get_seq_length() == 0:
                    continue
                for name in ("keys", "values"):
                    t = getattr(layer, name)  # [b, h, width, d]
                    setattr(layer, name, t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])))
        self._set_mask(new_width)

    def retain(self, rows):
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.lengths = [self.lengths[r] for r in rows]
        self.trailing = [self.trailing[r] for r in rows]

    def release(self):
        self.cache, self.lengths, self.trailing = None, [], []
