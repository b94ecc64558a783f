"""The lightning indexer: `index_scores` against the formula evaluated plainly in float64 (plain,
FP8 and MXFP4 index keys, shuffled block tables, NaN in every cache row no query may read, ragged
steps), and `index_topk`'s exact selection, tie rule and slot lists; both twins, identical
errors for bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mla import kernels, ops, reference
from mla.formats import Mxfp4KeyFormat, index_key_format

TWINS = {"reference": reference, "triton": kernels}
IMPLS = [pytest.param(module, id=name) for name, module in TWINS.items()]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS32 = torch.finfo(torch.float32).eps


@dataclasses.dataclass(frozen=True)
class IndexCase:
    """One index_scores call: b = len(lens) rows of cached lengths `lens`, s_q query columns
    (seqlens_q: real queries per row, None: all), `heads` x `dim` queries in `dtype`, keys in
    `dtype`, FP8 (fp8) or MXFP4 (fp4), pages of page_size; max_seqlen = max(lens) + pad."""

    s_q: int
    heads: int
    dim: int
    page_size: int
    lens: tuple[int, ...]
    dtype: str
    fp8: bool = False
    fp4: bool = False
    seqlens_q: tuple[int, ...] | None = None
    pad: int = 0
    seed: int = 0

    @property
    def id(self) -> str:
        keys = "-fp8" if self.fp8 else "-fp4" if self.fp4 else ""
        ragged = "-ragged" if self.seqlens_q else ""
        lens = "x".join(map(str, self.lens))
        shape = f"b{len(self.lens)}-sq{self.s_q}-h{self.heads}-d{self.dim}-page{self.page_size}"
        return f"{shape}-{self.dtype}{keys}-len{lens}{ragged}"

    def build(self) -> tuple[dict, torch.Tensor]:
        """(index_scores' arguments, keys float64 [b, max(lens), dim]: the values the cache
        holds at each position, dequantized for FP8 / MXFP4). Pages are shuffled across rows;
        every slot past a row's length, and every spare page, holds NaN (FP8 / MXFP4: NaN codes
        and scales); table columns past a row's pages hold page ids far outside the cache."""
        g = torch.Generator().manual_seed(self.seed)
        dtype = DTYPES[self.dtype]
        b, longest, p = len(self.lens), max(self.lens), self.page_size
        fmt = index_key_format("fp8" if self.fp8 else "mxfp4" if self.fp4 else dtype, self.dim)
        pages_per_row = [-(-n // p) for n in self.lens]
        num_pages = sum(pages_per_row) + 2
        order = torch.randperm(num_pages, generator=g)
        width = max(pages_per_row) + 1
        table = torch.full((b, width), 10**6, dtype=torch.int32)
        cache = torch.zeros(num_pages, p, 1, fmt.row_width, dtype=fmt.storage_dtype)
        cache.fill_(math.nan) if cache.is_floating_point() else cache.fill_(255)
        keys = torch.randn(b, longest, self.dim, generator=g).to(dtype)
        start = 0
        for r, n in enumerate(self.lens):
            table[r, : pages_per_row[r]] = order[start : start + pages_per_row[r]].int()
            start += pages_per_row[r]
            for j in range(n):
                cache[table[r, j // p], j % p, 0] = pack_keys(fmt, keys[r, j])
        values = unpack_keys(fmt, cache).double()  # [num_pages, p, 1, dim]
        position = torch.arange(longest)
        # positions past a row's length read a NaN row (or none: the table's far-off ids)
        pages = table[:, position // p].clamp(max=num_pages - 1)  # [b, longest]
        keys = values[pages, position % p, 0]
        q = torch.randn(b, self.s_q, self.heads, self.dim, generator=g).to(dtype)
        weights = torch.randn(b, self.s_q, self.heads, generator=g) * self.heads**-0.5
        args = dict(
            q=q, weights=weights, index_cache=cache, block_table=table,
            cache_seqlens=torch.tensor(self.lens, dtype=torch.int32), max_seqlen=longest + self.pad,
            seqlens_q=None if self.seqlens_q is None else torch.tensor(self.seqlens_q, dtype=torch.int32),
            is_fp8=self.fp8, is_fp4=self.fp4,
        )  # fmt: skip
        return args, keys


def pack_keys(fmt, keys: torch.Tensor) -> torch.Tensor:
    """Key rows of `fmt` (an `index_key_format`) for keys [..., dim]."""
    return fmt.pack(keys) if fmt.is_fp4 else fmt.pack(keys, keys.new_zeros(*keys.shape[:-1], 0))


def unpack_keys(fmt, rows: torch.Tensor) -> torch.Tensor:
    """The float32 (plain: own dtype) keys [..., dim] that rows of `fmt` hold."""
    return fmt.unpack(rows) if fmt.is_fp4 else fmt.unpack(rows)[0]


SCORE_CASES = [
    IndexCase(1, 4, 32, 4, (1, 37), "fp32", pad=5),
    IndexCase(3, 64, 128, 16, (200, 3), "bf16", seed=1),
    IndexCase(3, 4, 32, 64, (130, 2), "fp16", seqlens_q=(3, 2), seed=2),
    IndexCase(3, 3, 48, 16, (70, 45), "fp32", seqlens_q=(0, 2), pad=100, seed=3),
    IndexCase(1, 64, 128, 64, (129, 64), "bf16", fp8=True, seed=4),
    IndexCase(3, 4, 32, 4, (23, 50), "fp32", fp8=True, seqlens_q=(1, 3), seed=5),
    IndexCase(2, 4, 256, 16, (40, 17), "fp16", fp8=True, seed=6),
    IndexCase(3, 4, 32, 4, (23, 50), "fp32", fp4=True, seqlens_q=(1, 3), seed=12),
    IndexCase(1, 8, 96, 16, (40, 17), "bf16", fp4=True, pad=3, seed=13),
    IndexCase(1, 16, 128, 64, (129, 64), "fp16", fp4=True, seed=14),
]


def formula(args: dict, keys: torch.Tensor) -> torch.Tensor:
    """The scores as specified, in float64, one query token at a time: query i of row r is the
    token at position L - n + i and sees positions 0..L - n + i; -inf elsewhere."""
    q, w = args["q"].double(), args["weights"].double()
    b, s_q = q.shape[:2]
    out = torch.full((b, s_q, args["max_seqlen"]), -math.inf, dtype=torch.float64)
    for r in range(b):
        length = args["cache_seqlens"][r].item()
        n = s_q if args["seqlens_q"] is None else args["seqlens_q"][r].item()
        for i in range(n):
            seen = length - n + i + 1
            if seen > 0:
                logits = q[r, i] @ keys[r, :seen].T  # [heads, seen]
                out[r, i, :seen] = (w[r, i, :, None] * logits.relu()).sum(0)
    return out


def error_bound(args: dict, keys: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on the float32 rounding error of a score: the heads' dot products and
    their weighted sum add at most (dim + heads) roundings of the magnitudes involved (standard
    summation error analysis, unit roundoff eps / 2, doubled for margin). A wrong key, head or
    weight misses by a sizeable fraction of these magnitudes, far beyond the bound."""
    q, w = args["q"].double().abs(), args["weights"].double().abs()
    magnitude = torch.einsum("bshd,bnd,bsh->bsn", q, keys.nan_to_num().abs(), w)
    dim, heads = q.shape[-1], q.shape[-2]
    bound = EPS32 * (dim + heads) * magnitude
    return torch.nn.functional.pad(bound, (0, args["max_seqlen"] - bound.shape[-1]))


def assert_scores(name: str, actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """-inf exactly where expected, finite elsewhere, |actual - expected| <= bound elementwise."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape, (name, actual.dtype, actual.shape)
    blind = expected.isneginf()
    got = actual.isneginf()
    assert torch.equal(got, blind), f"{name}: -inf at {got.sum()} places, expected at {blind.sum()}"
    assert actual[~blind].isfinite().all(), f"{name}: {(~actual[~blind].isfinite()).sum()} non-finite scores"
    error = (actual.double() - expected).abs().masked_fill(blind, 0)
    excess = error - bound
    if (excess > 0).any():
        worst = tuple(torch.nonzero(excess == excess.max())[0].tolist())
        raise AssertionError(
            f"{name}: {(excess > 0).sum()} scores over the bound; worst at {worst}: {actual[worst].item()} vs "
            f"{expected[worst].item()} (error {error[worst].item():.3g}, bound {bound[worst].item():.3g})"
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in SCORE_CASES])
def test_scores_match_formula(nan_empty, impl, case):
    """Scores from every visible cached position, -inf elsewhere (past the length, causally
    hidden, padding queries, the max_seqlen padding); the NaN rows are never read."""
    args, keys = case.build()
    scores = impl.index_scores(**args)
    assert_scores(impl.__name__, scores, formula(args, keys), error_bound(args, keys))


def test_reference_in_float64_matches_formula():
    """A float64 q (over FP8 keys, dequantized exactly): the reference computes in float64 and
    rounds once to float32."""
    args, keys = IndexCase(3, 4, 32, 4, (23, 50), "fp32", fp8=True, seqlens_q=(1, 3), seed=7).build()
    args["q"] = args["q"].double()
    expected = formula(args, keys)
    assert torch.equal(reference.index_scores(**args), expected.float())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in SCORE_CASES if c.fp8])
def test_fp8_scores_within_quantization_error_of_plain(impl, case):
    """FP8 keys score like the plain keys they were quantized from, within what quantization
    moves a score: each key value by at most 2^-4 of itself (3 mantissa bits) plus 2^-10 of its
    tile's scale (subnormal codes); relu and the weighted sum do not magnify that."""
    fp8_args, fp8_keys = case.build()
    plain_case = dataclasses.replace(case, fp8=False)
    plain_args, plain_keys = plain_case.build()
    assert torch.equal(fp8_args["q"], plain_args["q"])
    cache = fp8_args["index_cache"]
    fmt = index_key_format("fp8", case.dim)
    scale = cache[..., fmt.scale_offset : fmt.scale_offset + 4 * fmt.num_tiles].contiguous().view(torch.float32)
    key_error = 2.0**-4 * plain_keys.abs() + 2.0**-10 * scale.nan_to_num().max()
    q, w = plain_args["q"].double().abs(), plain_args["weights"].double().abs()
    moved = torch.einsum("bshd,bnd,bsh->bsn", q, key_error, w)
    moved = torch.nn.functional.pad(moved, (0, fp8_args["max_seqlen"] - moved.shape[-1]))
    plain = impl.index_scores(**plain_args)
    fp8 = impl.index_scores(**fp8_args)
    assert_scores("fp8 vs plain", fp8, plain.double(), moved + error_bound(plain_args, plain_keys))
    assert not torch.equal(fp8, plain), "quantization left every score unchanged: the FP8 path was not taken"


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_keys_choose_as_plain_keys_where_scores_are_well_separated(impl):
    """The selection from FP8 keys equals the one from the plain keys they were quantized from
    when quantization cannot change it: every chosen plain score minus what quantization can
    move it (the bound of the test above) stays above every unchosen score plus its move.
    Eight keys point along the queries (large scores), the rest are random (small ones)."""
    g = torch.Generator().manual_seed(11)
    heads, dim, n, page, topk = 4, 32, 64, 16, 8
    q = torch.randn(2, 3, heads, dim, generator=g).abs()
    weights = torch.rand(2, 3, heads, generator=g) + 0.5
    keys = torch.randn(2, n, dim, generator=g) * 0.3
    boosted = torch.randperm(n, generator=g)[:topk]
    keys[:, boosted] = 2 + torch.rand(2, topk, dim, generator=g)
    table = torch.arange(2 * n // page, dtype=torch.int32).view(2, n // page)
    lengths = torch.tensor([n, n], dtype=torch.int32)
    chosen = {}
    for fmt_dtype in (torch.float32, "fp8"):
        fmt = index_key_format(fmt_dtype, dim)
        cache = fmt.pack(keys, keys.new_zeros(2, n, 0)).view(2 * n // page, page, 1, fmt.row_width)
        scores = impl.index_scores(q, weights, cache, table, lengths, n, is_fp8=fmt.is_fp8)
        chosen[fmt_dtype] = (impl.index_topk(scores, topk)[0], scores)
    plain_chosen, plain = chosen[torch.float32]
    # fmt and cache are the FP8 ones (the loop's last)
    scale = cache[..., fmt.scale_offset : fmt.scale_offset + 4 * fmt.num_tiles].contiguous().view(torch.float32)
    key_error = 2.0**-4 * keys.double().abs() + 2.0**-10 * scale.max()
    moved = torch.einsum("bshd,bnd,bsh->bsn", q.double(), key_error, weights.double())
    # the last query of each row sees every key (earlier ones see fewer, causal)
    picked = torch.zeros_like(plain, dtype=torch.bool).scatter(-1, plain_chosen.long().clamp(min=0), True)
    low = (plain.double() - moved).masked_fill(~picked, math.inf).amin(-1)
    high = (plain.double() + moved).masked_fill(picked | plain.isneginf(), -math.inf).amax(-1)
    separated = low > high
    assert separated[:, -1].all(), "the full-context queries are not well separated: the test would be vacuous"
    assert torch.equal(chosen["fp8"][0][separated], plain_chosen[separated])
    assert sorted(plain_chosen[0, -1].tolist()) == sorted(boosted.tolist())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in SCORE_CASES if c.fp4 and c.dtype == "fp32"])
def test_fp4_scores_are_the_scores_of_the_dequantized_keys(nan_empty, impl, case):
    """Scores over MXFP4 pages equal, bit for bit, the scores over float32 pages holding
    `Mxfp4KeyFormat.unpack(pack(keys))` (the dequantized values are exact in float32; the
    unused rows stay NaN in both)."""
    args, _ = case.build()
    fmt = Mxfp4KeyFormat(case.dim)
    plain = dict(args, index_cache=fmt.unpack(args["index_cache"]), is_fp4=False)
    assert plain["index_cache"].dtype == torch.float32 and plain["index_cache"].isnan().any()
    assert torch.equal(impl.index_scores(**args), impl.index_scores(**plain))


@pytest.mark.parametrize("dim,n", [pytest.param(32, 32, id="d32-bytes"), pytest.param(128, 16, id="d128-words")])
def test_fp4_kernel_decodes_every_code_and_scale_exactly(nan_empty, dim, n):
    """Every byte value as a pair of e2m1 codes, under power-of-two scales across the finite
    range (the subnormal 2^-127 of byte 0 too; below 2^73, so that no key overflows to inf and
    each one-hot dot is exact) and a NaN scale (0xFF): query r reads channel r, as
    relu(k) - relu(-k) over two heads, and equals `Mxfp4KeyFormat.unpack` (NaN where the key
    row holds a NaN). 17-byte rows (dim 32) are read by bytes, 68-byte ones (128) by words."""
    page = 8
    fmt = Mxfp4KeyFormat(dim)
    g = torch.Generator().manual_seed(15)
    rows = torch.zeros(n, fmt.row_width, dtype=torch.uint8)
    rows[:, : fmt.scale_offset] = torch.arange(n * fmt.scale_offset).view(n, -1) % 256  # every byte value
    rows[:, fmt.scale_offset :] = torch.randint(1, 200, (n, fmt.num_blocks), generator=g, dtype=torch.uint8)
    rows[3, fmt.scale_offset] = 0
    rows[5, fmt.scale_offset] = 255
    cache = rows.view(n // page, page, 1, fmt.row_width)
    eye = torch.eye(dim)
    q = torch.stack([eye, -eye], dim=1)[:, None]  # [b = dim, 1, 2, dim]: row r reads channel r
    weights = torch.tensor([1.0, -1.0]).expand(dim, 1, 2).contiguous()
    table = torch.arange(n // page, dtype=torch.int32).expand(dim, -1).contiguous()  # every row, same pages
    lengths = torch.full((dim,), n, dtype=torch.int32)
    scores = kernels.index_scores(q, weights, cache, table, lengths, n, is_fp4=True)[:, 0]  # [dim, n]
    keys = fmt.unpack(rows)  # [n, dim]
    expected = torch.where(keys.isnan().any(-1, keepdim=True), math.nan, keys).T
    torch.testing.assert_close(scores, expected, rtol=0, atol=0, equal_nan=True)
    assert scores[:, 5].isnan().all() and scores[:, :5].isfinite().all()
    assert keys[3, :32].abs().max() == 6 * 2.0**-127  # row 3's subnormal scale is among the values read
    # a NaN scale over positive codes reads NaN, not the inf of its exponent bits (16 heads: no
    # padded head, whose zero query times an inf key would make a NaN of its own)
    poisoned = torch.full((1, 1, 1, fmt.row_width), 0x22, dtype=torch.uint8)
    poisoned[..., fmt.scale_offset :] = 0xFF
    one = torch.ones(1, dtype=torch.int32)
    score = kernels.index_scores(torch.ones(1, 1, 16, dim), torch.ones(1, 1, 16), poisoned, one[None] - 1, one, 1,
                                 is_fp4=True)  # fmt: skip
    assert score.isnan().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's 0 * inf
def test_an_infinite_key_scores_inf_with_padded_heads():
    """3 heads (the kernel pads them to its tile): a key holding +inf scores +inf in both twins,
    not the NaN a padded head's zero query times inf would add."""
    keys = torch.zeros(1, 4, 1, 16)
    keys[0, 2, 0, 0] = math.inf
    q = torch.zeros(1, 1, 3, 16)
    q[..., 0] = torch.tensor([1.0, 2.0, 0.5])
    args = (q, torch.ones(1, 1, 3), keys, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([4], dtype=torch.int32), 4)
    for impl in (reference, kernels):
        scores = impl.index_scores(*args)[0, 0]
        assert scores[2] == math.inf and torch.equal(scores[[0, 1, 3]], torch.zeros(3)), (impl.__name__, scores)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_select_reads_mxfp4_keys_through_their_format(backend):
    """`mla.ops.select` with an `Mxfp4KeyFormat` (as `index_key_format("mxfp4", dim)` gives)
    scores MXFP4 pages and selects as the reference twin over the same pages."""
    case = IndexCase(3, 4, 32, 4, (23, 50), "bf16", fp4=True, seqlens_q=(1, 3), seed=16)
    args, _ = case.build()
    fmt = index_key_format("mxfp4", case.dim)
    assert isinstance(fmt, Mxfp4KeyFormat) and index_key_format("FP4", 64).row_width == 34
    assert index_key_format(torch.float4_e2m1fn_x2, 128).bytes_per_token == 68
    a = args
    chosen = ops.select(fmt, a["q"], a["weights"], a["index_cache"], a["block_table"], a["cache_seqlens"],
                        a["max_seqlen"], a["seqlens_q"], 8, case.page_size, backend)  # fmt: skip
    scores = reference.index_scores(**args)
    expected = reference.index_topk(scores, 8, a["block_table"], case.page_size)
    assert torch.equal(chosen[0], expected[0]) and torch.equal(chosen[1], expected[1])


def topk_rule(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection rule, stated plainly: candidates are the positions whose score is neither
    -inf nor NaN; rank them by score, the lower position first among equals; keep the first
    topk, list them by position, pad with -1."""
    b, s_q, n = scores.shape
    indices = torch.full((b, s_q, topk), -1, dtype=torch.int32)
    counts = torch.zeros(b, s_q, dtype=torch.int32)
    for r in range(b):
        for i in range(s_q):
            row = scores[r, i].tolist()
            candidates = [j for j in range(n) if not (math.isnan(row[j]) or row[j] == -math.inf)]
            chosen = sorted(sorted(candidates, key=lambda j: (-row[j], j))[:topk])
            indices[r, i, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            counts[r, i] = len(chosen)
    return indices, counts


def make_scores(kind: str, b: int, s_q: int, n: int, seed: int) -> torch.Tensor:
    """float32 [b, s_q, n] scores with a causal -inf tail per query.
    distinct: continuous values; ties: a few values (both zeros among them, and +inf), NaN
    sprinkled; sparse: at most a handful of candidates per row."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, s_q, n, generator=g) * 10
    if kind == "ties":
        scores = (scores / 5).round() / 2
        scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
        scores[torch.rand(b, s_q, n, generator=g) < 0.05] = math.nan
        scores[torch.rand(b, s_q, n, generator=g) < 0.02] = math.inf
    if kind == "sparse":
        scores[torch.rand(b, s_q, n, generator=g) < 0.97] = -math.inf
    lengths = torch.randint(0, n + 1, (b, s_q), generator=g)
    lengths[0, 0] = n  # one full row
    scores[torch.arange(n) >= lengths[..., None]] = -math.inf
    return scores


TOPK_CASES = [
    pytest.param("distinct", 2, 3, 200, 1, id="distinct-n200-topk1"),
    pytest.param("distinct", 2, 3, 200, 64, id="distinct-n200-topk64"),
    pytest.param("distinct", 2, 1, 37, 300, id="distinct-n37-topk300"),
    pytest.param("ties", 2, 3, 200, 16, id="ties-n200-topk16"),
    pytest.param("ties", 2, 3, 130, 100, id="ties-n130-topk100"),
    pytest.param("sparse", 2, 3, 200, 8, id="sparse-n200-topk8"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,b,s_q,n,topk", TOPK_CASES)
def test_topk_follows_the_rule(impl, kind, b, s_q, n, topk):
    """Exact selection, lower position first among ties, ascending positions, -1 padding."""
    scores = make_scores(kind, b, s_q, n, seed=topk + n)
    indices, counts = impl.index_topk(scores, topk)
    expected, expected_counts = topk_rule(scores, topk)
    assert indices.dtype == counts.dtype == torch.int32
    assert torch.equal(counts, expected_counts)
    assert torch.equal(indices, expected), f"{(indices != expected).sum()} entries differ"


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_of_distinct_scores_is_torch_topk(impl):
    """With distinct scores the selected set is torch.topk's over the masked scores."""
    scores = make_scores("distinct", 2, 3, 200, seed=11)
    topk = 24
    indices, counts = impl.index_topk(scores, topk)
    for r in range(2):
        for i in range(3):
            row = scores[r, i]
            k = min(topk, int(row.isfinite().sum()))
            expected = torch.topk(row, k).indices.sort().values
            assert counts[r, i] == k
            assert torch.equal(indices[r, i, :k].long(), expected) and (indices[r, i, k:] == -1).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_short_contexts_select_everything_visible(impl):
    """Fewer candidates than topk: every candidate in position order, then -1; none at all: -1s
    and count 0."""
    scores = torch.full((1, 3, 10), -math.inf)
    scores[0, 0, [2, 5, 7]] = torch.tensor([1.0, -3.0, 0.5])
    scores[0, 1, 4] = math.nan
    indices, counts = impl.index_topk(scores, 4)
    assert indices.tolist() == [[[2, 5, 7, -1], [-1] * 4, [-1] * 4]]
    assert counts.tolist() == [[3, 0, 0]]


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_slots_through_block_table(impl):
    """With a block table the positions become cache slots (page id * page_size + offset);
    positions the table does not reach (>= width * page_size) are not candidates."""
    scores = make_scores("ties", 2, 3, 40, seed=5)
    page_size = 4
    table = torch.randperm(20, generator=torch.Generator().manual_seed(0)).int().view(2, 10)[:, :9]  # reaches 36
    indices, counts = impl.index_topk(scores, 12, table, page_size)
    positions, expected_counts = topk_rule(scores[..., :36], 12)
    pages = table.gather(1, (positions.clamp(min=0) // page_size).flatten(1).long()).view_as(positions)
    expected = torch.where(positions >= 0, pages * page_size + positions % page_size, -1)
    assert torch.equal(counts, expected_counts)
    assert torch.equal(indices, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_scores_then_topk_is_a_sparse_decode_slot_list(impl):
    """The indexer's output feeds sparse decode: every listed slot holds one of the row's
    visible tokens, none twice, and -1 after the last."""
    case = IndexCase(3, 4, 32, 16, (50, 9), "bf16", seqlens_q=(3, 2), seed=8)
    args, _ = case.build()
    scores = impl.index_scores(**args)
    indices, counts = impl.index_topk(scores, 16, args["block_table"], case.page_size)
    table, p = args["block_table"], case.page_size
    for r, length in enumerate(case.lens):
        n = case.s_q if case.seqlens_q is None else case.seqlens_q[r]
        for i in range(case.s_q):
            seen = max(length - n + i + 1, 0) if i < n else 0
            visible = {table[r, j // p].item() * p + j % p for j in range(seen)}
            listed = indices[r, i, : counts[r, i]].tolist()
            assert counts[r, i] == min(16, seen) and len(set(listed)) == len(listed) and set(listed) <= visible
            assert (indices[r, i, counts[r, i] :] == -1).all()


def scores_args() -> dict:
    return IndexCase(2, 4, 32, 4, (5, 9), "fp32", seqlens_q=(2, 1)).build()[0]


def replace(**changes):
    return lambda a: a.update({k: v(a) if callable(v) else v for k, v in changes.items()})


BAD_SCORES = [
    pytest.param(replace(q=lambda a: a["q"].double().half()), TypeError, r"index_cache dtype torch.float32 must match q dtype torch.float16", id="cache-dtype"),
    pytest.param(replace(q=lambda a: a["q"].int()), TypeError, r"q must be bfloat16, float16 or float32 .* got torch.int32", id="q-dtype"),
    pytest.param(replace(q=lambda a: a["q"][0]), ValueError, r"q must be \[b, s_q, heads, dim\], got shape \(2, 4, 32\)", id="q-rank"),
    pytest.param(replace(q=lambda a: a["q"][..., :16]), ValueError, r"index_cache must be \[num_pages, page_size, 1, 16\] .* got shape \(\d+, 4, 1, 32\)", id="dim-mismatch"),
    pytest.param(replace(weights=lambda a: a["weights"].bfloat16()), TypeError, r"weights must be float32 \[b, s_q, heads\], got torch.bfloat16", id="weights-dtype"),
    pytest.param(replace(weights=lambda a: a["weights"][:, :, :3]), ValueError, r"weights must be \[b=2, s_q=2, heads=4\], got shape \(2, 2, 3\)", id="weights-shape"),
    pytest.param(replace(index_cache=lambda a: a["index_cache"].view(torch.uint8)), TypeError, r"index_cache is torch.uint8 but is_fp8=False", id="fp8-cache-unflagged"),
    pytest.param(replace(is_fp8=True), ValueError, r"index_cache must be \[num_pages, page_size, 1, 36\] \(FP8 rows", id="plain-cache-as-fp8"),
    pytest.param(replace(is_fp8=1), TypeError, r"is_fp8 must be a bool, got 1", id="fp8-flag-type"),
    pytest.param(replace(is_fp4=1), TypeError, r"is_fp4 must be a bool, got 1", id="fp4-flag-type"),
    pytest.param(replace(is_fp4=True, is_fp8=True), ValueError, r"is_fp8 and is_fp4 are exclusive", id="fp8-and-fp4"),
    pytest.param(replace(is_fp4=True), ValueError, r"index_cache must be \[num_pages, page_size, 1, 17\] \(MXFP4 rows of q's head dim 32\), got shape \(\d+, 4, 1, 32\)", id="plain-cache-as-fp4"),
    pytest.param(replace(is_fp4=True, index_cache=lambda a: a["index_cache"][..., :17].to(torch.int8)), TypeError, r"index_cache must be uint8 \(raw MXFP4 key bytes\), got torch.int8", id="fp4-cache-dtype"),
    pytest.param(replace(is_fp4=True, q=lambda a: a["q"][..., :16]), ValueError, r"q's head dim 16 is not a valid MXFP4 index key row: index_head_dim=16 must be a multiple of 32", id="fp4-dim"),
    pytest.param(replace(block_table=lambda a: a["block_table"].long()), TypeError, r"block_table must be an int32 tensor \[b, max_pages\], got torch.int64", id="table-dtype"),
    pytest.param(replace(cache_seqlens=lambda a: a["cache_seqlens"][:1]), ValueError, r"batch mismatch: q has 2, block_table 2, cache_seqlens 1", id="lengths-batch"),
    pytest.param(replace(max_seqlen=8), ValueError, r"max_seqlen = 8 is below cache_seqlens\[1\] = 9", id="max-seqlen-short"),
    pytest.param(replace(max_seqlen=9.0), ValueError, r"max_seqlen must be an int >= 0, got 9.0", id="max-seqlen-float"),
    pytest.param(replace(seqlens_q=torch.tensor([2, 3], dtype=torch.int32)), ValueError, r"seqlens_q\[1\] = 3 is outside \[0, s_q = 2\]", id="seqlens-q-value"),
    pytest.param(replace(cache_seqlens=torch.tensor([5, 90], dtype=torch.int32), max_seqlen=90), ValueError, r"block_table has \d+ columns but the longest sequence \(90 tokens", id="table-short"),
    pytest.param(lambda a: a["block_table"].__setitem__((0, 0), -3), ValueError, r"block_table\[0, 0\] = -3 is outside \[0, \d+\)", id="page-id"),
]


@pytest.mark.parametrize("mutate,error,message", BAD_SCORES)
def test_bad_scores_arguments_raise_the_same_error(mutate, error, message):
    errors = []
    for impl in TWINS.values():
        args = scores_args()
        mutate(args)
        with pytest.raises(error, match=message) as info:
            impl.index_scores(**args)
        errors.append(str(info.value))
    assert len(set(errors)) == 1, errors


BAD_TOPK = [
    pytest.param(dict(topk=0), ValueError, r"topk must be an int >= 1, got 0", id="topk-zero"),
    pytest.param(dict(topk=True), ValueError, r"topk must be an int >= 1, got True", id="topk-bool"),
    pytest.param(dict(scores=torch.zeros(2, 3, 8, dtype=torch.float64)), TypeError, r"scores must be a float32 tensor \[b, s_q, n\], got torch.float64", id="scores-dtype"),
    pytest.param(dict(scores=torch.zeros(6, 8)), TypeError, r"scores must be a float32 tensor \[b, s_q, n\], got torch.float32 tensor of shape \(6, 8\)", id="scores-rank"),
    pytest.param(dict(block_table=torch.zeros(2, 2, dtype=torch.int32)), ValueError, r"block_table and page_size come together", id="table-without-page"),
    pytest.param(dict(block_table=torch.zeros(3, 2, dtype=torch.int32), page_size=4), ValueError, r"block_table must be \[b=2, max_pages\], got shape \(3, 2\)", id="table-batch"),
    pytest.param(dict(block_table=torch.zeros(2, 2, dtype=torch.int32), page_size=0), ValueError, r"page_size must be an int >= 1, got 0", id="page-size"),
]


@pytest.mark.parametrize("changes,error,message", BAD_TOPK)
def test_bad_topk_arguments_raise_the_same_error(changes, error, message):
    errors = []
    for impl in TWINS.values():
        args = dict(scores=torch.zeros(2, 3, 8), topk=4) | changes
        with pytest.raises(error, match=message) as info:
            impl.index_topk(**args)
        errors.append(str(info.value))
    assert len(set(errors)) == 1, errors


@pytest.mark.parametrize("impl", IMPLS)
def test_signed_zeros_tie_and_infinities_rank(impl):
    """-0.0 equals 0.0 (the lower position wins between them); +inf ranks first; NaN is not a
    candidate. A sum of negatively weighted relu(0) terms is -0.0, so both zeros occur."""
    scores = torch.tensor([[[-0.0, 0.0, math.nan, -1.0, 1.0, -0.0, math.inf, -math.inf]]])
    assert impl.index_topk(scores, 3)[0].tolist() == [[[0, 4, 6]]]
    assert impl.index_topk(scores, 5)[0].tolist() == [[[0, 1, 4, 5, 6]]]
    assert impl.index_topk(scores, 8)[1].tolist() == [[6]]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in SCORE_CASES])
def test_kernel_scores_match_reference(nan_empty, case):
    """The twins agree to float32 rounding (both sides' bound), -inf at the same places."""
    args, keys = case.build()
    expected = reference.index_scores(**args)
    assert_scores("triton vs reference", kernels.index_scores(**args), expected.double(), 2 * error_bound(args, keys))


def test_topk_twins_agree_on_long_tied_rows():
    """Rows spanning many of the kernel's blocks, few distinct values: identical int tensors."""
    scores = make_scores("ties", 2, 3, 450, seed=3)
    table = torch.randperm(200, generator=torch.Generator().manual_seed(1)).int().view(2, 100)
    for args in ((scores, 64), (scores, 300, table, 8)):
        got, want = kernels.index_topk(*args), reference.index_topk(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs_give_the_same_results(impl):
    """Strides are read, not assumed: views of q, weights, the block table and the scores, and a
    float8_e4m3fn view of the FP8 cache, give what their contiguous copies give."""
    args, _ = IndexCase(3, 4, 32, 4, (23, 50), "bf16", fp8=True, seqlens_q=(1, 3), seed=9).build()
    heads = args["q"].shape[2]
    strided = dict(args)
    strided["q"] = args["q"].transpose(1, 2).contiguous().transpose(1, 2)  # stored as [b, heads, s_q, dim]
    strided["weights"] = torch.cat([args["weights"], args["weights"]], dim=-1)[..., :heads]
    table = args["block_table"]
    strided["block_table"] = torch.stack([table, table], dim=1)[:, 0]  # row stride 2 * width
    strided["index_cache"] = args["index_cache"].view(torch.float8_e4m3fn)
    assert not any(strided[k].is_contiguous() for k in ("q", "weights", "block_table"))
    assert torch.equal(impl.index_scores(**strided), impl.index_scores(**args))
    scores = make_scores("ties", 2, 3, 60, seed=2)
    wide = torch.stack([scores, scores], dim=1)[:, 0].transpose(1, 2).contiguous().transpose(1, 2)
    assert not wide.is_contiguous()
    got, want = impl.index_topk(wide, 10, strided["block_table"], 4), impl.index_topk(scores, 10, table, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_kernel_rejects_float64_queries():
    """float64 q is the reference's alone, with the message both twins use for q's dtype."""
    args, _ = IndexCase(1, 4, 32, 4, (5, 9), "fp32", fp8=True).build()
    args["q"] = args["q"].double()
    message = r"q must be bfloat16, float16 or float32 \(the reference also takes float64\), got torch.float64"
    with pytest.raises(TypeError, match=message):
        kernels.index_scores(**args)


@pytest.mark.parametrize("impl", IMPLS)
def test_unchecked_page_ids_and_lengths_are_skipped(monkeypatch, nan_empty, impl):
    """Where value checks do not run (CUDA without MLA_DEBUG), a page id outside the cache hides
    its positions (-inf, never read), lengths past the table's reach stop at it and lengths past
    max_seqlen at the scores' width, in both twins."""
    from mla.reference import contract

    monkeypatch.setattr(contract, "reads_values", lambda device: False)
    monkeypatch.setattr(reference.indexer, "reads_values", lambda device: False)
    case = IndexCase(1, 4, 32, 4, (13, 9), "fp32", seed=10)
    args, _ = case.build()
    wild = dict(args, block_table=args["block_table"].clone())
    wild["block_table"][0, 1] = 10**6  # positions 4..7 of row 0
    wild["cache_seqlens"] = torch.tensor([13, 100], dtype=torch.int32)  # row 1's table reaches 16 positions
    wild["max_seqlen"] = 12
    scores = impl.index_scores(**wild)
    expected = impl.index_scores(**dict(args, max_seqlen=16))
    expected[0, 0, 4:8] = -math.inf
    assert torch.equal(scores[0], expected[0, :, :12])
    # row 1 now reads its third page to the end: the NaN rows past 9 reach their scores (relu
    # keeps NaN), and nothing past the table's valid pages is read
    assert scores[1, :, :9].isfinite().all() and scores[1, :, 9:].isnan().all()
