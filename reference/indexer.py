"""Plain PyTorch reference for DeepSeek-V3.2's lightning indexer (`mla.kernels.indexer`): the
scores of every cached position for every query token, and the exact top-k of those scores.

    score[r, i, j] = sum_h weights[r, i, h] * relu(q[r, i, h] . k[r, j])

over the index keys k (one [D] row per cached token, in the paged index cache, plain, FP8 or
MXFP4),
for the positions j query token i of row r may see (causal: the step's n_r queries are the last
n_r tokens of the row's L_r); -inf elsewhere. `index_topk` turns a row of scores into the slot
list sparse decode reads (`flash_mla_with_kvcache(..., indices=...)`).

Both twins call the argument checks defined here (`check_index_scores_args`,
`check_topk_args`), so they raise the same error for the same bad input; which checks read
values, and when, is `mla.reference.contract`'s rule (`reads_values`). The kernels' docstrings
are the full contract. Written for clarity: the scores gather the block table's whole width of
keys; the top-k is a stable sort.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from mla.formats import PLAIN_DTYPES, CacheFormat, Mxfp4KeyFormat, index_key_format

from .cache import gather_pages
from .contract import (
    Q_DTYPES,
    REFERENCE_Q_DTYPES,
    _check_pages,
    _check_table_values,
    _first,
    _int32,
    _same_device,
    _tensor,
    describe,
    reads_values,
)
from .decode import dense_visibility


@dataclasses.dataclass(frozen=True)
class IndexScoresCall:
    """Facts of a validated `index_scores` call: the key row format, q's [b, s_q, heads, dim],
    the cache's page_size and num_pages, and the scores' width max_seqlen."""

    fmt: CacheFormat | Mxfp4KeyFormat
    b: int
    s_q: int
    heads: int
    dim: int
    page_size: int
    num_pages: int
    max_seqlen: int


@dataclasses.dataclass(frozen=True)
class TopkCall:
    """Facts of a validated `index_topk` call. reach: the positions that are candidates, the
    first min(n, width * page_size) of a row with a block table, all n without; page_size is
    None without a block table."""

    b: int
    s_q: int
    n: int
    topk: int
    page_size: int | None
    reach: int


def _python_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_index_scores_args(
    q, weights, index_cache, block_table, cache_seqlens, max_seqlen, seqlens_q, is_fp8, is_fp4=False,
    q_dtypes=Q_DTYPES,
) -> IndexScoresCall:
    """Validate an `index_scores` call (arguments as documented there). TypeError for a wrong
    type or dtype, ValueError for a wrong rank, shape, device or value; the message names the
    argument and the bad value. Values (lengths, page ids, seqlens_q) are read on CPU tensors
    only (`mla.reference.contract.reads_values`). q_dtypes: the dtypes q may have (the
    reference adds float64). The key row format both twins read is chosen here (call.fmt)."""
    _tensor("q", q)
    _tensor("weights", weights)
    _tensor("index_cache", index_cache)
    if q.dim() != 4:
        raise ValueError(f"q must be [b, s_q, heads, dim], got shape {tuple(q.shape)}")
    if q.dtype not in q_dtypes:
        raise TypeError(f"q must be bfloat16, float16 or float32 (the reference also takes float64), got {q.dtype}")
    b, s_q, heads, dim = q.shape
    if s_q < 1 or heads < 1 or dim < 1:
        raise ValueError(f"q needs s_q, heads and dim >= 1, got shape {tuple(q.shape)}")
    if weights.dtype != torch.float32:
        raise TypeError(f"weights must be float32 [b, s_q, heads], got {describe(weights)}")
    if tuple(weights.shape) != (b, s_q, heads):
        raise ValueError(f"weights must be [b={b}, s_q={s_q}, heads={heads}], got shape {tuple(weights.shape)}")
    if not isinstance(is_fp8, bool):
        raise TypeError(f"is_fp8 must be a bool, got {is_fp8!r}")
    if not isinstance(is_fp4, bool):
        raise TypeError(f"is_fp4 must be a bool, got {is_fp4!r}")
    if is_fp8 and is_fp4:
        raise ValueError("is_fp8 and is_fp4 are exclusive: an index cache holds FP8 or MXFP4 rows, not both")
    if is_fp8 or is_fp4:
        kind = "FP8" if is_fp8 else "MXFP4"
        try:
            fmt = index_key_format(kind.lower(), dim)
        except ValueError as e:
            raise ValueError(f"q's head dim {dim} is not a valid {kind} index key row: {e}") from None
    else:
        if index_cache.dtype in (torch.uint8, torch.float8_e4m3fn):
            raise TypeError(f"index_cache is {index_cache.dtype} but is_fp8=False: FP8 index caches need is_fp8=True")
        if index_cache.dtype not in PLAIN_DTYPES or index_cache.dtype != q.dtype:
            raise TypeError(
                f"index_cache dtype {index_cache.dtype} must match q dtype {q.dtype} "
                "(FP8 index caches need is_fp8=True)"
            )
        fmt = index_key_format(index_cache.dtype, dim)
    kind = "FP8 " if is_fp8 else "MXFP4 " if is_fp4 else ""
    if index_cache.dim() != 4 or index_cache.shape[2] != 1 or index_cache.shape[3] != fmt.row_width:
        raise ValueError(
            f"index_cache must be [num_pages, page_size, 1, {fmt.row_width}] ({kind}rows of q's head dim {dim}), "
            f"got shape {tuple(index_cache.shape)}"
        )
    _check_pages(fmt, index_cache, "index_cache", 1)
    num_pages, page_size = index_cache.shape[:2]
    _int32("block_table", block_table, "[b, max_pages]", 2)
    _int32("cache_seqlens", cache_seqlens, "[b]", 1)
    if block_table.shape[0] != b or cache_seqlens.shape[0] != b:
        raise ValueError(
            f"batch mismatch: q has {b}, block_table {block_table.shape[0]}, cache_seqlens {cache_seqlens.shape[0]}"
        )
    max_seqlen = _python_int("max_seqlen", max_seqlen, 0)
    if seqlens_q is not None:
        _int32("seqlens_q", seqlens_q, "[b]", 1)
        if seqlens_q.shape[0] != b:
            raise ValueError(f"seqlens_q must be [b={b}], got shape {tuple(seqlens_q.shape)}")
    _same_device(
        q, weights=weights, index_cache=index_cache, block_table=block_table, cache_seqlens=cache_seqlens,
        seqlens_q=seqlens_q,
    )  # fmt: skip
    if reads_values(q.device):
        _check_table_values(block_table, cache_seqlens, num_pages, page_size)
        lengths = cache_seqlens.cpu()
        if lengths.numel() and lengths.max().item() > max_seqlen:
            i = _first(lengths > max_seqlen)[0]
            raise ValueError(f"max_seqlen = {max_seqlen} is below cache_seqlens[{i}] = {lengths[i].item()}")
        if seqlens_q is not None:
            n_q = seqlens_q.cpu()
            bad = (n_q < 0) | (n_q > s_q)
            if bad.any():
                i = _first(bad)[0]
                raise ValueError(f"seqlens_q[{i}] = {n_q[i].item()} is outside [0, s_q = {s_q}]")
    return IndexScoresCall(fmt, b, s_q, heads, dim, page_size, num_pages, max_seqlen)


def check_topk_args(scores, topk, block_table, page_size) -> TopkCall:
    """Validate an `index_topk` call (arguments as documented there); errors as
    `check_index_scores_args`'. Only metadata is read: any score value is valid input."""
    _tensor("scores", scores)
    if scores.dtype != torch.float32 or scores.dim() != 3:
        raise TypeError(f"scores must be a float32 tensor [b, s_q, n], got {describe(scores)}")
    topk = _python_int("topk", topk, 1)
    b, s_q, n = scores.shape
    if (block_table is None) != (page_size is None):
        raise ValueError(
            f"block_table and page_size come together: pass both or neither, got block_table "
            f"{describe(block_table)} and page_size {page_size!r}"
        )
    if block_table is None:
        return TopkCall(b, s_q, n, topk, None, n)
    _int32("block_table", block_table, "[b, max_pages]", 2)
    if block_table.shape[0] != b:
        raise ValueError(f"block_table must be [b={b}, max_pages], got shape {tuple(block_table.shape)}")
    page_size = _python_int("page_size", page_size, 1)
    _same_device(scores, block_table=block_table)
    return TopkCall(b, s_q, n, topk, page_size, min(n, block_table.shape[1] * page_size))


