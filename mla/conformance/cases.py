"""The conformance cases: every `flash_mla_with_kvcache` call the suite makes.

A `Case` is one call, described by its shapes, the features it uses and a seed; `Case.build`
makes its tensors (on the CPU from a seeded generator, so the data is the same on every
device) and returns a `Call`. `CASES` lists them all; `select` picks the ones a run wants.
Our own tests (tests/test_decode*.py) parametrize over the same list, so a case and its
tolerance live here once.

The data is adversarial, so that reading anything the contract says is never read puts NaN in
the output:
- dense: a shuffled block table; every page slot past a sequence's length and every page no
  sequence lists holds NaN; table entries past a sequence's pages hold INT32_MAX; lengths 0, 1,
  page - 1, page + 1 and a few hundred, mixed in one batch;
- slot lists (sparse indices, the extra cache): slots anywhere in the cache, about a fifth of
  the entries -1, some repeating their neighbour; every slot no read entry names holds NaN, the
  cache's first and last pages always (where a -1 read as a slot would land), and entries past
  topk_length name NaN slots;
- ragged rows: query tokens past seqlens_q are NaN, and so is every slot only they list;
- sinks: -inf, 0, 30 and +inf cycled over the heads (no effect, finite, swamping, zero output);
- odd shapes: 1, 3, 16, 64 and 128 query heads over 1 or 2 latent heads, page sizes 1, 16 and
  64 (and 7, 8, 4, 3 for extra caches), head dims 576/512, 512/512, 80/64 down to 3/1.

`--quick` (the default, and the default pytest run) is every case not marked slow: each value
of each axis several times. `--full` adds the cartesian sweeps (`pytest -m slow`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
from collections.abc import Iterable

import torch

from mla.formats import Model1Format
from mla.reference.quant import quantize_latent_fp8

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""q's dtype, by the names the command takes; a plain cache has q's dtype."""

FEATURES = ("dense", "causal", "fp8", "sparse", "sink", "extra", "ragged")
"""What a case can use. Every case is dense (block table and cache_seqlens) or sparse (indices)."""

SINKS = (-math.inf, 0.0, 30.0, math.inf)
"""attn_sink values, cycled over the heads."""

HEADS = ((1, 1), (3, 1), (16, 1), (64, 1), (128, 1), (16, 2), (64, 2), (128, 2))
DIMS = ((576, 512), (80, 64), (512, 512))
PAGES = (1, 16, 64)
RAGGED_ROWS = (2, 0, 7, 1)
"""Query tokens per row of the ragged cases: 0, 1, 2 and 7 in one batch, not sorted."""


@dataclasses.dataclass(frozen=True)
class Extra:
    """An extra cache: its page size, slots per query token and per-row used lengths (None: all)."""

    page: int
    topk: int
    topk_length: tuple[int, ...] | None = None


