"""`mla.hf.patch`: transformers' DeepSeek-V2/V3/V3.2 models decoding on our paged latent cache.

transformers keeps the model (embeddings, dense MLPs and MoE blocks, norms, LM head,
`generate()`); `patch` makes the attention and the KV cache ours. Every DeepseekV2Attention /
DeepseekV3Attention / DeepseekV32Attention becomes an adapter subclass (same object, same
parameters), and `generate()` creates an `MLACache`: a transformers `Cache` that holds an
`mla.LatentCache` (paged; bfloat16, float16, float32 or FlashMLA's 656-byte FP8 rows; for
V3.2 also each token's indexer key, 132 bytes in FP8). One model forward with that cache:

1. The base model (DeepseekV2Model / V3Model / V32Model) tells the cache a step begins (a forward
   pre-hook). The cache reads which new tokens are real from transformers' 2-D attention_mask,
   reserves them in the rows' sequences and builds the step's `mla.plan.StepPlan` once (slots,
   block table, lengths, backend, absorbed or decompressed, kernel schedule).
2. Every attention layer projects exactly as transformers does (its rotary embedding, from
   transformers' position_ids), writes the new latents through the plan and attends: in the
   absorbed form through `flash_mla_with_kvcache` (the Triton kernel on CUDA and under the
   interpreter, the PyTorch reference otherwise) when the shared cost model
   (`mla.backend.absorbed_is_cheaper`) says so (decode, speculative verification), else
   decompressed over the gathered rows (prefill). V3.2 layers first run their indexer
   (`mla.attention.Indexer`'s math on transformers' DeepseekV32Indexer), write its keys and
   attend only the chosen positions: through the sparse kernel over their slots, or masked in
   the decompressed form. The choice follows DeepSeek's reference semantics (`mla.attention`).
3. After the forward the cache commits the step (a forward hook); if the forward raised, the
   reserved tokens are rolled back.

Rows and padding. Batch row b is one cache sequence holding only its real tokens. transformers
sees the cache as `width` columns (the width of its 2-D mask, what `get_seq_length` returns);
row b's real tokens are the last width - pads[b] columns, so rows must be left-padded (a pad
after a real token is refused). Pad queries attend to nothing and give zeros. Positions come
from transformers (`position_ids`, which generate() derives from the mask), so rotary
positions are exactly transformers'; the decode kernel's causal rule (query i of s new tokens
sees cache positions j <= L - s + i) needs only each row's length L.

What runs where:
- our cache: the adapters above; gradients are refused (cached latents are detached and the
  kernel has no backward);
- no cache or any transformers cache (DynamicCache, StaticCache, ...): the original
  transformers attention, unchanged. That is training (`use_cache=False`), `model(ids)` (which
  makes a DynamicCache itself) and `mla.speculative`'s HFCausalLM;
- generate(): makes an `MLACache` sized for its batch and max_length (rows x pages; the page
  pool grows when a row outgrows it, e.g. an assistant model's cache reused across rounds);
  a passed `MLACache` is used as is. It refuses a passed transformers cache and any
  `cache_implementation` (static, offloaded, quantized, dynamic): those name transformers
  caches, which would silently bypass the kernel; unpatch the model to use them.
- beam search, `num_return_sequences`, batch selection: rows are forked by copying their pages
  (the first use of a row keeps its sequence; duplicates copy; dropped rows free their pages);
- assisted decoding (draft model, prompt lookup) and `crop`: `LatentCache.truncate` per row.
- DeepSeek-V4 models: `mla.hf_v4` (its own cache, `V4HFCache`; `patch` dispatches to it).
- attention weights follow transformers: none with sdpa (or flash / flex); with eager and
  output_attentions they are computed from the cached rows in PyTorch ([b, h, s, width], zero
  on pad columns and pad queries).
"""

from __future__ import annotations

import functools
import operator
import types
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers import Cache, GenerationMixin
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as _v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as _v3
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as _v32
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as _v4
    from transformers.utils.deprecation import deprecate_kwarg
except ImportError as error:
    raise ImportError(
        f'mla.hf needs transformers >= 5.24 with DeepSeek-V2/V3/V3.2/V4: pip install "mla-latent[hf]" ({error})'
    ) from error

from mla.attention import Indexer, chosen_mask
from mla.backend import check_backend
from mla.cache import LatentCache
from mla.config import MLAConfig
from mla.formats import PLAIN_DTYPES, cache_format
from mla.plan import StepPlan
from mla.reference import split_kv_b
from mla.rope import RotaryEmbedding

__all__ = [
    "MLACache", "MLADeepseekV2Attention", "MLADeepseekV3Attention", "MLADeepseekV32Attention", "PatchSettings", "patch",
    "unpatch",
]  # fmt: skip


@dataclass(frozen=True)
class PatchSettings:
    """What `patch` was given: the cache dtype (None: the model's), page size and backend."""

    cache_dtype: torch.dtype | str | None
    page_size: int
    backend: str | None


