"""DeepSeek-V4 behind `mla.hf.patch`: transformers' DeepseekV4ForCausalLM decoding on one `V4Cache`.

transformers keeps the model (embeddings, hyper-connections, MoE, norms, LM head, `generate()`);
`mla.hf.patch` dispatches here for V4 models and makes the attention and the KV cache ours.
Every DeepseekV4Attention becomes `MLADeepseekV4Attention` (same object, same parameters) and
gets a `mla.v4_attention.V4Attention` built once whose Parameters ARE the module's (no copies;
it is kept out of the module tree, so state dicts are unchanged). generate() creates a
`V4HFCache`: a transformers `Cache` holding a `mla.v4_cache.V4Cache`, one sequence per batch
row. One model forward with that cache:

1. The base model's forward pre-hook begins a step: the real new tokens of every row (the 1s
   of transformers' 2-D attention_mask among the step's columns) are reserved, all or nothing,
   and the rows are grouped by that count (one group but for a left-padded prefill).
2. Every attention layer runs V4Attention's cached path once per group on the group's real
   columns (window rows, compressor rows, closed entries, CSA indexer keys written, then one
   sparse decode call over the window, entries and sink, on `patch`'s backend: the Triton
   kernels on CUDA or under the interpreter, their PyTorch twins otherwise); pad columns get
   zeros.
3. The forward hook commits the step; if the forward raised, the reserved tokens are truncated
   away (rows the step created are freed).

Positions and padding. V4's compressed windows are aligned to each sequence's token 0, so the
rotary position of a token is its index in its row's sequence (V4Attention's default):
transformers' position_ids and rotary tables are not read. A row's sequence holds only its real
tokens, so rows may be left-padded (generate()'s batches of different prompt lengths); a pad
after a real token, or a mask that is not 2-D, is refused (ValueError).

What runs where:
- our cache: the adapters (no gradients: the cache stores detached rows);
- no cache or a transformers cache: transformers' own attention, unchanged;
- generate(): greedy and sampling, `num_return_sequences` (rows are expanded before the cache
  is made), and transformers' assisted decoding (`crop`: `V4Cache.truncate`, exact). Refused
  with ValueError: beam search and any row rearrangement but dropping rows (rows are not
  forked), a passed transformers cache, `cache_implementation`, right padding. transformers
  itself refuses assisted generation (prompt lookup, draft models) for V4 models.
- `mla.speculative`: `as_causal_lm` on a patched model gives `V4PatchedCausalLM` (per-row
  rollback by truncation).
"""

from __future__ import annotations

import operator
import types

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as _v4
from transformers.utils.deprecation import deprecate_kwarg

from mla.attention import RMSNorm
from mla.hf import RowsCache, _install_step_hooks
from mla.pages import CacheFullError
from mla.speculative.adapters import CausalLM
from mla.v4 import V4Config
from mla.v4_attention import V4Attention, v4_rotary
from mla.v4_cache import V4Cache

__all__ = ["MLADeepseekV4Attention", "V4HFCache", "V4PatchedCausalLM", "patch_v4", "unpatch_v4"]


