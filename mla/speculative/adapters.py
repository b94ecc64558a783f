"""Thin adapters that give every causal LM the same batched, per-row-rollback interface.

`generate` and `DraftModelDrafter` only talk to a `CausalLM`: prefill ragged prompts, run n
new tokens per row through the model (appending them to the row's cache), cut each row's cache
back to a given length, keep a subset of the rows. One adapter per model kind:

- `MLACausalLM`: `mla.MLAForCausalLM` on our paged `LatentCache`; a forward of n tokens is one
  `decode_step` (the decode kernel with s_q = n and the causal in-block mask), rollback is
  `LatentCache.truncate` (the latents of rejected tokens are dropped, emptied pages go back).
- `HFCausalLM`: any transformers causal LM through its own forward and a `DynamicCache`.

Use `as_causal_lm(model)` to pick the adapter.

Hidden states (for drafters that read the target's, `return_hidden`): True gives the final
hidden states, what the LM head reads; a tuple of indices gives those hidden states concatenated
along the last dimension, numbered as transformers' `output_hidden_states`: 0 is the embedding
output, j in 1 .. L - 1 the output of decoder layer j - 1, L (the number of layers) the final
normed states. Both adapters number them alike, so a drafter trained on one kind reads the same
states from the other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from contextlib import contextmanager

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

    num_layers: int

    @abstractmethod
    def prefill(
        self, prompts: list[torch.Tensor], extra_tokens: int, return_hidden: bool | tuple[int, ...] = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Start a batch: run each prompt through the model into a fresh cache.

        Args:
            prompts: b int64 1-D tensors (lengths may differ; a length of 0 gives an empty row
                whose logits are unspecified).
            extra_tokens: most tokens any row will hold beyond its prompt (sizes the cache).
            return_hidden: also return hidden states: True the final ones (the LM head's input),
                a tuple of layer indices those layers' (module docstring), concatenated.

        Returns:
            logits [b, V] at each prompt's last position, and with return_hidden the hidden
            states of every prompt position, a list of b tensors [len_i, F] (F: hidden_size,
            or hidden_size times the number of layers asked for).
        """

    @abstractmethod
    def forward(
        self, tokens: torch.Tensor, return_hidden: bool | tuple[int, ...] = False, num_new_tokens: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append tokens int64 [b, n] to each row; returns logits [b, n, V] (and hidden [b, n, F],
        as `prefill`'s).

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

    def _hidden_layers(self, return_hidden) -> tuple[int, ...] | None:
        """The layer indices return_hidden asks for (True: the final states, index num_layers), or None."""
        if return_hidden is False or return_hidden is None:
            return None
        layers = (self.num_layers,) if return_hidden is True else tuple(return_hidden)
        if not layers or any(isinstance(j, bool) or not isinstance(j, int) or not 0 <= j <= self.num_layers
                             for j in layers):  # fmt: skip
            raise ValueError(
                f"return_hidden must be a bool or a non-empty tuple of hidden-state indices in [0, {self.num_layers}], "
                f"got {return_hidden!r}"
            )
        return layers

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
        own = getattr(model, "mla_causal_lm", None)  # set by mla.hf.patch where it owns the cache (DeepSeek-V4)
        return own() if own is not None else HFCausalLM(model)
    raise TypeError(
        f"model must be an mla.MLAForCausalLM, a transformers PreTrainedModel or a CausalLM adapter, "
        f"got {type(model).__name__}"
    )


@contextmanager
def capture_hidden(model, layers: tuple[int, ...] | None):
    """Hidden states of an `mla.MLAForCausalLM` by index (module docstring), on any of its paths
    (through a cache or the cache-free training forward).

    Within the block, `select(final)` returns the asked-for states of the model's last call,
    concatenated along the last dimension ([b, n, len(layers) * H]), given `final`, the final
    states that call returned (`return_hidden=True`: index num_hidden_layers); None when
    layers is None. The other indices are read by forward hooks on the embedding and the
    decoder layers, removed on exit.
    """
    captured, hooks = {}, []
    last = model.config.num_hidden_layers

    def keep(index):
        return lambda module, args, out: captured.__setitem__(index, out)

    for j in set(layers or ()) - {last}:
        module = model.model.embed_tokens if j == 0 else model.model.layers[j - 1]
        hooks.append(module.register_forward_hook(keep(j)))

    def select(final):
        if layers is None:
            return None
        captured[last] = final
        return torch.cat([captured[j] for j in layers], dim=-1)

    try:
        yield select
    finally:
        for hook in hooks:
            hook.remove()


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
        self.vocab_size, self.num_layers = model.config.vocab_size, model.config.num_hidden_layers
        self.device = model.lm_head.weight.device
        self.cache, self.seq_ids = None, []

    @property
    def lengths(self) -> list[int]:
        return [self.cache.length(sid) for sid in self.seq_ids]

    @torch.no_grad()
    def prefill(self, prompts, extra_tokens, return_hidden=False):
        layers = self._hidden_layers(return_hidden)
        pages = sum(-(-(len(p) + extra_tokens) // self.page_size) for p in prompts)
        self.cache = self.model.new_cache(pages, self.page_size, dtype=self.cache_dtype)
        if self.cache_backend is not None:
            self.cache.backend = self.cache_backend
        self.seq_ids = [self.cache.add_sequence() for _ in prompts]
        weight = self.model.lm_head.weight
        logits = torch.zeros(len(prompts), self.vocab_size, dtype=weight.dtype, device=self.device)
        width = weight.shape[1] * len(layers or ())
        hidden = [weight.new_zeros(0, width) for _ in prompts]
        with capture_hidden(self.model, layers) as select:
            for length, rows in _groups_by_length(prompts).items():
                if length == 0:
                    continue
                ids = [self.seq_ids[r] for r in rows]
                h = self.model.model(torch.stack([prompts[r] for r in rows]), self.cache, ids)
                logits[rows] = self.model.lm_head(h[:, -1])
                if layers is not None:
                    for r, states in zip(rows, select(h)):
                        hidden[r] = states
        return logits, hidden if layers is not None else None

    @torch.no_grad()
    def forward(self, tokens, return_hidden=False, num_new_tokens=None):
        layers = self._hidden_layers(return_hidden)
        with capture_hidden(self.model, layers) as select:
            logits, final = self.model(tokens, self.cache, self.seq_ids, return_hidden=True, num_new_tokens=num_new_tokens)
            return logits, select(final)

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
        self.num_layers = model.config.get_text_config().num_hidden_layers
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

    @staticmethod
    def _select(out, layers: tuple[int, ...] | None) -> torch.Tensor | None:
        """The asked-for entries of a forward's output_hidden_states, concatenated: [b, n, F], or None."""
        return None if layers is None else torch.cat([out.hidden_states[j] for j in layers], dim=-1)

    @torch.no_grad()
    def prefill(self, prompts, extra_tokens, return_hidden=False):
        layers = self._hidden_layers(return_hidden)
        b, width = len(prompts), max(len(p) for p in prompts)
        weight = self.model.get_output_embeddings().weight
        logits = torch.zeros(b, self.vocab_size, dtype=weight.dtype, device=self.device)
        hidden = [weight.new_zeros(0, weight.shape[1] * len(layers or ())) for _ in prompts]
        per_layer = None  # per layer: (keys [b, h, width, d], values [b, h, width, dv])
        for length, rows in _groups_by_length(prompts).items():
            if length == 0:
                continue
            cache = self._new_cache()
            out = self.model(input_ids=torch.stack([prompts[r] for r in rows]), cache=cache, use_cache=True,
                             output_hidden_states=layers is not None)  # fmt: skip
            logits[rows] = out.logits[:, -1].to(logits.dtype)
            if layers is not None:
                for r, states in zip(rows, self._select(out, layers)):
                    hidden[r] = states
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
        return logits, hidden if layers is not None else None

    def _set_mask(self, width: int) -> None:
        """mask int64 [b, width]: 1 on each row's right-aligned valid slots."""
        valid = torch.tensor(self.lengths, device=self.device)
        self.mask = (torch.arange(width, device=self.device) >= width - valid[:, None]).long()
        self.positions = valid

    @torch.no_grad()
    def forward(self, tokens, return_hidden=False, num_new_tokens=None):
        layers = self._hidden_layers(return_hidden)
        if any(self.trailing):
            self.rollback(self.lengths)  # right-align the rows after a ragged step before appending
        b, n = tokens.shape
        counts = [n] * b if num_new_tokens is None else list(num_new_tokens)
        # a ragged step's padding columns are masked out, then cut by the next rollback
        new = torch.arange(n, device=self.device) < torch.tensor(counts, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, new.long()], dim=1)
        positions = self.positions[:, None] + torch.arange(n, device=self.device)
        out = self.model(
            input_ids=tokens, attention_mask=self.mask, position_ids=positions, cache=self.cache, use_cache=True,
            output_hidden_states=layers is not None,
        )  # fmt: skip
        self.positions = self.positions + torch.tensor(counts, device=self.device)
        self.lengths = [length + c for length, c in zip(self.lengths, counts)]
        self.trailing = [n - c for c in counts]
        return out.logits, self._select(out, layers)

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