@dataclass
class _Group:
    """Rows of one step that add the same number r of real tokens, and their plan.

    rows: int64 [n] batch rows (on the cache's device), or None for every row.
    start: s - r, the first of the step's s columns holding their real tokens (left padding).
    """

    rows: torch.Tensor | None
    start: int
    plan: StepPlan

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """[b, s, ...] -> the group's [n, r, ...]."""
        t = t[:, self.start :] if self.start else t
        return t if self.rows is None else t[self.rows]


@dataclass
class _Step:
    """The step in flight: its groups, and what committing or undoing it changes."""

    num_new_tokens: int
    groups: list[_Group]
    pads: list[int]  # rows' leading pad columns after the step
    lengths: list[int]  # rows' sequence lengths before it (the rollback)
    new_rows: bool  # the step created the rows (an empty cache's first forward)


class RowsCache(Cache):
    """What our transformers caches answer alike: one cache sequence per batch row, transformers'
    view of a row is its mask columns (`get_seq_length`), crops are exact, nothing is compiled.
    Subclasses give `get_seq_length`, `__len__` (layers), `_num_rows` and `crop`."""

    def _num_rows(self) -> int:
        raise NotImplementedError

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_initialized(self) -> bool:
        return self._num_rows() > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self)

    @property
    def batch_size(self) -> int:
        return self._num_rows() or -1

    def activate_past_recording(self) -> None:
        """Nothing to record: `crop` restores the cache exactly."""