class V4HFCache(RowsCache):
    """A transformers `Cache` holding a `mla.v4_cache.V4Cache` (one sequence per batch row),
    read and written by the attention of a DeepSeek-V4 model patched with `mla.hf.patch`.

    Args:
        config: the model's DeepseekV4Config.
        batch_size, max_length: the pool holds batch_size * ceil(max_length / page_size) pages
            (a step that needs more raises ValueError: make a bigger cache).
        dtype: torch.float64 / float32 / bfloat16 / float16, the stored rows, or "fp8" /
            torch.float8_e4m3fn: FlashMLA's MODEL1 pages for the window and the entries, MXFP4
            indexer keys (needs head_dim 512 and rope_dim 64; `mla.v4_cache`).
        page_size: tokens per page (entry pages hold as many entries).
        device: where the pages live.

        max_rollback: tokens before the last step a truncation may go back (a draft model's
            drafts span k single-token steps); truncation to the length before the last step
            always works.

    The cache is compact (`V4Cache(max_rollback=...)`): each row keeps only the window's and the
    open compressor windows' token rows (plus max_rollback) besides its entries.

    transformers' view: row b is `pads[b]` leading pad columns (left padding, from the 2-D
    attention_mask of its first forward) then its sequence; `get_seq_length()` is the widest
    row's columns; `crop(-n)` drops each row's last n columns (exact: `V4Cache.truncate`).
    Build one with `V4HFCache.for_model`.
    """

    def __init__(self, config, batch_size: int = 1, max_length: int = 64, dtype: torch.dtype = torch.float32,
                 page_size: int = 64, device: torch.device | str = "cpu", max_rollback: int = 16):  # fmt: skip
        super().__init__(layers=[])
        for name, value in (("batch_size", batch_size), ("max_length", max_length), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        num_pages = batch_size * -(-max_length // page_size)
        self.v4 = V4Cache(V4Config.from_hf(config), num_pages, page_size, dtype=dtype, device=device,
                          max_rollback=max_rollback)  # fmt: skip
        self.rows: list[int] = []  # sequence id of each batch row
        self.pads: list[int] = []  # leading pad columns of each row
        # the step in flight: (lengths and pads before it, whether it created the rows)
        self._step: tuple[list[int], list[int], bool] | None = None
        # its rows by number of real tokens: (batch rows [n] or None for all, first real column, sequence ids)
        self.groups: list[tuple[torch.Tensor | None, int, list[int]]] = []

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_length: int) -> V4HFCache:
        """A cache for a patched V4 model: its page size and cache dtype (None: the model's), on its device."""
        attention = next((m for m in model.modules() if isinstance(m, MLADeepseekV4Attention)), None)
        if attention is None:
            raise ValueError(f"{type(model).__name__} is not a patched DeepSeek-V4 model: call mla.hf.patch(model)")
        settings, weight = attention.mla_settings, attention.q_b_proj.weight
        dtype = settings.cache_dtype if settings.cache_dtype is not None else weight.dtype
        return cls(attention.config, batch_size, max_length, dtype=dtype, page_size=settings.page_size,
                   device=weight.device)  # fmt: skip

    def __repr__(self) -> str:
        return f"V4HFCache(rows={len(self.rows)}, lengths={self.lengths()}, {self.v4!r})"

    def __len__(self) -> int:
        return len(self.v4.layers)

    def lengths(self) -> list[int]:
        """Tokens each row's sequence holds."""
        return [self.v4.length(sid) for sid in self.rows]

    # transformers' Cache interface

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise TypeError(
            f"V4HFCache is written by the attention of a model patched with mla.hf.patch, not through Cache.update "
            f"(layer {layer_idx}); this model's attention is not patched"
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of the widest row (its pads and tokens)."""
        return max((n + p for n, p in zip(self.lengths(), self.pads)), default=0)

    def _num_rows(self) -> int:
        return len(self.rows)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop each row's last -tokens_to_remove columns (tokens_to_remove <= 0, as DynamicCache)."""
        if isinstance(tokens_to_remove, bool) or operator.index(tokens_to_remove) > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove (<= 0), got {tokens_to_remove!r}")
        columns = [max(0, n + p + operator.index(tokens_to_remove)) for n, p in zip(self.lengths(), self.pads)]
        self.truncate_rows([max(0, c - p) for c, p in zip(columns, self.pads)])
        self.pads = [min(p, c) for p, c in zip(self.pads, columns)]

    def truncate_rows(self, lengths: list[int]) -> None:
        """Cut row b back to lengths[b] tokens (per-row rollback)."""
        if len(lengths) != len(self.rows):
            raise ValueError(f"truncate_rows needs one length per row ({len(self.rows)}), got {lengths}")
        for sid, length in zip(self.rows, lengths):
            self.v4.truncate(sid, length)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep batch rows `rows` (distinct, in that order) and free the others."""
        rows = [operator.index(r) for r in rows]
        if len(set(rows)) != len(rows) or any(not 0 <= r < len(self.rows) for r in rows):
            raise ValueError(
                f"V4HFCache keeps distinct rows in [0, {len(self.rows)}), got {rows}: rows cannot be forked "
                "(beam search and repeated rows are not supported)"
            )
        kept = [self.rows[r] for r in rows]
        for sid in set(self.rows) - set(kept):
            self.v4.free(sid)
        self.rows, self.pads = kept, [self.pads[r] for r in rows]

    def reset(self) -> None:
        """Free every row (the pages stay allocated)."""
        for sid in self.rows:
            self.v4.free(sid)
        self.rows, self.pads = [], []

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keep_rows(torch.as_tensor(indices).tolist())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("V4HFCache does not fork rows: beam search is not supported on a patched DeepSeek-V4 model")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError(f"V4HFCache does not fork rows: cannot repeat each row {repeats} times")

    # The step protocol (called by the base model's hooks)

    def _begin_step(self, batch: int, num_new_tokens: int, attention_mask) -> None:
        """Reserve each row's real tokens among the step's columns and group the rows by their count."""
        if self._step is not None:
            raise RuntimeError("V4HFCache: a forward is already running on this cache")
        new_rows = not self.rows
        if new_rows:
            self.rows, self.pads = [self.v4.add_sequence() for _ in range(batch)], [0] * batch
        elif batch != len(self.rows):
            raise ValueError(f"V4HFCache holds {len(self.rows)} rows, the input has {batch}: start a new cache")
        lengths, pads = self.lengths(), list(self.pads)
        try:
            counts = self._real_tokens(attention_mask, num_new_tokens, lengths)
            self.v4.reserve(self.rows, counts)
        except CacheFullError as error:
            self._undo(lengths, pads, new_rows)
            raise ValueError(f"V4HFCache is full ({error}); make a bigger one with V4HFCache.for_model") from None
        except BaseException:
            self._undo(lengths, pads, new_rows)
            raise
        self.pads = [p + num_new_tokens - r for p, r in zip(pads, counts)]
        by_count: dict[int, list[int]] = {}
        for row, count in enumerate(counts):
            if count:
                by_count.setdefault(count, []).append(row)
        device = self.v4.device
        self.groups = [
            (None if len(rows) == batch else torch.tensor(rows, device=device), num_new_tokens - count,
             [self.rows[r] for r in rows])
            for count, rows in by_count.items()
        ]  # fmt: skip
        self._step = (lengths, pads, new_rows)

    def _real_tokens(self, attention_mask, num_new_tokens: int, lengths: list[int]) -> list[int]:
        """Real tokens each row adds: the 1s among the 2-D mask's last num_new_tokens columns."""
        batch = len(self.rows)
        if attention_mask is None:
            return [num_new_tokens] * batch
        width = self.get_seq_length() + num_new_tokens
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, width):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(
                f"V4HFCache reads a 2-D attention_mask [batch, cached + new] = [{batch}, {width}] "
                f"(1 = token, 0 = left padding), got {shape}"
            )
        new = attention_mask[:, -num_new_tokens:].to("cpu", torch.bool)  # [b, s]
        bad = (new[:, 1:] < new[:, :-1]).any(-1) | (torch.tensor(lengths) > 0) & ~new.all(-1)
        if bad.any():
            raise ValueError(
                f"attention_mask row {int(bad.nonzero()[0])} has a pad (0) after a real token (1): a patched "
                "DeepSeek-V4 model takes left padding only (its compressed windows start at each row's first token)"
            )
        return new.sum(-1).tolist()

    def _end_step(self, failed: bool) -> None:
        step, self._step = self._step, None
        if step is not None and failed:
            self._undo(*step)

    def _undo(self, lengths: list[int], pads: list[int], new_rows: bool) -> None:
        if new_rows:
            self.reset()
        else:
            self.truncate_rows(lengths)
            self.pads = pads


class MLADeepseekV4Attention(_v4.DeepseekV4Attention):
    """DeepseekV4Attention on a `V4HFCache` (V4Attention's cached path over the module's own
    Parameters); the original code with no cache or a transformers cache. Built by `patch`."""

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, position_embeddings, position_ids, attention_mask, cache=None, **kwargs):
        """Same signature and outputs as DeepseekV4Attention.forward: (out [b, s, hidden], None)."""
        if not isinstance(cache, V4HFCache):
            if type(cache).__module__.startswith("mla."):
                raise TypeError(
                    f"a DeepSeek-V4 attention layer got a {type(cache).__name__}, not a V4 cache; "
                    "V4 layers need window rows, entries and compressor state: use mla.hf_v4.V4HFCache"
                )
            return super().forward(hidden_states, position_embeddings, position_ids, attention_mask, cache=cache,
                                   **kwargs)  # fmt: skip
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            raise ValueError("a V4HFCache holds detached rows: run cached decoding under torch.no_grad()")
        if len(cache.groups) == 1 and cache.groups[0][:2] == (None, 0):  # every row adds every column
            return self.mla_v4(hidden_states, cache=cache.v4, seq_ids=cache.rows), None
        out = torch.zeros_like(hidden_states)  # pad queries attend nothing
        for rows, start, seq_ids in cache.groups:
            part = hidden_states[:, start:] if rows is None else hidden_states[rows, start:]
            part = self.mla_v4(part, cache=cache.v4, seq_ids=seq_ids)
            if rows is None:
                out[:, start:] = part
            else:
                out[rows, start:] = part
        return out, None