@dataclasses.dataclass
class Call:
    """The arguments of one `flash_mla_with_kvcache` call, on one device.

    Attributes:
        q: [b, s_q, h_q, d] bf16 / fp16 / fp32.
        k_cache: [num_blocks, page, h_kv, d] in q's dtype, or FP8 rows (float8_e4m3fn [..., bytes]).
        block_table: int32 [b, max_blocks] (dense) or None.
        cache_seqlens: int32 [b] (dense) or None.
        head_dim_v: dv.
        kwargs: only the keywords this call uses (causal always), so an implementation without,
            say, `seqlens_q` still takes every call that does not need it.
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor | None
    cache_seqlens: torch.Tensor | None
    head_dim_v: int
    kwargs: dict

    @property
    def args(self) -> tuple:
        return self.q, self.k_cache, self.block_table, self.cache_seqlens, self.head_dim_v

    @property
    def softmax_scale(self) -> float:
        scale = self.kwargs.get("softmax_scale")
        return self.q.shape[-1] ** -0.5 if scale is None else scale


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of the suite.

    Attributes:
        b, s_q, h_q, h_kv, d, dv: batch, query tokens per row, query heads, latent heads, q/k
            head dim, V head dim (the first dv channels of a cache row).
        dtype: q's dtype name (a key of DTYPES).
        page: page_block_size of k_cache.
        seed: seeds every tensor of the case.
        lens: dense: cache_seqlens. None for a sparse case.
        topk: sparse: entries per query token. None for a dense case.
        topk_length: sparse: entries each row uses (None: all).
        causal, fp8, sink: the call's causal flag; an FP8 cache (q stays `dtype`); attn_sink.
        extra: an extra cache, or None.
        seqlens_q: ragged query lengths, or None.
        blind_rows: sparse rows whose main indices are all -1 (they see only the extra cache).
        softmax_scale: passed when not None (the default, d ** -0.5, otherwise).
        num_sm: schedule hint for implementations whose get_mla_metadata takes num_sm: plan for
            this many processors, so that small inputs still split (flash-decoding's combine).
        slow: only in --full runs (and pytest -m slow).
        tag: a word that tells apart cases of equal shapes.
        benign: finite data everywhere, no -1 entries, full lengths: the probe of a case.
    """

    b: int
    s_q: int
    h_q: int
    h_kv: int
    d: int
    dv: int
    dtype: str
    page: int
    seed: int
    lens: tuple[int, ...] | None = None
    topk: int | None = None
    topk_length: tuple[int, ...] | None = None
    causal: bool = False
    fp8: bool = False
    sink: bool = False
    extra: Extra | None = None
    seqlens_q: tuple[int, ...] | None = None
    blind_rows: tuple[int, ...] = ()
    softmax_scale: float | None = None
    num_sm: int | None = None
    slow: bool = False
    tag: str = ""
    benign: bool = False

    @property
    def sparse(self) -> bool:
        return self.topk is not None

    @property
    def features(self) -> frozenset[str]:
        flags = dict(causal=self.causal, fp8=self.fp8, sink=self.sink, extra=self.extra is not None,
                     ragged=self.seqlens_q is not None)  # fmt: skip
        return frozenset(["sparse" if self.sparse else "dense", *(name for name, on in flags.items() if on)])

    @property
    def id(self) -> str:
        """Readable and unique: shapes first, then what the call uses."""
        parts = [f"b{self.b}", f"sq{self.s_q}", f"h{self.h_q}x{self.h_kv}", f"page{self.page}", self.dtype]
        parts += ["fp8"] * self.fp8 + [f"d{self.d}v{self.dv}"]
        if self.sparse:
            parts.append(f"topk{self.topk}" + ("-lengths" if self.topk_length is not None else ""))
        for word, on in (("causal", self.causal), ("extra", self.extra), ("sink", self.sink), ("ragged", self.seqlens_q)):
            parts += [word] * bool(on)
        if self.softmax_scale is not None:
            parts.append(f"scale{self.softmax_scale:g}")
        parts += ["split"] * bool(self.num_sm) + [self.tag] * bool(self.tag)
        return "-".join(parts)

    def describe(self) -> str:
        """One line with every shape and the seed, for a reproduction."""
        words = [f"b={self.b} s_q={self.s_q} h_q={self.h_q} h_kv={self.h_kv} d={self.d} dv={self.dv}",
                 f"q {self.dtype}", "FP8 cache" if self.fp8 else f"{self.dtype} cache", f"page={self.page}"]  # fmt: skip
        if self.sparse:
            words.append(f"topk={self.topk} topk_length={list(self.topk_length) if self.topk_length else 'all'}")
        else:
            words.append(f"cache_seqlens={list(self.lens)}")
        if self.extra is not None:
            x = self.extra
            words.append(f"extra(page={x.page} topk={x.topk} topk_length={list(x.topk_length) if x.topk_length else 'all'})")
        if self.seqlens_q is not None:
            words.append(f"seqlens_q={list(self.seqlens_q)}")
        if self.blind_rows:
            words.append(f"rows {list(self.blind_rows)} all -1")
        words += ["causal"] * self.causal + ["attn_sink"] * self.sink
        if self.softmax_scale is not None:
            words.append(f"softmax_scale={self.softmax_scale:g}")
        if self.num_sm:
            words.append(f"num_sm={self.num_sm}")
        return " ".join(words + [f"seed={self.seed}"])

    def probe(self) -> Case:
        """The same configuration (every shape an implementation may reject: dtype, FP8, page
        sizes, head dims and counts, s_q, topk, the features) on one row of benign data; two
        cases of one configuration have the same probe."""
        full = (lambda lengths, topk: None if lengths is None else (topk,))  # noqa: E731
        extra = self.extra and dataclasses.replace(self.extra, topk_length=full(self.extra.topk_length, self.extra.topk))
        return dataclasses.replace(
            self, b=1, seed=0, lens=None if self.sparse else (self.page + 1,),
            topk_length=full(self.topk_length, self.topk), extra=extra,
            seqlens_q=None if self.seqlens_q is None else (self.s_q,), blind_rows=(), num_sm=None, slow=False, tag="",
            benign=True,
        )  # fmt: skip

    def build(self, device: torch.device | str = "cpu") -> Call:
        """The case's tensors, made on the CPU from the seed and moved to `device`."""
        g = torch.Generator().manual_seed(self.seed)
        dtype = DTYPES[self.dtype]
        rows = self.seqlens_q if self.seqlens_q is not None else (self.s_q,) * self.b
        q = torch.randn(self.b, self.s_q, self.h_q, self.d, generator=g).to(dtype)
        kwargs = {"causal": self.causal}
        block_table = cache_seqlens = None
        if self.sparse:
            k_cache, indices, topk_length = _slot_lists(g, self, self.page, self.topk, self.topk_length, rows)
            indices[list(self.blind_rows)] = -1
            kwargs["indices"] = indices
            if topk_length is not None:
                kwargs["topk_length"] = topk_length
        else:
            k_cache, block_table, cache_seqlens = _paged_cache(g, self)
        if self.extra is not None:
            x = self.extra
            x_cache, x_indices, x_length = _slot_lists(g, self, x.page, x.topk, x.topk_length, rows)
            kwargs.update(extra_k_cache=to_fp8_cache(x_cache, self.dv) if self.fp8 else x_cache,
                          extra_indices_in_kvcache=x_indices)  # fmt: skip
            if x_length is not None:
                kwargs["extra_topk_length"] = x_length
        if self.sink:
            values = [0.0 if self.benign else SINKS[h % len(SINKS)] for h in range(self.h_q)]
            kwargs["attn_sink"] = torch.tensor(values, dtype=torch.float32)
        if self.seqlens_q is not None:
            kwargs["seqlens_q"] = torch.tensor(rows, dtype=torch.int32)
            for i, n in enumerate(rows):
                q[i, n:] = 0.0 if self.benign else float("nan")
        if self.fp8:
            k_cache = to_fp8_cache(k_cache, self.dv)
            kwargs["is_fp8_kvcache"] = True
        if self.softmax_scale is not None:
            kwargs["softmax_scale"] = self.softmax_scale
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Call(move(q), move(k_cache), move(block_table), move(cache_seqlens), self.dv,
                    {k: move(v) for k, v in kwargs.items()})  # fmt: skip