def index_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    max_seqlen: int,
    seqlens_q: torch.Tensor | None = None,
    is_fp8: bool = False,
    is_fp4: bool = False,
) -> torch.Tensor:
    """Lightning-indexer scores; arguments, returns and semantics as `mla.kernels.index_scores`
    (its docstring is the full contract), plus: q may be float64 (over an FP8 or MXFP4 cache,
    dequantized exactly; a float64 plain cache is not a key format), then the math runs in
    float64 and the scores are rounded to float32 once. Otherwise in float32.

    Memory: gathers the block table's whole width of keys, [b, max_pages * page_size, dim], and
    [b, s_q, heads, max_pages * page_size] logits: for tests and small models.
    """
    call = check_index_scores_args(
        q, weights, index_cache, block_table, cache_seqlens, max_seqlen, seqlens_q, is_fp8, is_fp4,
        q_dtypes=REFERENCE_Q_DTYPES,
    )  # fmt: skip
    fmt = call.fmt
    compute = torch.promote_types(q.dtype, torch.float32)
    table, _, visible = dense_visibility(
        block_table, cache_seqlens, seqlens_q, call.s_q, call.num_pages, call.page_size, causal=True
    )  # visible [b, s_q, n = width * page_size]
    n = visible.shape[-1]
    rows = gather_pages(index_cache.view(fmt.storage_dtype), table, n)[:, :, 0]  # [b, n, row_width]
    # [b, n, dim]; rows not visible may hold NaN, masked below. MXFP4 rows unpack to the keys alone,
    # the others to (keys, an empty k_pe)
    keys = (fmt.unpack(rows) if is_fp4 else fmt.unpack(rows)[0]).to(compute)
    logits = torch.einsum("bshd,bnd->bshn", q.to(compute), keys)
    scores = (logits.relu() * weights.to(compute)[..., None]).sum(dim=2)  # [b, s_q, n]
    scores = scores.masked_fill(~visible, -math.inf).float()
    if n >= call.max_seqlen:
        return scores[..., : call.max_seqlen].contiguous()
    return torch.nn.functional.pad(scores, (0, call.max_seqlen - n), value=-math.inf)