def _shared_v4_attention(module: _v4.DeepseekV4Attention, config: V4Config, backend: str | None) -> V4Attention:
    """A V4Attention whose Parameters are `module`'s own objects (built on the meta device, then
    each parameter replaced by transformers' one of the same name). Its RMSNorms are
    transformers' modules themselves: checkpoints keep their weights in float32 next to
    bfloat16 projections, and transformers' norm returns the input's dtype."""
    with torch.device("meta"):
        v4 = V4Attention(config, module.layer_idx, backend)
    v4.rotary = v4_rotary(config, v4.kind)  # float32 tables on the host, not meta
    for name, norm in list(v4.named_modules()):
        if isinstance(norm, RMSNorm):  # transformers' own norms: float32 weights, output in the input's dtype
            owner, _, leaf = name.rpartition(".")
            setattr(v4.get_submodule(owner), leaf, module.get_submodule(name))
    for name, _ in list(v4.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        try:
            v4.get_submodule(owner)._parameters[leaf] = module.get_parameter(name)
        except AttributeError as error:
            raise ValueError(f"patch: layer {module.layer_idx} has no parameter {name!r} V4Attention reads") from error
    return v4


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                  max_cache_length):  # fmt: skip
    """generate()'s cache hook on a patched V4 model: a V4HFCache for its rows and max length."""
    original = type(self)._prepare_cache_for_generation
    cache = model_kwargs.get("cache")
    if cache is not None and not isinstance(cache, V4HFCache):
        raise ValueError(
            f"generate() got a {type(cache).__name__}; a DeepSeek-V4 model patched by mla.hf.patch generates on "
            "mla.hf_v4.V4HFCache: pass V4HFCache.for_model(model, batch_size, max_length) or no cache, "
            "or mla.hf.unpatch(model) to use transformers' caches"
        )
    if generation_config.num_beams > 1:
        raise ValueError(
            "beam search (num_beams > 1) forks cache rows, which V4HFCache does not support: "
            "use greedy or sampling, or mla.hf.unpatch(model)"
        )
    if cache is not None or generation_config.use_cache is False:
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
    if generation_config.cache_implementation is not None:
        raise ValueError(
            f"generate(cache_implementation={generation_config.cache_implementation!r}) asks for a transformers "
            "cache; a patched DeepSeek-V4 model generates on mla.hf_v4.V4HFCache: drop it, or mla.hf.unpatch(model)"
        )
    rows = (generation_config.num_return_sequences or 1) * batch_size  # rows are expanded after this hook
    model_kwargs["cache"] = V4HFCache.for_model(self, rows, max(1, max_cache_length))