class MLACache(RowsCache):
    """A transformers `Cache` holding a paged `mla.LatentCache`, read and written by the
    attention of a model patched with `mla.hf.patch`.

    Args:
        config: the model's DeepseekV2Config / DeepseekV3Config.
        batch_size: rows the page pool is sized for at first (the rows themselves are made by
            the first forward, one per batch row).
        max_length: tokens per row the pool is sized for at first; it grows (doubling, all
            pages copied) when a step needs more.
        dtype: torch.bfloat16, torch.float16, torch.float32, or "fp8" / torch.float8_e4m3fn
            (`mla.formats.Fp8Format`: 656 bytes per token per layer for DeepSeek-V3).
        page_size: tokens per page.
        device: where the pages live (the model's device).
        backend: "triton", "reference" or None (`mla.backend`'s rule) for writes and attention.

    Build it with `MLACache.for_model(model, batch_size, max_length)` to take the patch's
    settings. transformers' view: `get_seq_length()` is the width of its 2-D attention mask
    (pad columns included); `crop(-n)` drops the last n columns; `reorder_cache`,
    `batch_select_indices` and `batch_repeat_interleave` rearrange rows (module docstring).
    """

    def __init__(
        self,
        config,
        batch_size: int = 1,
        max_length: int = 64,
        dtype: torch.dtype | str = torch.bfloat16,
        page_size: int = 64,
        device: torch.device | str = "cpu",
        backend: str | None = None,
    ):
        super().__init__(layers=[])
        self.mla_config = MLAConfig.from_hf(config)
        for name, value in (("batch_size", batch_size), ("max_length", max_length), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        num_pages = batch_size * -(-max_length // page_size)
        c = self.mla_config
        self.latent = LatentCache(c.num_hidden_layers, num_pages, page_size, c.kv_lora_rank, c.qk_rope_head_dim,
                                  dtype=dtype, device=device, backend=check_backend(backend),
                                  index_head_dim=c.index_head_dim)  # fmt: skip
        self.backend, self.device = backend, self.latent.device
        self._rotary = RotaryEmbedding(c)  # the plan's rotary tables (the adapters use transformers')
        self._rows: list[int] = []  # sequence id of each batch row
        self._pads: list[int] = []  # leading pad columns of each row
        self._width = 0
        self._step: _Step | None = None

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_length: int) -> MLACache:
        """A cache for a model patched by `mla.hf.patch`, with the patch's dtype, page size and
        backend, on the model's device. cache_dtype None means the model's dtype (a float64
        model needs patch(..., cache_dtype=torch.float32): the cache holds 16/32-bit or FP8 rows)."""
        attention = next((m for m in model.modules() if isinstance(m, _MLAAttention)), None)
        if attention is None:
            if any(isinstance(m, _v4.DeepseekV4Attention) for m in model.modules()):
                raise ValueError(
                    f"{type(model).__name__} is a DeepSeek-V4 model: its cache is mla.hf_v4.V4HFCache.for_model(...)"
                )
            raise ValueError(f"{type(model).__name__} is not patched: call mla.hf.patch(model) first")
        settings, weight = attention.mla_settings, attention.kv_b_proj.weight
        dtype = settings.cache_dtype if settings.cache_dtype is not None else weight.dtype
        if settings.cache_dtype is None and weight.dtype not in PLAIN_DTYPES:
            raise ValueError(
                f"the model is {weight.dtype} and the cache holds {PLAIN_DTYPES} or FP8 rows: "
                "patch with cache_dtype, e.g. mla.hf.patch(model, cache_dtype=torch.float32)"
            )
        return cls(attention.config, batch_size, max_length, dtype=dtype, page_size=settings.page_size,
                   device=weight.device, backend=settings.backend)  # fmt: skip

    @classmethod
    def from_dynamic_cache(cls, model: nn.Module, cache, attention_mask: torch.Tensor | None = None) -> MLACache:
        """An MLACache holding what a transformers cache holds for the same model unpatched.

        transformers caches DeepSeek attention compressed: per layer, keys = the normalized
        latent [b, 1, W, kv_lora_rank] and values = the roped k_pe [b, 1, W, qk_rope_head_dim].
        Those rows are copied (rounded to the patch's cache dtype) into a cache for `model`,
        patched; attention_mask int [b, W] marks left padding (default: every column a token).
        """
        layers = getattr(cache, "layers", None)
        if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
            raise ValueError(f"cache must be a filled transformers cache with per-layer keys and values, got {cache!r}")
        batch, _, width, _ = layers[0].keys.shape
        new = cls.for_model(model, batch, width)
        if len(layers) != len(new):
            raise ValueError(f"cache has {len(layers)} layers, the model {len(new)}")
        new._rows = [new.latent.add_sequence() for _ in range(batch)]
        mask = torch.ones(batch, width, dtype=torch.long) if attention_mask is None else attention_mask
        counts = new._real_tokens(mask, width, [0] * batch)
        new.latent.reserve(new._rows, counts)
        slots = torch.cat([new.latent.slot_mapping([sid], [list(range(n))]) for sid, n in zip(new._rows, counts)])
        # [b, W]: each row's last counts[b] columns, gathered row after row like the slots
        real = (torch.arange(width) >= width - torch.tensor(counts)[:, None]).to(layers[0].keys.device)
        store = new.latent.format.store_dtype(layers[0].keys.dtype)
        for index, layer in enumerate(layers):
            latent, k_pe = layer.keys[:, 0][real], layer.values[:, 0][real]
            new.latent.write(index, slots, latent.to(new.device, store), k_pe.to(new.device, store))
        new._pads, new._width = [width - n for n in counts], width
        return new

    @property
    def dtype(self):
        """The cache dtype (torch.float8_e4m3fn for FP8 rows)."""
        return self.latent.dtype

    def __repr__(self) -> str:
        return f"MLACache(rows={len(self._rows)}, width={self._width}, {self.latent!r})"

    def __len__(self) -> int:
        return self.latent.num_layers

    # transformers' Cache interface

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise TypeError(
            "MLACache is written by the attention of a model patched with mla.hf.patch, not through "
            f"Cache.update (layer {layer_idx}); this model's attention is not patched"
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of transformers' mask the cache holds (a row's pad columns included)."""
        return self._width

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no fixed maximum: the page pool grows

    def _num_rows(self) -> int:
        return len(self._rows)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove columns (tokens_to_remove <= 0, as DynamicCache)."""
        if isinstance(tokens_to_remove, bool) or operator.index(tokens_to_remove) > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove (<= 0), got {tokens_to_remove!r}")
        tokens_to_remove = operator.index(tokens_to_remove)
        width = max(0, self._width + tokens_to_remove)
        for sid, pads in zip(self._rows, self._pads):
            self.latent.truncate(sid, max(0, width - pads))
        self._pads = [min(pads, width) for pads in self._pads]
        self._width = width

    def reset(self) -> None:
        """Free every row: the cache is empty, its pages stay allocated."""
        for sid in self._rows:
            self.latent.free(sid)
        self._rows, self._pads, self._width = [], [], 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes old row beam_idx[i] (beam search)."""
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows([row for row in range(len(self._rows)) for _ in range(repeats)])

    # The step protocol (called by the base model's hooks)

    def _begin_step(self, batch: int, num_new_tokens: int, attention_mask: torch.Tensor | None) -> None:
        """Reserve this forward's real tokens and plan the step (module docstring, step 1)."""
        if self._step is not None:
            raise RuntimeError("MLACache: a forward is already running on this cache")
        new_rows = not self._rows
        if new_rows:
            self._rows = [self.latent.add_sequence() for _ in range(batch)]
            self._pads = [0] * batch
        elif batch != len(self._rows):
            raise ValueError(
                f"MLACache holds {len(self._rows)} rows, the input has {batch}: rearrange rows with "
                "batch_select_indices / reorder_cache, or start a new cache"
            )
        lengths = [self.latent.length(sid) for sid in self._rows]
        try:
            counts = self._real_tokens(attention_mask, num_new_tokens, lengths)
            self._reserve(counts)  # may move the rows to a bigger pool: same lengths, new ids
            groups = self._plan(counts, num_new_tokens)
        except BaseException:
            self._undo(lengths, new_rows)
            raise
        pads = [p + num_new_tokens - r for p, r in zip(self._pads, counts)]
        self._step = _Step(num_new_tokens, groups, pads, lengths, new_rows)

    def _end_step(self, failed: bool) -> None:
        """Commit the step in flight, or roll its tokens back if the forward failed."""
        step, self._step = self._step, None
        if step is None:
            return
        if failed:
            self._undo(step.lengths, step.new_rows)
        else:
            self._width += step.num_new_tokens
            self._pads = step.pads

    def _undo(self, lengths: list[int], new_rows: bool) -> None:
        """Back to before a step: rows it created are freed, the others cut to `lengths`."""
        if new_rows:
            self.reset()
            return
        for sid, length in zip(self._rows, lengths):
            self.latent.truncate(sid, length)

    def _real_tokens(self, attention_mask, num_new_tokens: int, lengths: list[int]) -> list[int]:
        """Real tokens each row adds: the 1s among the mask's last num_new_tokens columns."""
        batch = len(self._rows)
        if attention_mask is None:
            return [num_new_tokens] * batch
        width = self._width + num_new_tokens
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, width):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(
                f"MLACache reads a 2-D attention_mask [batch, cached + new] = [{batch}, {width}] "
                f"(1 = token, 0 = left padding), got {shape}"
            )
        new = attention_mask[:, -num_new_tokens:].to("cpu", torch.bool)  # [b, s]
        # left padding: within a row, no pad after a real token, and none once the row holds tokens
        bad = (new[:, 1:] < new[:, :-1]).any(-1) | (torch.tensor(lengths) > 0) & ~new.all(-1)
        if bad.any():
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"attention_mask row {row} has a pad (0) after a real token (1); MLACache stores each row's real "
                "tokens contiguously, so rows must be left-padded. (transformers makes such a mask itself when it "
                "infers one from ids that contain pad_token_id != eos_token_id, e.g. an assistant model's after it "
                "generated the pad id: set pad_token_id = eos_token_id, as DeepSeek's configs do.)"
            )
        return new.sum(-1).tolist()

    def _reserve(self, counts: list[int]) -> None:
        """Reserve counts[b] tokens in row b's sequence, growing the page pool if it is short."""
        latent, size = self.latent, self.latent.page_size
        need = sum(
            _pages(length + count, size) - _pages(length, size)
            for length, count in zip((latent.length(s) for s in self._rows), counts)
        )
        if need > latent.num_free_pages:
            self._grow(need - latent.num_free_pages)
        self.latent.reserve(self._rows, counts)

    def _plan(self, counts: list[int], num_new_tokens: int) -> list[_Group]:
        """One plan per distinct count of real tokens (one plan for every step but a
        left-padded prefill); rows adding nothing are in no group."""
        rows_by_count = defaultdict(list)
        for row, count in enumerate(counts):
            if count:
                rows_by_count[count].append(row)
        groups = []
        for count, rows in rows_by_count.items():
            plan = self.latent.plan([self._rows[r] for r in rows], count, self.mla_config, rotary=self._rotary,
                                    backend=self.backend)  # fmt: skip
            index = None if len(rows) == len(counts) else torch.tensor(rows, device=self.device)
            groups.append(_Group(index, num_new_tokens - count, plan))
        return groups

    def _grow(self, deficit: int) -> None:
        """Move every row to a pool with at least `deficit` more free pages (twice as many pages
        at least, so growing costs amortized O(1) copies per token)."""
        old = self.latent
        num_pages = max(2 * old.num_pages, old.num_pages + deficit)
        new = LatentCache(old.num_layers, num_pages, old.page_size, old.kv_lora_rank, old.rope_dim,
                          dtype=old.dtype, device=old.device, backend=old.backend,
                          index_head_dim=old.index_head_dim)  # fmt: skip
        rows = [new.add_sequence() for _ in self._rows]
        for sid, old_sid in zip(rows, self._rows):
            new.reserve([sid], old.length(old_sid))
        _copy_pages(new, rows, old, self._rows)
        self.latent, self._rows = new, rows

    def _select_rows(self, index) -> None:
        """Rows become [old row index[i] for each i]. The first use of an old row keeps its
        sequence; later uses get a copy of its pages; rows not used are freed first."""
        if self._step is not None:
            raise RuntimeError("MLACache: rows cannot be rearranged during a forward")
        index = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        old_rows = len(self._rows)
        bad = [i for i in index if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < old_rows]
        if bad:
            raise ValueError(f"row indices {bad} are not rows of this cache's {old_rows}")
        if not self._rows:
            return
        used, copies = set(), []
        for pos, row in enumerate(index):
            if row in used:
                copies.append(pos)
            used.add(row)
        latent, size = self.latent, self.latent.page_size
        lengths = [latent.length(s) for s in self._rows]
        need = sum(_pages(lengths[index[pos]], size) for pos in copies)
        freed = sum(_pages(lengths[row], size) for row in range(old_rows) if row not in used)
        if need > freed + latent.num_free_pages:
            self._grow(need - freed - latent.num_free_pages)
        latent, rows = self.latent, self._rows
        for row in range(old_rows):
            if row not in used:
                latent.free(rows[row])
        new_rows = [rows[row] for row in index]
        for pos in copies:
            new_rows[pos] = latent.add_sequence()
            latent.reserve([new_rows[pos]], lengths[index[pos]])
        if copies:
            _copy_pages(latent, [new_rows[p] for p in copies], latent, [rows[index[p]] for p in copies])
        self._rows, self._pads = new_rows, [self._pads[row] for row in index]


