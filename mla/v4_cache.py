"""`V4Cache`: a paged DeepSeek-V4 KV cache for every layer of a model (what the cached
`mla.v4_attention.V4Attention` path writes, and the decode, indexer and compressor kernels read
through `kvcache`), optionally compact (`max_rollback`) and in FP8 (`dtype="fp8"`, FlashMLA's
MODEL1 pages and MXFP4 indexer keys).

Pools and tables. Token rows live in one pool of `num_pages` pages of `page_size` tokens, shared
by all sequences and layers, with one block table row per sequence (as `mla.cache.LatentCache`):
token t of a sequence sits at row t % page_size of page table[t // page_size] in every token
tensor. The compressed entries have a pool per compressed layer kind (`num_entry_pages` pages
each) and their own table per sequence, shared by every layer of that kind (they all hold L // m
entries for a sequence of L reserved tokens): entry w sits at row w % P of page
entry_table[w // P], P = page_size entries per page (`entry_table`, `entry_slots`): an entry page
holds as many rows as a token page (a MODEL1 page of 64 rows pads 584 B rows to 585 B; one-entry
pages would pad each HCA entry to 1152 B).
A reservation takes token and entry pages together, all or nothing; truncation and free give
both back. So the entries outlive the token pages a compact cache releases.

Per layer (`V4LayerStore`; d = head_dim, D = index_head_dim):
    kv:         the token's roped KV row [d] (all layer kinds); attention reads the last
                sliding_window of them.
    raw:        CSA / HCA: the token's raw compressor projections, kv_proj and gate_proj rows
                (2 * c * d, c = 2 for CSA's overlapping windows, 1 for HCA).
    index_raw:  CSA: the same for the indexer's own compressor (2 * 2 * D).
    entries:    CSA / HCA: the closed entries [d] (entry pool).
    index_keys: CSA: the indexer keys of the closed entries, [page_size, 1, D] per entry page (entry
                pool), float32 when the cache is float64 (the indexer scores in float32, as the
                one-shot path).

Dtypes. A plain cache (float64 / float32 / bfloat16 / float16) stores every tensor in its dtype
(index keys as above). An FP8 cache (dtype "fp8" or torch.float8_e4m3fn; needs head_dim 512 and
rope_dim 64) stores kv and entries in `mla.formats.Model1Format` pages, uint8 [pages,
page_bytes(rows per page)], quantized by `write` and dequantized by `read` (float32 unless a
dtype is asked for; float64 rows are quantized from float32), the index keys as
`mla.formats.Mxfp4KeyFormat` rows (68 B for index_head_dim 128: e2m1 values with a power-of-two
scale per 32, as DeepSeek deploys them; `index_format`, which the indexer kernels read), and the
raw compressor rows in bfloat16. `kvcache(layer, name)` gives kv / entries / index keys in the
k_cache form the kernels take.

Pending compressor state and exact rollback. There are no running accumulators: a sequence of
length L has closed exactly the entries w < L // m, and its pending (open-window) state is the
raw rows of tokens (L // m - 1) * m ... L - 1 (CSA: the previous window's first half overlaps
into the next entry) or (L // m) * m ... L - 1 (HCA), read back when a window's last token
arrives. So a step that starts at token t reads token rows from t - keep on at most, with

    keep = max(sliding_window - 1, 2m - 1 (if the model has CSA layers), m' - 1 (if HCA)),

and `truncate(sid, n)` is exact whenever those rows of a step starting at n are held: entries
w >= n // m are no longer counted (re-closed and overwritten later), the pending state is the
kept tokens' raw rows, exactly what it was when the sequence last had n tokens.

Bounded token rows (`max_rollback`). None (the reference mode) keeps every token's rows: exact
truncation to any length, at about 29x the compact cache's bytes (below). An int R keeps only what a
future step or a rollback of R tokens can need: at each `reserve` the cache first gives back the
token pages of each reserved sequence whose tokens all lie before

    base - R - keep,   base = its length before that reservation (or the fewest tokens a layer
                       has written, if a layer is behind)

(whole pages, so up to page_size - 1 more rows stay). Entries are never released. Then
`truncate(sid, n)` works, exactly, for every n >= base - R (any n >= the length before the last
reservation even with R = 0: speculative decoding's and transformers' assisted-decoding crop),
for n = 0, and for any other n whose rows happen to be held; otherwise it raises ValueError
("can roll back at most ..."), changing nothing. `slots` of a released token raise ValueError.
A sequence then holds at most ceil((keep + R + s) / page_size) + 1 token pages after a step of s
tokens, whatever its length, plus L // m entries per compressed layer.

Bytes. `bytes_per_token` is the whole allocation over the token capacity num_pages * page_size;
`held_bytes(sid)` is what one sequence holds now; `sequence_bytes_per_token` what one sequence of
a given length holds after a decode step (a cache on the meta device: the memory report's V4
rows). Keep-all (max_rollback None) per token and layer: d (kv) + 2d (HCA raw) + d / m', or d +
4d + 4D + (d + D) / m (CSA); sliding d. For DeepSeek-V4 in bfloat16 (d = 512, D = 128): 1024 B
per sliding, 6464 B per CSA and 3080 B per HCA layer, so 199,392 B per token for V4-Flash (2
sliding, 21 CSA, 20 HCA layers) and 289,400 B for V4-Pro (30 CSA, 31 HCA), nearly all of it the
raw compressor rows and the every-token kv rows. With max_rollback R the token rows are a
constant (keep + R + page rounding) per sequence, so at long context a sequence holds little more
than its entries and index keys: per token and CSA layer (d + D) / m values, per HCA layer d /
m'. At 1M tokens, page_size 64, max_rollback 0 (2 token pages held): V4-Flash 6,904 B per token
in bfloat16 and 3,541 B in FP8, V4-Pro 9,882 B and 5,070 B, of which the token pages' raw rows
are 26.5 B (Pro, FP8) and the rest entries (MODEL1 pages of 64 rows: 585 B per entry) and MXFP4
keys.

Bookkeeping is on the host. A step: `reserve(ids, s)`, then per layer the forward writes the
s new tokens of each sequence after what that layer already holds (`step_starts` checks they
were reserved, `advance` counts them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from mla.formats import PLAIN_DTYPES, Model1Format, index_key_format, is_fp8_dtype
from mla.pages import RELEASED, CacheFullError, PagedSequences, as_int, positive
from mla.v4 import COMPRESSED_TYPES, CSA, HCA, SLIDING, V4Config

__all__ = ["CacheFullError", "V4Cache", "V4LayerStore", "sequence_bytes_per_token"]

CACHE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
"""The plain cache dtypes; "fp8" / torch.float8_e4m3fn select the FP8 cache."""

FP8_TENSORS = ("kv", "entries")
"""The tensors an FP8 cache stores in MODEL1 pages (the rest stay bfloat16)."""


@dataclass(frozen=True)
class V4LayerStore:
    """One layer's tensors (None where its kind has none); shapes in the module docstring.

    Plain cache: kv [num_pages, page_size, head_dim]; raw [num_pages, page_size, 2, c * head_dim]
    (kv_proj row, gate_proj row); index_raw [num_pages, page_size, 2, 2 * index_head_dim];
    entries [num_entry_pages, page_size, head_dim]; index_keys [num_entry_pages, page_size, 1,
    index_head_dim]. FP8 cache: kv uint8 [num_pages, Model1Format().page_bytes(page_size)],
    entries uint8 [num_entry_pages, page_bytes(page_size)], index keys uint8 [num_entry_pages,
    page_size, 1, 68] (MXFP4), raw rows bfloat16 as above.
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


