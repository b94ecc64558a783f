"""`V4Cache`: a paged DeepSeek-V4 KV cache for every layer of a model, in plain PyTorch tensors
(the reference the cached `mla.v4_attention.V4Attention` path reads and writes; FP8 pages and
the sparse Triton kernel come later).

Pages and tables. One pool of `num_pages` pages of `page_size` tokens, shared by all sequences
and all layers, and one block table row per sequence (as `mla.cache.LatentCache`): token t of a
sequence sits at row t % page_size of page table[t // page_size] in every token-indexed tensor.
The compressed entries need no pool of their own: entry w of a layer with rate m is stored in
the page of its window's first token w * m, so entry pages are indexed by the same table.
Each entry tensor holds P = max(1, page_size // m) entries per page, which needs page_size and
m to divide one another (checked at construction): entry w sits at row w % P of page
table[(w * m) // page_size], i.e. the entries have the per-pool table table[:, ::max(1, m //
page_size)] (`entry_table`), a strided view of the one table, so a reservation, truncation or
free covers tokens and entries together.

Per layer (`V4LayerStore`; e = bytes of the cache dtype, d = head_dim, D = index_head_dim):
    kv:        every token's roped KV row [d] (all layer kinds). Attention reads only the last
               sliding_window of them; storing all is the simplest exact design (no ring to
               rotate on rollback) and costs d * e per token instead of V4CacheLayout's
               min(context, sliding_window) rows.
    raw:       CSA / HCA: every token's raw compressor projections, kv_proj and gate_proj rows
               (2 * c * d, c = 2 for CSA's overlapping windows, 1 for HCA).
    index_raw: CSA: the same for the indexer's own compressor (2 * 2 * D).
    entries:   CSA / HCA: the closed entries [P, d] per page (1/m of a token row per token).
    index_keys: CSA: the indexer keys of the closed entries, [P, 1, D] per page, in float32
               when the cache is float64 (the indexer scores in float32, as the one-shot path).

Pending compressor state and rollback. There are no running accumulators: a sequence of
length L has closed exactly the entries w < L // m, and its pending (open-window) state is the
raw rows of tokens (L // m - 1) * m ... L - 1 (CSA: the previous window's first half overlaps
into the next entry) or (L // m) * m ... L - 1 (HCA), read back when a window's last token
arrives. So `truncate(sid, n)` is exact by construction: entries w >= n // m are no longer
counted (their rows are overwritten when re-closed), and the pending state is the kept tokens'
raw rows, exactly what it was when the sequence last had n tokens, for any cut.

The price is bytes, and it is large. Per token and layer this cache stores d (kv) + 2d (HCA raw)
+ d / m' values, or d + 4d + 4D + (d + D) / m (CSA); a sliding layer d. For DeepSeek-V4 in
bfloat16 (d = 512, D = 128): 1024 B per sliding, 6464 B per CSA and 3080 B per HCA layer, so
199,392 B per token for V4-Flash (2 sliding, 21 CSA, 20 HCA layers) and 289,400 B for V4-Pro
(30 CSA, 31 HCA): `bytes_per_token`. `mla.v4.V4CacheLayout`, which counts the deployed design
(a window ring of sliding_window rows, entries, indexer keys, and per-sequence float32 online-
softmax accumulators), gives 6,886 B (Flash) and 9,856 B (Pro) per token at 1M tokens in
bfloat16: this cache stores about 29x more, nearly all of it the raw compressor rows (5120 of
the 6464 CSA bytes, 2048 of the 3080 HCA bytes) and the every-token kv rows. It is the exact
reference for decode and rollback, not the deployed layout; V4CacheLayout's accounting is
unchanged. The deployed equivalent keeps, per sequence, a ring of the last sliding_window + k
kv rows and the raw rows of the open window plus k tokens (CSA: plus the previous window),
where k bounds a speculative rollback: constant per sequence, and exact for cuts within k.

Bookkeeping is on the host. A step: `reserve(ids, s)`, then per layer the forward writes the
s new tokens of each sequence after what that layer already holds (`step_starts` checks they
were reserved, `advance` counts them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mla.pages import CacheFullError, PagedSequences, as_int
from mla.v4 import CSA, SLIDING, V4Config

__all__ = ["CacheFullError", "V4Cache", "V4LayerStore"]

CACHE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class V4LayerStore:
    """One layer's tensors (None where its kind has none); shapes in the module docstring.

    kv: [num_pages, page_size, head_dim]; raw: [num_pages, page_size, 2, c * head_dim] (kv_proj
    row, gate_proj row); index_raw: [num_pages, page_size, 2, 2 * index_head_dim]; entries:
    [num_pages, P, head_dim]; index_keys: [num_pages, P, 1, index_head_dim].
    """

    kind: str
    rate: int
    kv: torch.Tensor
    raw: torch.Tensor | None = None
    index_raw: torch.Tensor | None = None
    entries: torch.Tensor | None = None
    index_keys: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        every = (self.kv, self.raw, self.index_raw, self.entries, self.index_keys)
        return tuple(t for t in every if t is not None)


class V4Cache(PagedSequences):
    """Paged cache of every layer of a DeepSeek-V4 model (module docstring: layout, rollback).

    Args:
        config: the V4Config of the model; layer i stores what config.layer_types[i] needs.
        num_pages: pages in the pool, shared by all sequences and layers.
        page_size: tokens per page; must be a multiple or a divisor of every compress rate.
        dtype: torch.float64 / float32 / bfloat16 / float16, the stored rows' dtype.
        device: where the tensors live.

    Attributes:
        layers: tuple of `V4LayerStore`, one per layer.
    """

    def __init__(
        self,
        config: V4Config,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if not isinstance(config, V4Config):
            raise TypeError(f"config must be a V4Config, got {type(config).__name__}")
        super().__init__(num_pages, page_size)
        self.config = config
        if dtype not in CACHE_DTYPES:
            raise TypeError(f"dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
        for kind, rate in config.compress_rates.items():
            if self.page_size % rate and rate % self.page_size:
                raise ValueError(
                    f"page_size {self.page_size} and the {kind} compress rate {rate} must divide one another "
                    f"(an entry's page is its window's first token's page)"
                )
        self.dtype = dtype
        self.index_dtype = torch.float32 if dtype == torch.float64 else dtype
        self.device = torch.device(device)
        self.layers = tuple(self._allocate(kind) for kind in config.layer_types)
        self._written: list[dict[int, int]] = [{} for _ in config.layer_types]  # tokens each layer holds

    def _allocate(self, kind: str) -> V4LayerStore:
        c, n, ps = self.config, self.num_pages, self.page_size
        kv = torch.zeros(n, ps, c.head_dim, dtype=self.dtype, device=self.device)
        if kind == SLIDING:
            return V4LayerStore(kind, 0, kv)
        rate = c.compress_rates[kind]
        per_page = max(1, ps // rate)
        width = (2 if kind == CSA else 1) * c.head_dim
        store = dict(
            raw=torch.zeros(n, ps, 2, width, dtype=self.dtype, device=self.device),
            entries=torch.zeros(n, per_page, c.head_dim, dtype=self.dtype, device=self.device),
        )
        if kind == CSA:
            store.update(
                index_raw=torch.zeros(n, ps, 2, 2 * c.index_head_dim, dtype=self.dtype, device=self.device),
                index_keys=torch.zeros(n, per_page, 1, c.index_head_dim, dtype=self.index_dtype, device=self.device),
            )
        return V4LayerStore(kind, rate, kv, **store)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's page share takes over all layers (whole pool / (num_pages * page_size))."""
        total = sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
        return total // (self.num_pages * self.page_size)

    def _added(self, sid: int) -> None:
        for written in self._written:
            written[sid] = 0

    def _dropped(self, sid: int) -> None:
        for written in self._written:
            del written[sid]

    def written(self, layer: int, sid: int) -> int:
        """Tokens layer `layer` holds for sequence `sid`."""
        return self._written[self._check_layer(layer)][self._check_id(sid)]

    def truncate(self, sid: int, new_length: int) -> None:
        """Shorten sequence `sid` to `new_length` tokens in every layer (speculative rollback);
        pages no longer used go back to the pool. Exact: the entries and pending compressor state
        are those of the kept tokens (module docstring)."""
        super().truncate(sid, new_length)
        for written in self._written:
            written[sid] = min(written[sid], self._lengths[sid])

    def step_starts(self, layer: int, seq_ids: Iterable[int], s: int) -> tuple[list[int], list[int]]:
        """Where s new tokens of each sequence go in layer `layer`: returns the ids as ints and,
        per sequence, the number of tokens the layer holds (the first new token's index).
        ValueError if a sequence has fewer than s reserved tokens left. Changes nothing: the
        layer calls `advance` once it has written them."""
        layer = self._check_layer(layer)
        ids = self._check_ids(seq_ids, distinct=True)
        written = self._written[layer]
        for sid in ids:
            if written[sid] + s > self._lengths[sid]:
                raise ValueError(
                    f"layer {layer} holds {written[sid]} tokens of sequence {sid}, which has {self._lengths[sid]} "
                    f"reserved: {s} new tokens exceed it; reserve them first"
                )
        return ids, [written[sid] for sid in ids]

    def advance(self, layer: int, seq_ids: list[int], s: int) -> None:
        """Count s more tokens of each sequence as written by layer `layer` (ids and room as
        `step_starts` checked them)."""
        for sid in seq_ids:
            self._written[layer][sid] += s

    def slots(self, sid: int, start: int, stop: int) -> torch.Tensor:
        """int64 [stop - start] flat slots (page * page_size + row) of tokens start ... stop - 1."""
        token = torch.arange(start, stop)
        table = torch.tensor(self._seq_pages[sid], dtype=torch.int64)
        return (table[token // self.page_size] * self.page_size + token % self.page_size).to(self.device)

    def entry_slots(self, layer: int, sid: int, start: int, stop: int) -> torch.Tensor:
        """int64 [stop - start] flat slots of entries start ... stop - 1 in layer `layer`'s entry
        tensors (page of the window's first token, P entries per page)."""
        rate = self.layers[layer].rate
        per_page = max(1, self.page_size // rate)
        entry = torch.arange(start, stop)
        table = torch.tensor(self._seq_pages[sid], dtype=torch.int64)
        return (table[(entry * rate) // self.page_size] * per_page + entry % per_page).to(self.device)

    def entry_table(self, layer: int, seq_ids: Iterable[int]) -> torch.Tensor:
        """int32 [b, max pages] block table of layer `layer`'s entry tensors (P entries per page),
        padded with 0: the token table with one column per entry page."""
        stride = max(1, self.layers[layer].rate // self.page_size)
        rows = [self._seq_pages[s][::stride] for s in self._check_ids(seq_ids)]
        width = max([1] + [len(r) for r in rows])
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=self.device)

    def check_fits(self, layer: int, config: V4Config) -> None:
        """ValueError naming the field if layer `layer` of a model with `config` cannot use this
        cache (its kind, widths, window or compress rate differ from the cache's config)."""
        n = len(self.layers)
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} is out of range for a cache of {n} layers")
        mine, kind = self.config, config.layer_types[layer]
        if mine.layer_types[layer] != kind:
            raise ValueError(f"layer {layer} is {kind}, the cache holds a {mine.layer_types[layer]} layer there")
        names = ["head_dim", "sliding_window"] + (["index_head_dim"] if kind == CSA else [])
        for name in names:
            if getattr(mine, name) != getattr(config, name):
                raise ValueError(
                    f"the cache was built for {name}={getattr(mine, name)}, layer {layer} has {getattr(config, name)}"
                )
        if kind != SLIDING and mine.compress_rates[kind] != config.compress_rates[kind]:
            raise ValueError(
                f"the cache was built for a {kind} compress rate of {mine.compress_rates[kind]}, "
                f"layer {layer} has {config.compress_rates[kind]}"
            )

    def read(self, layer: int, name: str, slots: torch.Tensor) -> torch.Tensor:
        """Rows [len(slots), ...] of layer `layer`'s tensor `name` (a V4LayerStore field) at flat
        slots (`slots` for token tensors, `entry_slots` for entries / index_keys)."""
        return getattr(self.layers[layer], name).flatten(0, 1)[slots]

    def write(self, layer: int, name: str, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Store rows [len(slots), ...] at flat slots of layer `layer`'s tensor `name`, in place.
        Detached: a cache holds values, not the graph of the step that wrote them."""
        target = getattr(self.layers[layer], name)
        rows = rows.detach().reshape(-1, *target.shape[2:]).to(target.dtype)
        target.flatten(0, 1).index_copy_(0, slots, rows)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"V4Cache(layers={len(c.layer_types)}, num_pages={self.num_pages}, page_size={self.page_size}, "
            f"dtype={self.dtype}, sequences={len(self._lengths)}, free_pages={len(self._free)})"
        )

    def _check_layer(self, layer) -> int:
        layer = as_int("layer", layer)
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer {layer} is out of range for a cache of {len(self.layers)} layers")
        return layer