def index_topk(
    scores: torch.Tensor,
    topk: int,
    block_table: torch.Tensor | None = None,
    page_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k of each row of scores as a sparse decode slot list; arguments, returns,
    the tie rule (lower position first) and NaN rule (not a candidate) as
    `mla.kernels.index_topk`. Here: a stable descending sort of the candidates' scores (equal
    scores, -0.0 and 0.0 included, keep position order), its first topk, re-sorted by position.
    """
    call = check_topk_args(scores, topk, block_table, page_size)
    scores = scores[..., : call.reach]
    candidate = ~(scores.isnan() | scores.isneginf())
    counts = candidate.sum(dim=-1).clamp(max=call.topk)  # [b, s_q]
    # a stable sort keeps the lower position first among equal keys (-0.0 == 0.0 for it too)
    order = torch.sort(scores.masked_fill(~candidate, -math.inf), dim=-1, descending=True, stable=True).indices
    order = order[..., : call.topk]
    if order.shape[-1] < call.topk:
        order = torch.nn.functional.pad(order, (0, call.topk - order.shape[-1]), value=0)
    kept = torch.arange(call.topk, device=scores.device) < counts[..., None]  # [b, s_q, topk]
    # unselected entries sort past every position, then become -1
    positions = torch.sort(torch.where(kept, order, call.reach), dim=-1).values
    if block_table is not None:
        # one more column: unselected entries (position reach) look up a page that is never used
        table = torch.nn.functional.pad(block_table.long(), (0, 1))
        page = torch.gather(table, 1, (positions // call.page_size).flatten(1)).view_as(positions)
        positions = page * call.page_size + positions % call.page_size
    indices = torch.where(kept, positions, -1).to(torch.int32)
    return indices, counts.to(torch.int32)