def _pages(length: int, page_size: int) -> int:
    return -(-length // page_size)


def _page_ids(cache: LatentCache, seq_ids: list[int]) -> torch.Tensor:
    """int64 page ids of the sequences, each sequence's in order, on the cache's device."""
    table = cache.block_table(seq_ids).long()  # [n, width]
    return torch.cat([table[i, : _pages(cache.length(s), cache.page_size)] for i, s in enumerate(seq_ids)])


def _copy_pages(dst: LatentCache, dst_ids: list[int], src: LatentCache, src_ids: list[int]) -> None:
    """Copy whole pages (every layer) of sequences src_ids into dst_ids, which hold as many
    tokens; the right side is gathered before anything is written, so src may be dst."""
    to, frm = _page_ids(dst, dst_ids), _page_ids(src, src_ids)
    for dst_pages, src_pages in zip(dst.pages + dst.index_pages, src.pages + src.index_pages):
        dst_pages[to] = src_pages[frm]


class _MLAAttention:
    """The attention of both adapters, on an `MLACache`.

    Mixed into a subclass of the transformers attention class, so `super().forward` is the
    original computation and every parameter is the original module's own. The subclass
    supplies `_rope(q_pe, k_pe, position_embeddings)`, its model's rotary embedding.
    """

    mla_settings: PatchSettings

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [h, qk_nope, r], W_UV [h, v_head_dim, r]): views of kv_b_proj.weight (no copy)."""
        return split_kv_b(self.kv_b_proj.weight, self.num_heads, self.v_head_dim)

    def _project(self, hidden_states: torch.Tensor, position_embeddings):
        """The original module's projections, [b, s, hidden] -> q_nope [b, s, h, qk_nope], roped
        q_pe [b, s, h, rope], latent [b, s, r] (after kv_a_layernorm), roped k_pe [b, s, rope],
        q_resid [b, s, q_lora_rank] (None without q_lora_rank)."""
        batch_size, seq_length = hidden_states.shape[:-1]
        q_resid = None
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states))
            q = self.q_b_proj(q_resid)
        q = q.view(batch_size, seq_length, -1, self.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        compressed = self.kv_a_proj_with_mqa(hidden_states)
        latent, k_pe = torch.split(compressed, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = k_pe.view(batch_size, 1, seq_length, self.qk_rope_head_dim)
        q_pe, k_pe = self._rope(q_pe, k_pe, position_embeddings)
        return q_nope.transpose(1, 2), q_pe.transpose(1, 2), latent, k_pe[:, 0], q_resid

    def _forward_cached(self, hidden_states, position_embeddings, cache: MLACache, kwargs):
        """The step's attention: [b, s, hidden] -> (o_proj output [b, s, hidden], weights or None)."""
        step = cache._step
        if step is None:
            raise RuntimeError(
                "MLACache steps are started by the patched DeepseekV2Model / V3Model / V32Model: call the model, "
                "not its attention module alone"
            )
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            raise RuntimeError(
                "MLACache stores detached latents and the decode kernel has no backward: run cached steps under "
                "torch.no_grad() (generate() does), or train without a cache (use_cache=False)"
            )
        b, s, _ = hidden_states.shape
        q_nope, q_pe, latent, k_pe, q_resid = self._project(hidden_states, position_embeddings)
        indexer = getattr(self, "indexer", None)
        if indexer is not None:
            # transformers' tables are cat(freqs, freqs) per position; ours hold one half
            cos, sin = (t[..., : t.shape[-1] // 2].float() for t in position_embeddings)
            q_index, k_index, index_weights = Indexer.forward(indexer, hidden_states, q_resid, cos, sin)
        out = q_nope.new_zeros(b, s, self.num_heads, self.v_head_dim)
        weights = None
        if self.config._attn_implementation == "eager" and kwargs.get(
            "output_attentions", getattr(self.config, "output_attentions", False)
        ):
            weights = q_nope.new_zeros(b, self.num_heads, s, cache.get_seq_length() + s)
        for group in step.groups:
            plan = group.plan
            g_nope, g_pe = group.take(q_nope), group.take(q_pe)
            plan.write(self.layer_idx, group.take(latent).flatten(0, 1), group.take(k_pe).flatten(0, 1))
            chosen = None
            if indexer is not None:
                plan.write_index(self.layer_idx, group.take(k_index).flatten(0, 1))
                chosen, _ = plan.select(self.layer_idx, group.take(q_index), group.take(index_weights),
                                        self.config.index_topk, as_slots=plan.absorbed)  # fmt: skip
            if plan.absorbed:
                o = self._attend_absorbed(g_nope, g_pe, plan, chosen)
                visible = None
            else:
                visible = plan.visible() if chosen is None else chosen_mask(chosen, plan.visible())
                o = self._attend_decompressed(g_nope, g_pe, plan, visible)
            _put(out, group, o)
            if weights is not None:
                if visible is None:
                    visible = plan.visible()
                    if chosen is not None:  # slots -> positions for the mask
                        positions, _ = plan.select(self.layer_idx, group.take(q_index), group.take(index_weights),
                                                   self.config.index_topk, as_slots=False)  # fmt: skip
                        visible = chosen_mask(positions, visible)
                probs = self._probabilities(g_nope, g_pe, plan, weights.shape[-1], visible)
                _put(weights.transpose(1, 2), group, probs)
        return self.o_proj(out.flatten(2)), weights

    def _attend_absorbed(self, q_nope, q_pe, plan: StepPlan, indices=None) -> torch.Tensor:
        """[n, r, h, nope], [n, r, h, rope] -> [n, r, h, v]: W_UK folded into q, the plan's decode
        attention over the latent cache (`flash_mla_with_kvcache`; over the slots `indices` when
        given), W_UV applied to its output."""
        w_uk, w_uv = self.absorbed_weights()
        q = torch.cat([torch.einsum("bshd,hdr->bshr", q_nope, w_uk), q_pe], dim=-1)  # [n, r, h, r + rope]
        out = plan.attend(self.layer_idx, q, self.scaling, indices)
        return torch.einsum("bshr,hvr->bshv", out.to(q_nope.dtype), w_uv)

    def _attend_decompressed(self, q_nope, q_pe, plan: StepPlan, visible: torch.Tensor) -> torch.Tensor:
        """[n, r, h, nope], [n, r, h, rope] -> [n, r, h, v]: every cached row through kv_b_proj,
        then SDPA masked by `visible` (bool [n, r, L]: the plan's causal rule, or the indexer's choice)."""
        latent, k_pe = plan.context(self.layer_idx, q_nope.dtype).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        n, length, _ = latent.shape
        kv = self.kv_b_proj(latent).view(n, length, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.num_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=visible[:, None], scale=self.scaling,
        )  # fmt: skip  # [n, h, r, v]
        return out.transpose(1, 2)

    def _probabilities(self, q_nope, q_pe, plan: StepPlan, columns: int, visible: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the group's queries laid out on transformers' mask columns:
        [n, r, h, columns]; row i's L_i tokens are its last L_i columns (left padding)."""
        latent, k_pe = plan.context(self.layer_idx, q_nope.dtype).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        w_uk, _ = self.absorbed_weights()
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
        scores = torch.einsum("bshr,blr->bshl", q_latent, latent) + torch.einsum("bshd,bld->bshl", q_pe, k_pe)
        scores = (scores * self.scaling).masked_fill(~visible[:, :, None], float("-inf"))  # visible: [n, r, L]
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)  # [n, r, h, L]
        token = torch.arange(columns, device=probs.device) - (columns - plan.seqlens.long()[:, None])  # [n, columns]
        gathered = probs.gather(-1, token.clamp(min=0)[:, None, None].expand(*probs.shape[:3], columns))
        return gathered * (token >= 0)[:, None, None]


def _put(out: torch.Tensor, group: _Group, values: torch.Tensor) -> None:
    """out[b, s, ...][group's rows, its columns] = values [n, r, ...]."""
    target = out[:, group.start :] if group.start else out
    if group.rows is None:
        target.copy_(values)
    else:
        target[group.rows] = values


class MLADeepseekV3Attention(_MLAAttention, _v3.DeepseekV3Attention):
    """DeepseekV3Attention on an `MLACache` (original code with any other cache). Built by `patch`."""

    def _rope(self, q_pe, k_pe, position_embeddings):
        cos, sin = position_embeddings
        if self.config.rope_interleave:
            return _v3.apply_rotary_pos_emb_interleave(q_pe, k_pe, cos, sin)
        return _v3.apply_rotary_pos_emb(q_pe, k_pe, cos, sin)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        """Same signature and outputs as DeepseekV3Attention.forward: (out [b, s, hidden], weights)."""
        if not isinstance(cache, MLACache):
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        return self._forward_cached(hidden_states, position_embeddings, cache, kwargs)


class MLADeepseekV32Attention(_MLAAttention, _v32.DeepseekV32Attention):
    """DeepseekV32Attention (MLA + lightning indexer) on an `MLACache` (original code with any
    other cache). Built by `patch`."""

    def _rope(self, q_pe, k_pe, position_embeddings):
        cos, sin = position_embeddings
        return _v32.apply_rotary_pos_emb_interleave(q_pe, k_pe, cos, sin)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        """Same signature and outputs as DeepseekV32Attention.forward: (out [b, s, hidden], weights)."""
        if not isinstance(cache, MLACache):
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        return self._forward_cached(hidden_states, position_embeddings, cache, kwargs)


class MLADeepseekV2Attention(_MLAAttention, _v2.DeepseekV2Attention):
    """DeepseekV2Attention on an `MLACache` (original code with any other cache). Built by `patch`."""

    def _rope(self, q_pe, k_pe, position_embeddings):
        return _v2.apply_rotary_emb(q_pe, k_pe, position_embeddings.to(q_pe.device))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        """Same signature and outputs as DeepseekV2Attention.forward: (out [b, s, hidden], weights)."""
        if not isinstance(cache, MLACache):
            return super().forward(
                hidden_states, attention_mask, cache=cache, position_embeddings=position_embeddings, **kwargs
            )
        return self._forward_cached(hidden_states, position_embeddings, cache, kwargs)


_ADAPTERS = {
    _v3.DeepseekV3Attention: MLADeepseekV3Attention,
    _v32.DeepseekV32Attention: MLADeepseekV32Attention,
    _v2.DeepseekV2Attention: MLADeepseekV2Attention,
}
_ORIGINALS = {adapter: original for original, adapter in _ADAPTERS.items()}
_BASE_MODELS = (_v2.DeepseekV2Model, _v3.DeepseekV3Model, _v32.DeepseekV32Model)
# positional order of DeepseekV2Model.forward / DeepseekV3Model.forward / DeepseekV32Model.forward
_FORWARD_ARGS = ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds")


def _step_arguments(args, kwargs) -> dict:
    given = dict(zip(_FORWARD_ARGS, args))
    given.update(kwargs)
    if "past_key_values" in given:  # transformers' deprecated name, renamed inside forward
        given.setdefault("cache", given.pop("past_key_values"))
    return given


def _begin_step(cache_type, module, args, kwargs) -> None:
    """Forward pre-hook of the base model: start the step on a cache of cache_type (MLACache, or
    mla.hf_v4's V4HFCache on a V4 model)."""
    given = _step_arguments(args, kwargs)
    cache = given.get("cache")
    tokens = given.get("inputs_embeds") if given.get("inputs_embeds") is not None else given.get("input_ids")
    if isinstance(cache, cache_type) and tokens is not None:
        cache._begin_step(tokens.shape[0], tokens.shape[1], given.get("attention_mask"))


def _end_step(cache_type, module, args, kwargs, output) -> None:
    """Forward hook of the base model (also called when the forward raised, with output None)."""
    cache = _step_arguments(args, kwargs).get("cache")
    if isinstance(cache, cache_type):
        cache._end_step(failed=output is None)


def _install_step_hooks(model: nn.Module, base_types, cache_type) -> None:
    """Hook every base model of `model` (instances of base_types) to begin and end each forward's
    step on a cache of cache_type; `unpatch` removes the handles kept in `_mla_hooks`."""
    for base in model.modules():
        if isinstance(base, base_types) and "_mla_hooks" not in vars(base):
            base._mla_hooks = (
                base.register_forward_pre_hook(functools.partial(_begin_step, cache_type), with_kwargs=True),
                base.register_forward_hook(functools.partial(_end_step, cache_type), with_kwargs=True,
                                           always_call=True),
            )  # fmt: skip


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                  max_cache_length):  # fmt: skip
    """generate()'s cache hook on a patched model: an MLACache for its rows and max length."""
    original = type(self)._prepare_cache_for_generation
    cache = model_kwargs.get("cache")
    if cache is not None and not isinstance(cache, MLACache):
        raise ValueError(
            f"generate() got a {type(cache).__name__}; a model patched by mla.hf.patch generates on mla.hf.MLACache: "
            "pass MLACache.for_model(model, batch_size, max_length) or no cache (generate makes one), "
            "or mla.hf.unpatch(model) to use transformers' caches"
        )
    if cache is not None or generation_config.use_cache is False:
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
    if generation_config.cache_implementation is not None:
        raise ValueError(
            f"generate(cache_implementation={generation_config.cache_implementation!r}) asks for a transformers "
            "cache; a model patched by mla.hf.patch generates on its own paged latent cache (mla.hf.MLACache): "
            "drop cache_implementation, or mla.hf.unpatch(model) first"
        )
    rows = max(generation_config.num_beams, generation_config.num_return_sequences or 1) * batch_size
    model_kwargs["cache"] = MLACache.for_model(self, rows, max(1, max_cache_length))


def patch(model: nn.Module, cache_dtype=None, page_size: int = 64, backend: str | None = None) -> nn.Module:
    """Make a transformers DeepSeek-V2/V3/V3.2 model attend through our paged latent cache.

    In place: every DeepseekV2Attention / DeepseekV3Attention / DeepseekV32Attention becomes
    `MLADeepseekV2Attention` / `MLADeepseekV3Attention` / `MLADeepseekV32Attention` (the same objects, parameters, buffers and hooks; state_dict and
    optimizers are unaffected), the base models (DeepseekV2Model / V3Model / V32Model) get the
    hooks that start and end a step on an `MLACache`, and a GenerationMixin model's generate()
    makes an `MLACache` (module docstring: what is handled and what is refused).

    DeepSeek-V4 (DeepseekV4Attention) is dispatched to `mla.hf_v4.patch_v4`: the attention runs
    `mla.v4_attention.V4Attention`'s cached path over one compact `V4Cache`
    (`mla.hf_v4.V4HFCache`) through `backend`'s kernels or references, cache_dtype None,
    float64 (reference only) / float32 / bfloat16 / float16 or "fp8" (MODEL1 pages, MXFP4
    indexer keys; head_dim 512 and rope_dim 64); see mla.hf_v4's docstring for what it supports
    and refuses.

    Args:
        model: an nn.Module holding DeepSeek-V2/V3/V3.2/V4 attention, e.g. DeepseekV3ForCausalLM,
            DeepseekV32ForCausalLM or DeepseekV4ForCausalLM.
        cache_dtype: the cache rows: None (the model's dtype when the cache is made),
            torch.bfloat16 / torch.float16 / torch.float32, or "fp8" / torch.float8_e4m3fn.
        page_size: tokens per cache page, >= 1.
        backend: "triton", "reference" or None (Triton on CUDA or under TRITON_INTERPRET=1, the
            PyTorch reference otherwise).

    Returns:
        `model`. Patching again replaces the settings.

    Raises:
        TypeError: `model` is not an nn.Module.
        ValueError: no DeepSeek-V2/V3/V3.2/V4 attention in `model`; a bad cache_dtype (or FP8 with
            dimensions its rows cannot hold), page_size or backend; a module whose `forward`
            was replaced on the instance (accelerate hooks: patch before dispatching).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    from mla import hf_v4

    v4_targets = [(name, m) for name, m in model.named_modules() if isinstance(m, _v4.DeepseekV4Attention)]
    targets = [(name, m) for name, m in model.named_modules() if type(m) in _ADAPTERS or type(m) in _ORIGINALS]
    if not targets and not v4_targets:
        raise ValueError(
            f"patch: {type(model).__name__} contains no DeepseekV2Attention, DeepseekV3Attention, "
            "DeepseekV32Attention or DeepseekV4Attention module; only DeepSeek-V2/V3/V3.2/V4 models can be patched"
        )
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"patch: page_size must be a positive int, got {page_size!r}")
    check_backend(backend)
    for name, module in targets + v4_targets:
        if "forward" in vars(module):
            raise ValueError(
                f"patch: module {name!r} has its forward replaced on the instance (accelerate/device-map hooks?); "
                "patch the model before dispatching it"
            )
    if v4_targets:
        return hf_v4.patch_v4(model, v4_targets, PatchSettings(cache_dtype, page_size, backend))
    config = targets[0][1].config
    MLAConfig.from_hf(config)  # what every step plan needs (dims, RoPE): fail here, not in generate()
    if cache_dtype is not None:
        try:
            cache_format(cache_dtype, config.kv_lora_rank, config.qk_rope_head_dim)
        except (TypeError, ValueError) as error:
            raise ValueError(f"patch: cache_dtype {cache_dtype!r} is not a cache this model can use: {error}") from None
    settings = PatchSettings(cache_dtype, page_size, backend)
    for _, module in targets:
        module.__class__ = _ADAPTERS.get(type(module), type(module))
        module.mla_settings = settings
    _install_step_hooks(model, _BASE_MODELS, MLACache)
    if isinstance(model, GenerationMixin):
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: adapters go back to their transformers class, hooks come off. Returns `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        original = _ORIGINALS.get(type(module))
        if original is not None:
            module.__dict__.pop("mla_settings", None)
            module.__class__ = original
        for handle in module.__dict__.pop("_mla_hooks", ()):
            handle.remove()
    method = model.__dict__.get("_prepare_cache_for_generation")
    if isinstance(method, types.MethodType) and method.__func__ is _prepare_cache_for_generation:
        del model.__dict__["_prepare_cache_for_generation"]
    from mla import hf_v4

    hf_v4.unpatch_v4(model)
    return model