def to_fp8_cache(k_cache: torch.Tensor, dv: int) -> torch.Tensor:
    """A plain cache [num_blocks, page, h_kv, d] as FlashMLA's FP8 cache, float8_e4m3fn like
    FlashMLA's own quantizer returns: V3's rows [..., bytes] (`mla.formats.Fp8Format`), or for
    DeepSeek-V4's d = dv = 512 its MODEL1 pages viewed [num_blocks, page, 1, 584]
    (`Model1Format.kvcache_view`); NaN slots become poisoned (NaN) tiles."""
    num_blocks, page, _, d = k_cache.shape
    if d == dv == Model1Format.head_dim:
        fmt = Model1Format()
        pages = fmt.allocate(num_blocks, page, k_cache.device)
        fmt.write(pages, page, torch.arange(num_blocks * page), k_cache.reshape(-1, d).float())
        return fmt.kvcache_view(pages, page).view(torch.float8_e4m3fn)
    flat = k_cache.reshape(-1, k_cache.shape[-1])
    rows = quantize_latent_fp8(flat[:, :dv], flat[:, dv:])
    return rows.view(torch.float8_e4m3fn).view(*k_cache.shape[:3], -1)


def _paged_cache(g: torch.Generator, case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache [num_blocks, page, h_kv, d], block_table int32 [b, max_blocks], cache_seqlens int32 [b]).

    Pages are dealt from a shuffled order; three pages are left unlisted. Adversarial: NaN in
    every slot no sequence holds, INT32_MAX in table entries past a sequence's pages. Benign:
    random values there and page 0 in the spare table entries (one spare column at least)."""
    page, lens = case.page, case.lens
    pages_per_seq = [math.ceil(n / page) for n in lens]
    num_blocks = sum(pages_per_seq) + 3
    width = max(1, max(pages_per_seq)) + case.benign
    shape = (num_blocks, page, case.h_kv, case.d)
    k_cache = torch.randn(shape, generator=g) if case.benign else torch.full(shape, float("nan"))
    block_table = torch.full((case.b, width), 0 if case.benign else torch.iinfo(torch.int32).max, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=g)
    used = 0
    for i, n in enumerate(lens):
        blocks = order[used : used + pages_per_seq[i]]
        used += pages_per_seq[i]
        block_table[i, : len(blocks)] = blocks.int()
        rows = k_cache[blocks].view(-1, case.h_kv, case.d)
        rows[:n] = torch.randn(n, case.h_kv, case.d, generator=g)
        k_cache[blocks] = rows.view(len(blocks), page, case.h_kv, case.d)
    return k_cache.to(DTYPES[case.dtype]), block_table, torch.tensor(lens, dtype=torch.int32)


def _slot_lists(g, case: Case, page: int, topk: int, lengths, rows_read) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A paged cache [num_blocks, page, h_kv, d] and int32 indices [b, s_q, topk] into it, and
    the int32 topk lengths [b] (None when lengths is None).

    Entries name slots anywhere but the first and last pages (so also other rows' pages). Only
    the first lengths[i] entries of row i are read, and only for its first rows_read[i] query
    tokens. Adversarial: a fifth of the entries -1, some repeating their neighbour; every slot
    no read entry names holds NaN, and every entry not read names such a slot."""
    b, s_q = case.b, case.s_q
    num_blocks = math.ceil(2 * b * s_q * topk / page) + 2
    num_slots = num_blocks * page
    cache = torch.randn(num_blocks, page, case.h_kv, case.d, generator=g).to(DTYPES[case.dtype])
    indices = torch.randint(page, num_slots - page, (b, s_q, topk), generator=g, dtype=torch.int32)
    topk_length = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
    if case.benign:
        return cache, indices, topk_length
    indices[torch.rand(b, s_q, topk, generator=g) < 0.2] = -1
    dup = torch.rand(b, s_q, topk, generator=g) < 0.15
    indices[dup] = indices.roll(1, dims=-1)[dup]
    limit = torch.tensor(lengths if lengths is not None else [topk] * b)
    tokens = torch.tensor(rows_read)
    read = (torch.arange(topk) < limit[:, None, None]) & (torch.arange(s_q)[:, None] < tokens[:, None, None])
    poisoned = torch.ones(num_slots, dtype=torch.bool)
    poisoned[indices[read & (indices >= 0)].long()] = False
    cache.view(num_slots, case.h_kv, case.d)[poisoned] = float("nan")
    spare = torch.nonzero(poisoned).flatten()
    indices[~read] = spare[torch.randint(0, len(spare), (int((~read).sum()),), generator=g)].int()
    return cache, indices, topk_length