class _EntryPool:
    """The entry pages of one compressed layer kind: a free list and, per sequence, the pages of
    its entries (entry w at row w % page_size of page table[w // page_size])."""

    def __init__(self, kind: str, rate: int, page_size: int, num_pages: int):
        self.kind, self.rate, self.page_size, self.num_pages = kind, rate, page_size, num_pages
        self.free: list[int] = list(range(num_pages - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}

    def pages_for(self, length: int) -> int:
        """Pages the entries of a sequence of `length` tokens take."""
        return -(-(length // self.rate) // self.page_size)

    def need(self, sid: int, length: int) -> int:
        return max(0, self.pages_for(length) - len(self.tables[sid]))

    def grow(self, sid: int, length: int) -> None:
        self.tables[sid].extend(self.free.pop() for _ in range(self.need(sid, length)))

    def shrink(self, sid: int, length: int) -> None:
        pages, keep = self.tables[sid], self.pages_for(length)
        self.free.extend(reversed(pages[keep:]))
        del pages[keep:]


class V4Cache(PagedSequences):
    """Paged cache of every layer of a DeepSeek-V4 model (module docstring: layout, rollback,
    bounded rows, FP8).

    Args:
        config: the V4Config of the model; layer i stores what config.layer_types[i] needs.
        num_pages: token pages in the pool, shared by all sequences and layers.
        page_size: tokens per token page (any positive int).
        dtype: torch.float64 / float32 / bfloat16 / float16, or "fp8" / torch.float8_e4m3fn
            (MODEL1 kv and entries, MXFP4 index keys, bfloat16 raw rows; head_dim 512, rope_dim 64).
        device: where the tensors live.
        max_rollback: None (keep every token's rows: exact truncation to any length), or R >= 0:
            keep only the token rows a future step or a rollback of R tokens can need.
        num_entry_pages: pages of page_size entries in each entry pool (one per compressed layer
            kind): an int for all, a mapping {kind: pages}, or None: num_pages, enough for the
            entries of any sequences that fit num_pages * page_size tokens (a sequence of L
            tokens takes ceil(L / page_size) token pages and ceil((L // m) / page_size) entry
            pages). With max_rollback the token pages are few and long contexts need more entry
            pages: size the pools to the entries, L // m per sequence.

    Attributes:
        layers: tuple of `V4LayerStore`, one per layer.
        keep: tokens before a step's first token that the step may read (module docstring).
        is_fp8: whether kv and entries are MODEL1 pages.
    """

    def __init__(
        self,
        config: V4Config,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        max_rollback: int | None = None,
        num_entry_pages: int | Mapping[str, int] | None = None,
    ):
        if not isinstance(config, V4Config):
            raise TypeError(f"config must be a V4Config, got {type(config).__name__}")
        super().__init__(num_pages, page_size)
        self.config = config
        self.is_fp8 = is_fp8_dtype(dtype)
        if self.is_fp8:
            fmt = Model1Format()
            if (config.head_dim, config.rope_dim) != (fmt.head_dim, fmt.rope_dim):
                raise ValueError(
                    f"an FP8 V4Cache stores MODEL1 rows of head_dim={fmt.head_dim} with rope_dim={fmt.rope_dim}, "
                    f"the config has head_dim={config.head_dim}, rope_dim={config.rope_dim}"
                )
            self.format = fmt
            self.dtype, self.plain_dtype = torch.float8_e4m3fn, torch.bfloat16
        elif dtype in CACHE_DTYPES:
            self.format = None
            self.dtype = self.plain_dtype = dtype
        else:
            raise TypeError(f"dtype must be one of {CACHE_DTYPES} or 'fp8' / torch.float8_e4m3fn, got {dtype!r}")
        self.index_dtype = torch.float32 if dtype == torch.float64 else self.plain_dtype
        # the indexer keys' row: MXFP4 in an FP8 cache (DeepSeek deploys them in FP4), else plain
        self.index_format = index_key_format("mxfp4" if self.is_fp8 else self.index_dtype, config.index_head_dim)
        if max_rollback is not None:
            max_rollback = as_int("max_rollback", max_rollback)
            if max_rollback < 0:
                raise ValueError(f"max_rollback must be None or >= 0, got {max_rollback}")
        self.max_rollback = max_rollback
        kinds = set(config.layer_types)
        rates = config.compress_rates
        self.keep = max(
            [config.sliding_window - 1]
            + ([2 * rates[CSA] - 1] if CSA in kinds else [])
            + ([rates[HCA] - 1] if HCA in kinds else [])
        )
        self.device = torch.device(device)
        self.pools = {
            kind: _EntryPool(kind, rates[kind], self.page_size, self._entry_pages(kind, num_entry_pages))
            for kind in COMPRESSED_TYPES
            if kind in kinds
        }
        self.layers = tuple(self._allocate(kind) for kind in config.layer_types)
        self._written: list[dict[int, int]] = [{} for _ in config.layer_types]  # tokens each layer holds

    def _entry_pages(self, kind: str, num_entry_pages) -> int:
        if num_entry_pages is None:
            return self.num_pages
        if isinstance(num_entry_pages, Mapping):
            kinds = sorted(set(self.config.layer_types) & set(COMPRESSED_TYPES))
            if set(num_entry_pages) != set(kinds):
                raise ValueError(
                    f"num_entry_pages must give pages for each compressed layer kind of the model, and only "
                    f"those: {kinds}, got {dict(num_entry_pages)}"
                )
            return positive(f"num_entry_pages[{kind!r}]", num_entry_pages[kind])
        return positive("num_entry_pages", num_entry_pages)

    def _allocate(self, kind: str) -> V4LayerStore:
        c, n, ps, dev = self.config, self.num_pages, self.page_size, self.device
        plain = self.plain_dtype
        kv = self._rows(n, c.head_dim)
        if kind == SLIDING:
            return V4LayerStore(kind, 0, kv)
        pool = self.pools[kind]
        width = (2 if kind == CSA else 1) * c.head_dim
        store = dict(
            raw=torch.zeros(n, ps, 2, width, dtype=plain, device=dev),
            entries=self._rows(pool.num_pages, c.head_dim),
        )
        if kind == CSA:
            store.update(
                index_raw=torch.zeros(n, ps, 2, 2 * c.index_head_dim, dtype=plain, device=dev),
                index_keys=torch.zeros(
                    pool.num_pages, ps, 1, self.index_format.row_width,
                    dtype=self.index_format.storage_dtype, device=dev,
                ),  # fmt: skip
            )
        return V4LayerStore(kind, pool.rate, kv, **store)

    def _rows(self, pages: int, width: int) -> torch.Tensor:
        """A kv / entries page tensor: MODEL1 pages (FP8) or [pages, page_size, width]."""
        if self.is_fp8:
            return self.format.allocate(pages, self.page_size, self.device)
        return torch.zeros(pages, self.page_size, width, dtype=self.dtype, device=self.device)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of the whole allocation (token pages and entry pools, every layer) per token of
        the token pool's capacity, num_pages * page_size."""
        return self.allocated_bytes() // (self.num_pages * self.page_size)

    def allocated_bytes(self) -> int:
        """Bytes of every tensor of the cache."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def held_bytes(self, sid: int) -> int:
        """Bytes of the pages sequence `sid` holds now: its token pages in every layer's token
        tensors and its entry pages in every layer's entry tensors."""
        tokens = self.held_pages(sid)
        total = 0
        for store in self.layers:
            for name in ("kv", "raw", "index_raw"):
                t = getattr(store, name)
                if t is not None:
                    total += tokens * t[0].numel() * t.element_size()
            if store.kind != SLIDING:
                entry_pages = len(self.pools[store.kind].tables[sid])
                for t in (store.entries, store.index_keys):
                    if t is not None:
                        total += entry_pages * t[0].numel() * t.element_size()
        return total

    def held_pages(self, sid: int) -> int:
        """Token pages sequence `sid` holds now."""
        return sum(p != RELEASED for p in self._seq_pages[self._check_id(sid)])

    def _added(self, sid: int) -> None:
        for written in self._written:
            written[sid] = 0
        for pool in self.pools.values():
            pool.tables[sid] = []

    def _dropped(self, sid: int) -> None:
        for written in self._written:
            del written[sid]
        for pool in self.pools.values():
            del pool.tables[sid]

    def written(self, layer: int, sid: int) -> int:
        """Tokens layer `layer` holds for sequence `sid`."""
        return self._written[self._check_layer(layer)][self._check_id(sid)]

    def reserve(self, seq_ids: Iterable[int], n) -> None:
        """Grow each sequence by n tokens (one int for all, or one per sequence), taking token and
        entry pages as needed; with max_rollback, first give back each sequence's token pages no
        future step or allowed rollback needs (module docstring).

        All or nothing: raises CacheFullError, with the cache unchanged, if a pool cannot cover
        the whole request (counting the token pages this reservation gives back)."""
        ids = self._check_ids(seq_ids, distinct=True)
        counts = self._counts(n, ids, "n")
        before = {sid: self._release_point(sid) for sid in ids}
        released = sum(self._releasable(sid, before[sid]) for sid in ids)
        new_pages = [self._pages_for(self._lengths[s] + c) - len(self._seq_pages[s]) for s, c in zip(ids, counts)]
        if sum(new_pages) > len(self._free) + released:
            also = f" (+{released} this reservation gives back)" if released else ""
            raise CacheFullError(
                f"reserving {counts} tokens for sequences {ids} needs {sum(new_pages)} new pages, "
                f"only {len(self._free)} of {self.num_pages} are free{also}; free or truncate sequences first"
            )
        for kind, pool in self.pools.items():
            need = sum(pool.need(s, self._lengths[s] + c) for s, c in zip(ids, counts))
            if need > len(pool.free):
                raise CacheFullError(
                    f"reserving {counts} tokens for sequences {ids} needs {need} new {kind} entry pages, only "
                    f"{len(pool.free)} of {pool.num_pages} are free; free or truncate sequences first, or make "
                    f"the cache with more num_entry_pages"
                )
        for sid in ids:
            self._release_front(sid, before[sid])
        super().reserve(ids, counts)
        for pool in self.pools.values():
            for sid in ids:
                pool.grow(sid, self._lengths[sid])

    def _release_point(self, sid: int) -> int:
        """Tokens before this one are needed by no future step nor allowed rollback (0 when
        every row is kept)."""
        if self.max_rollback is None:
            return 0
        base = min([self._lengths[sid]] + [written[sid] for written in self._written])
        return base - self.max_rollback - self.keep

    def _first_needed(self, start: int) -> int:
        """The first token a step starting at token `start` reads, over every layer kind."""
        c, kinds = self.config, set(self.config.layer_types)
        first = [start - c.sliding_window + 1]
        if CSA in kinds:
            m = c.compress_rates[CSA]
            first.append((start // m - 1) * m)
        if HCA in kinds:
            m = c.compress_rates[HCA]
            first.append((start // m) * m)
        return max(0, min(first))

    def _rows_held_for(self, sid: int, new_length: int) -> bool:
        """Whether every row a step after truncating `sid` to new_length reads is held."""
        held = self.first_held(sid)
        for written in self._written:
            start = min(written[sid], new_length)
            if self._first_needed(start) < min(start, held):
                return False
        return True

    def truncate(self, sid: int, new_length: int) -> None:
        """Shorten sequence `sid` to `new_length` tokens in every layer (speculative rollback);
        token and entry pages no longer used go back to the pools. Exact: the entries and pending
        compressor state are those of the kept tokens. With max_rollback, ValueError (nothing
        changed) if rows that cut needs were released (module docstring)."""
        sid = self._check_id(sid)
        new_length = as_int("new_length", new_length)
        if 0 <= new_length <= self._lengths[sid] and not self._rows_held_for(sid, new_length):
            length, held = self._lengths[sid], self.first_held(sid)
            # every n from held + keep on is held (a step reads at most keep tokens back)
            candidates = range(held, min(length, held + self.keep) + 1)
            lowest = next((n for n in candidates if self._rows_held_for(sid, n)), length)
            raise ValueError(
                f"sequence {sid} can roll back at most {length - lowest} tokens (to length {lowest}, or to 0) "
                f"with max_rollback={self.max_rollback}: the rows of its tokens before {held} were released, "
                f"and truncating to {new_length} needs rows from token {self._first_needed(new_length)}"
            )
        super().truncate(sid, new_length)
        for written in self._written:
            written[sid] = min(written[sid], new_length)
        for pool in self.pools.values():
            pool.shrink(sid, new_length)

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
        """int64 [stop - start] flat slots (page * page_size + row) of tokens start ... stop - 1
        in the token tensors. ValueError outside the reserved tokens or before `first_held`
        (rows a compact cache released)."""
        length, held = self._lengths[sid], self.first_held(sid)
        if not 0 <= start <= stop <= length:
            raise ValueError(f"tokens {start} ... {stop - 1} are not within sequence {sid}'s {length} reserved tokens")
        if start < held and start < stop:
            raise ValueError(
                f"tokens {start} ... {stop - 1} of sequence {sid}: its rows before token {held} were released "
                f"(max_rollback={self.max_rollback} keeps {self.keep} tokens before a step, plus the rollback)"
            )
        return self._flat_slots(self._seq_pages[sid], start, stop)

    def entry_slots(self, layer: int, sid: int, start: int, stop: int) -> torch.Tensor:
        """int64 [stop - start] flat slots (page * page_size + row) of entries start ... stop - 1
        in layer `layer`'s entry tensors (its kind's entry pool)."""
        pool = self._pool(layer)
        count = self._lengths[sid] // pool.rate
        if not 0 <= start <= stop <= count:
            raise ValueError(f"entries {start} ... {stop - 1} are not within sequence {sid}'s {count} entries")
        return self._flat_slots(pool.tables[sid], start, stop)

    def _flat_slots(self, pages: list[int], start: int, stop: int) -> torch.Tensor:
        """int64 flat slots (page * page_size + row) of rows start ... stop - 1 of a page list."""
        index = torch.arange(start, stop)
        table = torch.tensor(pages, dtype=torch.int64)
        return (table[index // self.page_size] * self.page_size + index % self.page_size).to(self.device)

    def entry_table(self, layer: int, seq_ids: Iterable[int]) -> torch.Tensor:
        """int32 [b, max pages] block table of layer `layer`'s entry tensors (page_size entries per
        page), padded with 0."""
        pool = self._pool(layer)
        rows = [pool.tables[s] for s in self._check_ids(seq_ids)]
        width = max([1] + [len(r) for r in rows])
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=self.device)

    def _pool(self, layer: int) -> _EntryPool:
        kind = self.layers[self._check_layer(layer)].kind
        if kind == SLIDING:
            raise ValueError(f"layer {layer} is a sliding layer: it has no compressed entries")
        return self.pools[kind]

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

    def _tensor(self, layer: int, name: str) -> torch.Tensor:
        store = self.layers[layer]
        tensor = getattr(store, name, None) if name in V4LayerStore.__dataclass_fields__ else None
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"layer {layer} ({store.kind}) has no cache tensor {name!r}")
        return tensor

    def read(self, layer: int, name: str, slots: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [len(slots), ...] of layer `layer`'s tensor `name` (a V4LayerStore field) at flat
        slots (`slots` for token tensors, `entry_slots` for entries / index_keys), in `dtype`
        (default: as stored; MODEL1 kv / entries dequantize to float32)."""
        target = self._tensor(layer, name)
        if self.is_fp8 and name in FP8_TENSORS:
            return self.format.read(target, self.page_size, slots, dtype or torch.float32)
        if name == "index_keys" and self.index_format.is_fp4:
            return self.index_format.unpack(target.flatten(0, 1)[slots], dtype or torch.float32)
        rows = target.flatten(0, 1)[slots]
        return rows if dtype is None else rows.to(dtype)

    def write(self, layer: int, name: str, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Store rows [len(slots), ...] at flat slots of layer `layer`'s tensor `name`, in place
        (MODEL1 kv / entries quantized from the rows, float64 through float32). Detached: a
        cache holds values, not the graph of the step that wrote them."""
        target = self._tensor(layer, name)
        rows = rows.detach()
        if self.is_fp8 and name in FP8_TENSORS:
            rows = rows.reshape(-1, self.config.head_dim)
            rows = rows if rows.dtype in PLAIN_DTYPES else rows.float()
            self.format.write(target, self.page_size, slots, rows)
            return
        if name == "index_keys" and self.index_format.is_fp4:
            rows = self.index_format.pack(rows.reshape(-1, self.config.index_head_dim).float())
        rows = rows.reshape(-1, *target.shape[2:]).to(target.dtype)
        target.flatten(0, 1).index_copy_(0, slots, rows)

    def kvcache(self, layer: int, name: str = "kv") -> torch.Tensor:
        """Layer `layer`'s "kv", "entries" or "index_keys" in the k_cache form a decode kernel
        takes, over the same memory: plain [pages, page_size, 1, width]; FP8 kv / entries the
        MODEL1 view uint8 [pages, page_size, 1, 584] (`Model1Format.kvcache_view`). Entries and
        index keys are indexed through `entry_table`."""
        if name not in ("kv", "entries", "index_keys"):
            raise ValueError(f"kvcache takes 'kv', 'entries' or 'index_keys', got {name!r}")
        target = self._tensor(self._check_layer(layer), name)
        if self.is_fp8 and name in FP8_TENSORS:
            return self.format.kvcache_view(target, self.page_size)
        return target if name == "index_keys" else target.unsqueeze(2)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"V4Cache(layers={len(c.layer_types)}, num_pages={self.num_pages}, page_size={self.page_size}, "
            f"dtype={self.dtype}, max_rollback={self.max_rollback}, sequences={len(self._lengths)}, "
            f"free_pages={len(self._free)}, free_entry_pages={ {k: len(p.free) for k, p in self.pools.items()} })"
        )

    def _check_layer(self, layer) -> int:
        layer = as_int("layer", layer)
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer {layer} is out of range for a cache of {len(self.layers)} layers")
        return layer


def sequence_bytes_per_token(
    config: V4Config, context: int, dtype: torch.dtype | str, page_size: int = 64, max_rollback: int = 0
) -> float:
    """Bytes per token that one sequence of `context` tokens holds in a compact V4Cache, over all
    layers, right after a decode step (its prefill of context - 1 tokens, then one token): the
    window and open-window token pages, all its entries and indexer keys. Measured on a cache
    built on the meta device through the same code as a real one (nothing is allocated), so
    the memory report's figures are this class's allocation."""
    context = positive("context", context)
    pages = -(-context // page_size) + 2
    entry_pages = {kind: -(-(context // rate) // page_size) + 1 for kind, rate in config.compress_rates.items()
                   if kind in config.layer_types}  # fmt: skip
    cache = V4Cache(config, pages, page_size, dtype=dtype, device="meta", max_rollback=max_rollback,
                    num_entry_pages=entry_pages)  # fmt: skip
    sid = cache.add_sequence()
    for step in (context - 1, 1):
        cache.reserve([sid], step)
        for layer in range(len(cache.layers)):
            cache.advance(layer, [sid], step)
    return cache.held_bytes(sid) / context