def _causal_lm(self) -> V4PatchedCausalLM:
    return V4PatchedCausalLM(self)


def patch_v4(model: nn.Module, targets, settings) -> nn.Module:
    """`mla.hf.patch` for DeepSeek-V4 (targets: (name, module) of its attention layers)."""
    config = V4Config.from_hf(targets[0][1].config)
    if settings.cache_dtype is not None:
        try:  # V4Cache owns which dtypes and dimensions it stores: ask it now, not at the first generate()
            V4Cache(config, 1, 1, dtype=settings.cache_dtype, device="meta")
        except (TypeError, ValueError) as error:
            raise ValueError(f"patch: cache_dtype={settings.cache_dtype!r}: {error}") from None
    for _, module in targets:
        module.__class__ = MLADeepseekV4Attention
        module.mla_settings = settings
        module.__dict__["mla_v4"] = _shared_v4_attention(module, config, settings.backend)  # outside the module tree
    _install_step_hooks(model, _v4.DeepseekV4Model, V4HFCache)
    if isinstance(model, GenerationMixin):
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
        model.mla_causal_lm = types.MethodType(_causal_lm, model)
    return model


def unpatch_v4(model: nn.Module) -> None:
    """Undo `patch_v4` (mla.hf.unpatch calls it)."""
    for module in model.modules():
        if type(module) is MLADeepseekV4Attention:
            module.__dict__.pop("mla_settings", None)
            module.__dict__.pop("mla_v4", None)
            module.__class__ = _v4.DeepseekV4Attention
    hooks = (("_prepare_cache_for_generation", _prepare_cache_for_generation), ("mla_causal_lm", _causal_lm))
    for name, function in hooks:
        method = model.__dict__.get(name)
        if isinstance(method, types.MethodType) and method.__func__ is function:
            del model.__dict__[name]