def seqlens_for(b: int, page: int, n: int) -> tuple[int, ...]:
    """Lengths that hit page edges: 0, 1, page - 1, page + 1 and a few hundred, mixed in one batch."""
    pool = [0, 1, max(page - 1, 1), page + 1, 300, 2 * page + 3, 257]
    return tuple(pool[(n + 3 * i) % len(pool)] for i in range(b))


def _dense_sweep(slow: bool) -> list[Case]:
    """Quick: every (heads, s_q) pair once, the other axes cycled so each value of each axis
    appears several times. Slow: the cartesian product on a smaller grid."""
    cases = []
    if not slow:
        for n, ((h_q, h_kv), s_q) in enumerate(itertools.product(HEADS, (1, 2, 4))):
            b, page = (1, 3)[n % 2], PAGES[(n + n // 3) % 3]
            d, dv = DIMS[(n // 3) % 3]
            cases.append(Case(b, s_q, h_q, h_kv, d, dv, list(DTYPES)[(n // 2) % 3], page, seed=n,
                              lens=seqlens_for(b, page, n), causal=(n // 4) % 2 == 0, num_sm=(None, 64)[(n // 6) % 2]))  # fmt: skip
        return cases
    axes = itertools.product((1, 3), (1, 2, 4), ((16, 1), (128, 1), (64, 2)), PAGES, list(DTYPES), (False, True))
    for n, (b, s_q, (h_q, h_kv), page, dtype, causal) in enumerate(axes):
        d, dv = DIMS[n % 3]
        cases.append(Case(b, s_q, h_q, h_kv, d, dv, dtype, page, seed=n, lens=seqlens_for(b, page, n), causal=causal,
                          num_sm=(None, 64)[n % 2], slow=True, tag="sweep"))  # fmt: skip
    return cases


def _head_dim_cases() -> list[Case]:
    """Head dims beyond the sweep's (down to d = 3, dv = 1; no rope channels; a long row) and a
    given softmax scale."""
    dims = [((48, 32), (1, 65, 200)), ((64, 64), (70, 3, 0)), ((20, 8), (33, 0, 17)), ((3, 1), (5, 70, 1)),
            ((576, 512), (1000, 2, 513))]  # fmt: skip
    cases = [Case(3, 2, 8, 1, d, dv, "fp32", 16, seed=d, lens=lens, causal=True, num_sm=32) for (d, dv), lens in dims]
    return cases + [Case(1, 1, 4, 1, 80, 64, "fp32", 16, seed=5, lens=(50,), softmax_scale=0.37)]


def _fp8_cases() -> list[Case]:
    """FP8 caches over block tables: DeepSeek's 576/512 and other latent widths, q bf16 / fp16 / fp32."""
    listed = [  # b, s_q, h_q, page, dtype, d, dv, causal, num_sm
        (1, 1, 16, 64, "bf16", 576, 512, False, None), (3, 2, 128, 16, "bf16", 576, 512, True, 64),
        (3, 4, 3, 1, "fp16", 576, 512, True, 64), (3, 1, 64, 64, "fp16", 80, 64, False, 64),
        (1, 2, 16, 1, "bf16", 48, 32, True, None), (3, 2, 4, 16, "fp16", 16, 8, True, 64),
        (2, 1, 16, 16, "fp32", 80, 64, False, None), (3, 4, 16, 16, "bf16", 1152, 1024, True, 64),
    ]  # fmt: skip
    return [
        Case(b, s_q, h_q, 1, d, dv, dtype, page, seed=h_q, lens=seqlens_for(b, page, s_q + h_q), causal=causal, fp8=True,
             num_sm=num_sm)
        for b, s_q, h_q, page, dtype, d, dv, causal, num_sm in listed
    ]  # fmt: skip


def _deepseek_dense_cases() -> list[Case]:
    """DeepSeek-V3's dense decode shapes, which FlashMLA's dense kernel takes: 576/512, one
    latent head, pages of 64, bf16 / fp16, 16 (a tensor-parallel shard) to 128 query heads,
    s_q 1 or 2 (an MTP step)."""
    return [
        Case(4, 1, 16, 1, 576, 512, "bf16", 64, seed=21, lens=(0, 1, 64, 1000)),
        Case(2, 2, 128, 1, 576, 512, "bf16", 64, seed=22, lens=(65, 130), causal=True, num_sm=64),
        Case(3, 2, 64, 1, 576, 512, "fp16", 64, seed=23, lens=(129, 0, 63), causal=True),
    ]


def _deepseek_sparse_cases() -> list[Case]:
    """DeepSeek's sparse decode shapes, which FlashMLA's sparse kernel takes: FP8 rows of
    576/512, 64 or 128 query heads, slot lists of a multiple of 64 entries, topk lengths, sinks,
    an extra cache."""
    return [
        Case(2, 2, 64, 1, 576, 512, "bf16", 64, seed=24, topk=128, topk_length=(128, 77), fp8=True, sink=True),
        Case(2, 1, 128, 1, 576, 512, "bf16", 64, seed=25, topk=128, fp8=True, sink=True, extra=Extra(64, 64, (64, 17))),
    ]


def _deepseek_v4_cases() -> list[Case]:
    """DeepSeek-V4's decode, which FlashMLA's V4 path takes: one K = V head of 512 (d = dv),
    MODEL1 FP8 pages, the sliding window as slot lists, the compressed entries as an extra cache
    with pages of their own, sinks; 64 or 128 query heads, s_q 1 or 2."""
    return [
        Case(2, 1, 64, 1, 512, 512, "bf16", 64, seed=26, topk=128, topk_length=(128, 40), fp8=True, sink=True,
             extra=Extra(64, 64, (64, 9))),
        Case(2, 2, 128, 1, 512, 512, "bf16", 16, seed=27, topk=128, fp8=True, sink=True, extra=Extra(16, 64)),
    ]  # fmt: skip


def _sparse_cases() -> list[Case]:
    """Slot lists with topk lengths, extra caches and sinks; "split" cases list more than one
    split's worth of keys in some row, so a large num_sm splits them."""
    listed = [  # b, s_q, h_q, h_kv, d, dv, dtype, fp8, topk, page, topk_length, extra, sink, num_sm
        (2, 1, 1, 1, 576, 512, "bf16", False, 64, 64, None, None, False, None),
        (3, 2, 3, 1, 80, 64, "fp16", False, 300, 16, (300, 17, 0), None, True, 1000),
        (2, 2, 16, 1, 512, 512, "fp32", False, 40, 1, (40, 3), Extra(4, 24, (24, 0)), False, None),
        (2, 1, 64, 1, 576, 512, "bf16", True, 64, 64, (33, 64), Extra(16, 200, (5, 200)), True, 1000),
        (1, 2, 128, 1, 576, 512, "bf16", False, 48, 16, (48,), None, True, None),
        (2, 2, 16, 2, 80, 64, "bf16", True, 260, 7, None, Extra(3, 16), False, 1000),
        (2, 1, 16, 1, 80, 64, "fp32", False, 320, 16, (320, 100), Extra(8, 40, (40, 7)), True, 1000),
    ]  # fmt: skip
    return [
        Case(b, s_q, h_q, h_kv, d, dv, dtype, page, seed=h_q + topk, topk=topk, topk_length=lengths, fp8=fp8,
             sink=sink, extra=extra, num_sm=num_sm)
        for b, s_q, h_q, h_kv, d, dv, dtype, fp8, topk, page, lengths, extra, sink, num_sm in listed
    ]  # fmt: skip


def _blind_row_cases() -> list[Case]:
    """Rows that see nothing, with a sink: topk_length 0, only -1 entries, an empty extra list too."""
    return [
        Case(3, 2, 4, 1, 80, 64, "fp32", 16, seed=7, topk=270, topk_length=(270, 0, 270), extra=Extra(4, 8, (8, 0, 0)),
             sink=True, blind_rows=(2,), num_sm=num_sm, tag="blind-rows")
        for num_sm in (None, 1000)
    ]  # fmt: skip


def _sparse_sweep() -> list[Case]:
    """The cartesian product of heads, head dims, dtypes, extra cache and sink; page size, topk
    lengths, split schedule and s_q cycle. FP8 rows need rope channels (V3's) or d = dv = 512
    (V4's MODEL1), so FP8 skips the other d = dv pairs."""
    cases = []
    axes = itertools.product((1, 3, 16, 64, 128), DIMS, ("bf16", "fp16", "fp32", "fp8"), (False, True), (False, True))
    for n, (h_q, (d, dv), dtype, extra, sink) in enumerate(axes):
        if dtype == "fp8" and d == dv != Model1Format.head_dim:
            continue
        split = n % 2 == 1
        topk = 300 if split else 48
        lengths = (None, (topk, topk // 3), (0, topk))[n % 3]
        cases.append(Case(2, 1 + n % 2, h_q, 1, d, dv, "bf16" if dtype == "fp8" else dtype, PAGES[n % 3],
                          seed=h_q + topk + d, topk=topk, topk_length=lengths, fp8=dtype == "fp8", sink=sink,
                          extra=Extra(4, 40, (40, 0)) if extra else None, num_sm=1000 if split else None, slow=True,
                          tag="sweep"))  # fmt: skip
    return cases


def _sink_cases() -> list[Case]:
    """Sinks on a dense causal call and on a sparse one, split and not."""
    return [
        case
        for num_sm in (None, 64)
        for case in (
            Case(2, 2, 8, 1, 80, 64, "fp32", 16, seed=2, lens=(300, 40), causal=True, sink=True, num_sm=num_sm),
            Case(2, 2, 8, 1, 80, 64, "fp32", 16, seed=5, topk=300, topk_length=(300, 9), sink=True, num_sm=num_sm),
        )
    ]


def _dense_extra_cases() -> list[Case]:
    """A dense (causal) main cache and an extra slot list in one softmax."""
    return [Case(3, 2, 16, 1, 576, 512, "bf16", 16, seed=8, lens=(40, 0, 17), causal=True, extra=Extra(8, 24, (24, 5, 0)),
                 num_sm=64)]  # fmt: skip


def _ragged_dense_cases() -> list[Case]:
    """Rows of 2, 0, 7 and 1 query tokens over block tables, plain (split) and FP8 caches; row
    2 has 7 queries over 5 cached tokens, so with causal its first two see nothing."""
    return [
        Case(4, 7, 16, 1, 80, 64, "bf16", 16, seed=int(causal), lens=(40, 17, 5, 300), causal=causal, fp8=fp8,
             seqlens_q=RAGGED_ROWS, num_sm=num_sm)
        for causal in (False, True)
        for fp8, num_sm in ((False, 64), (True, None))
    ]  # fmt: skip


def _ragged_sparse_cases() -> list[Case]:
    """Everything at once: ragged rows, slot lists with topk lengths, an extra cache, sinks,
    plain (split) and FP8; padding tokens' entries name NaN slots."""
    return [
        Case(4, 7, 16, 1, 80, 64, dtype, 16, seed=13, topk=40, topk_length=(40, 12, 0, 40), fp8=fp8,
             extra=Extra(4, 300, (300, 9, 9, 0)), sink=True, seqlens_q=RAGGED_ROWS, num_sm=num_sm)
        for dtype, fp8, num_sm in (("fp32", False, 64), ("bf16", True, None))
    ]  # fmt: skip


GROUPS: dict[str, tuple[Case, ...]] = {
    "dense-sweep": tuple(_dense_sweep(slow=False)),
    "head-dims": tuple(_head_dim_cases()),
    "fp8": tuple(_fp8_cases()),
    "deepseek-dense": tuple(_deepseek_dense_cases()),
    "deepseek-sparse": tuple(_deepseek_sparse_cases()),
    "deepseek-v4": tuple(_deepseek_v4_cases()),
    "sparse": tuple(_sparse_cases()),
    "blind-rows": tuple(_blind_row_cases()),
    "sink": tuple(_sink_cases()),
    "dense-extra": tuple(_dense_extra_cases()),
    "ragged-dense": tuple(_ragged_dense_cases()),
    "ragged-sparse": tuple(_ragged_sparse_cases()),
    "dense-sweep-full": tuple(_dense_sweep(slow=True)),
    "sparse-sweep-full": tuple(_sparse_sweep()),
}
"""The cases by the property they were written for; our tests parametrize over groups."""

CASES: tuple[Case, ...] = tuple(itertools.chain.from_iterable(GROUPS.values()))
"""Every case; `select` picks a run's."""


def select(
    full: bool = False,
    features: Iterable[str] = FEATURES,
    dtypes: Iterable[str] = tuple(DTYPES),
    pattern: str | None = None,
) -> list[Case]:
    """The cases of a run: not slow unless `full`; every feature a case uses among `features`;
    q's dtype among `dtypes`; the id matching the fnmatch `pattern` (None: any)."""
    features, dtypes = frozenset(features), frozenset(dtypes)
    if unknown := (features - set(FEATURES)) | (dtypes - set(DTYPES)):
        raise ValueError(f"unknown features or dtypes {sorted(unknown)}: features are {FEATURES}, dtypes {tuple(DTYPES)}")
    return [
        case for case in CASES
        if (full or not case.slow) and case.features <= features and case.dtype in dtypes
        and (pattern is None or fnmatch.fnmatchcase(case.id, pattern))
    ]  # fmt: skip