class V4PatchedCausalLM(CausalLM):
    """`mla.speculative`'s interface for a patched DeepseekV4ForCausalLM on one `V4HFCache`.

    Prompts are right-padded to the longest and prefilled in one forward, then each row is cut
    back to its own length (a token never sees later ones, so the padding changes nothing). A
    ragged step (num_new_tokens) writes n tokens in every row; the extra ones are truncated
    before the next step. Rollback is `V4Cache.truncate` per row (exact).
    """

    def __init__(self, model):
        self.model = model
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.num_layers = model.config.num_hidden_layers
        self.device = next(model.parameters()).device
        self.cache, self.lengths = None, []

    def _hidden(self, out, layers):
        return None if layers is None else torch.cat([out.hidden_states[j] for j in layers], dim=-1)

    @torch.no_grad()
    def prefill(self, prompts, extra_tokens, return_hidden=False):
        layers = self._hidden_layers(return_hidden)
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError(f"V4PatchedCausalLM: every prompt needs a token, got lengths {lengths}")
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt.to(self.device)
        self.cache = V4HFCache.for_model(self.model, len(prompts), width + extra_tokens)
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, output_hidden_states=layers is not None)
        self.cache.truncate_rows(lengths)
        self.lengths = lengths
        last = torch.tensor(lengths, device=self.device) - 1
        logits = out.logits[torch.arange(len(prompts), device=self.device), last]
        hidden = self._hidden(out, layers)
        return logits, None if hidden is None else [h[:n] for h, n in zip(hidden, lengths)]

    @torch.no_grad()
    def forward(self, tokens, return_hidden=False, num_new_tokens=None):
        layers = self._hidden_layers(return_hidden)
        self.cache.truncate_rows(self.lengths)  # drop a ragged step's extra tokens
        b, n = tokens.shape
        out = self.model(input_ids=tokens, cache=self.cache, use_cache=True, output_hidden_states=layers is not None)
        counts = [n] * b if num_new_tokens is None else [int(c) for c in num_new_tokens]
        self.lengths = [length + c for length, c in zip(self.lengths, counts)]
        return out.logits, self._hidden(out, layers)

    def rollback(self, lengths):
        self._check_rollback(lengths)
        self.lengths = list(lengths)
        self.cache.truncate_rows(self.lengths)

    def retain(self, rows):
        self.cache.keep_rows(rows)
        self.lengths = [self.lengths[r] for r in rows]

    def release(self):
        if self.cache is not None:
            self.cache.reset()
        self.cache, self.lengths = None, []
