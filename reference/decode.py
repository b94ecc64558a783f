"""Plain PyTorch reference for the MLA decode kernels (`mla.kernels.decode`).

Same signatures and semantics as `mla.kernels.flash_mla_with_kvcache` and
`mla.kernels.flash_mla_sparse_fwd`, written for clarity, not speed: gather every key a query
may see into one padded tensor (static shapes: the block table's width, topk), mask, softmax
in `compute_dtype`, cast back. No per-row Python loop and no host synchronisation, so it
runs on any device and torch.compile traces it without graph breaks. The arguments are
checked by `mla.reference.contract`, as the kernels' are.

Keys are dequantized by their format's own reader, then attended as plain rows: V3's FP8
rows by `Fp8Format.values`, DeepSeek-V4's MODEL1 pages by `Model1Format.kvcache_read` (the
tokens are gathered by slot through the page layout, since its pages are not arrays of rows).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from mla.formats import Model1Format

from .cache import gather_pages
from .contract import (
    REFERENCE_Q_DTYPES,
    DecodeCall,
    FlashMLASchedMeta,
    check_decode,
    check_schedule,
    check_sparse_prefill,
)


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLASchedMeta, None]:
    """`(FlashMLASchedMeta(), None)` for any arguments: the reference plans no schedule, and
    accepts this object (or the kernel's old-form tensors, or None) in either call form."""
    return FlashMLASchedMeta(num_sm=kwargs.get("num_sm")), None


def _queries_only(visible: torch.Tensor, seqlens_q: torch.Tensor | None) -> torch.Tensor:
    """visible bool [b, s_q, n] with the padding queries of a ragged call (columns >= seqlens_q)
    seeing nothing."""
    if seqlens_q is None:
        return visible
    return visible & (torch.arange(visible.shape[1], device=visible.device)[:, None] < seqlens_q[:, None, None])


def dense_visibility(
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    seqlens_q: torch.Tensor | None,
    s_q: int,
    num_blocks: int,
    page_size: int,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a dense call reads, from its tables alone (so one step's layers can share it).

    Returns (table [b, width]: the block table with entries past a sequence's pages, or naming
    no page, replaced by page 0 -- they may hold anything; read bool [b, n = width * page_size]:
    the gathered row is one of the sequence's cached rows; visible bool [b, s_q, n]: the query
    sees it -- all of the sequence, or causally its first L - n_q + i + 1 rows; padding queries
    past seqlens_q see nothing)."""
    b, width = block_table.shape
    device = block_table.device
    lengths = cache_seqlens.long()
    position = torch.arange(width * page_size, device=device)
    table_ok = (torch.arange(width, device=device) * page_size < lengths[:, None]) & (block_table >= 0)
    table_ok &= block_table < num_blocks
    read = (position < lengths[:, None]) & table_ok[:, position // page_size]  # [b, n]
    if causal:
        n_q = seqlens_q.long() if seqlens_q is not None else s_q
        last = (lengths - n_q)[:, None] + torch.arange(s_q, device=device)  # [b, s_q]
        visible = read[:, None, :] & (position <= last[..., None])
    else:
        visible = read[:, None, :].expand(b, s_q, -1)
    return torch.where(table_ok, block_table, 0), read, _queries_only(visible, seqlens_q)


def _row_values(fmt, rows, read, dtype, compute_dtype):
    """Gathered rows [..., h_kv, row] (a fresh copy) -> keys [..., h_kv, d] in compute_dtype, read
    through the format (dequantized to q's dtype, as the kernel does); their first dv channels
    are also V. Rows not read are zeroed first: they may hold NaN, and 0 * NaN in the output
    product would leak it."""
    rows.masked_fill_(~read[..., None, None], 0)
    return fmt.values(rows, dtype).to(compute_dtype)


def _model1_keys(fmt: Model1Format, k_cache, slots, read, dtype, compute_dtype):
    """Keys [..., 1, 512] in compute_dtype of a MODEL1 k_cache at flat slots [...] (page *
    page_size + row), located by the page layout (`Model1Format.kvcache_read`), not by the
    view's row stride; entries not read gather slot 0 and are zeroed after dequantizing (a NaN
    scale would otherwise leak through 0 * NaN)."""
    keys = fmt.kvcache_read(k_cache, torch.where(read, slots, 0), dtype)
    return keys.masked_fill_(~read[..., None], 0)[..., None, :].to(compute_dtype)


def _slot_rows(pages, slots, lengths):
    """Rows at flat slots [b, s_q, topk] of pages [num_blocks, page, h_kv, row], the first
    lengths[i] entries of row i's lists (all of them when lengths is None).

    Returns (rows [b, s_q, topk, h_kv, row], read [b, s_q, topk]: the entry is within its
    row's length and names a slot of the cache; other entries gather slot 0)."""
    read = _slot_read(pages.shape[0] * pages.shape[1], slots, lengths)
    return pages.flatten(0, 1)[torch.where(read, slots, 0).long()], read


def _slot_read(num_slots: int, slots, lengths):
    """bool [b, s_q, topk]: the entry is within its row's length and names a slot of the cache."""
    read = (slots >= 0) & (slots < num_slots)
    if lengths is not None:
        read &= torch.arange(slots.shape[-1], device=slots.device) < lengths[:, None, None]
    return read


def _grouped_matmul(x: torch.Tensor, y: torch.Tensor, per_query: bool) -> torch.Tensor:
    """x [..., h, g, s, m] @ y, where y is [..., h, m, k] shared by the s queries or [..., h, s,
    m, k] one per query: [..., h, g, s, k]. The group joins the matmul's rows; broadcasting y
    over it instead would copy y g times (128 copies of the keys for a DeepSeek-V3 head)."""
    if per_query:
        return (x.transpose(-3, -2) @ y).transpose(-3, -2)
    return (x.flatten(-3, -2) @ y).unflatten(-2, x.shape[-3:-1])


def _attend(q, dv, parts, visible_parts, scale, sink):
    """Softmax attention of grouped queries over several key sets in one softmax.

    q: [..., h_kv, group, s, d]; parts: keys [..., n, h_kv, d] (shared by the s queries) or
    [..., s, n, h_kv, d] (one set per query), whose first dv channels are also V;
    visible_parts: bool [..., s, n] per part; sink: None or float32 broadcastable to [..., h_kv,
    group, s]. Returns out [..., h_kv, group, s, dv] (0 where nothing is visible), lse [...,
    h_kv, group, s] (+inf there) and the largest scaled score (-inf there).
    """
    scores, values = [], []
    for keys, visible in zip(parts, visible_parts):
        per_query = keys.dim() == q.dim()
        if per_query:  # keys [..., s, n, h, d]
            lead = list(range(keys.dim() - 4))
            k = keys.permute(*lead, -2, -4, -1, -3)  # [..., h, s, d, n]
            values.append((keys[..., :dv].permute(*lead, -2, -4, -3, -1), True))  # [..., h, s, n, dv]
        else:  # keys [..., n, h, d]
            k = keys.movedim(-3, -1)  # [..., h, d, n]
            values.append((keys[..., :dv].movedim(-3, -2), False))  # [..., h, n, dv]
        s = _grouped_matmul(q, k, per_query)
        scores.append((s * scale).masked_fill(~visible[..., None, None, :, :], -math.inf))
    scores = torch.cat(scores, dim=-1) if len(scores) > 1 else scores[0]
    visible = torch.cat(visible_parts, dim=-1)[..., None, None, :, :]
    seen = visible.any(dim=-1)  # [..., 1, 1, s]
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(visible, torch.exp(scores - lse[..., None]), 0)
    out, start = 0, 0
    for v, per_query in values:
        n = v.shape[-2]
        out = out + _grouped_matmul(probs[..., start : start + n], v, per_query)
        start += n
    if sink is not None:
        out = out * (1 / (1 + torch.exp(sink.to(lse.dtype) - lse)))[..., None]
    out = torch.where(seen[..., None], out, 0)
    return out, torch.where(seen, lse, math.inf), scores.amax(dim=-1)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata=None,
    num_splits=None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    *,
    seqlens_q: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over a paged latent cache; arguments, returns and semantics as
    `mla.kernels.flash_mla_with_kvcache` (its docstring is the full contract), plus:

    Args:
        q: as the kernel's, or float64 (then over an FP8 cache: a float64 plain cache is not a
            cache format); every other argument is checked exactly as the kernel checks it.
        tile_scheduler_metadata, num_splits: validated as the kernel does (a FlashMLASchedMeta
            records and checks the call's configuration), otherwise unused.
        compute_dtype: dtype the math runs in (not in the kernel's signature). Tests run it in
            q's own dtype to measure PyTorch's low-precision error, or in float64.

    Memory: a dense call gathers [b, max_blocks * page_block_size, h_kv, d] keys in
    compute_dtype (the whole block table's width: static shapes, no sync); a sparse call
    [b, s_q, topk, h_kv, d]. Fine for tests and small models, not for long contexts.
    """
    call = check_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache,
        indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length, seqlens_q,
        REFERENCE_Q_DTYPES,
    )  # fmt: skip
    check_schedule(call, q.device, tile_scheduler_metadata, num_splits)
    return run_decode(
        call, q, k_cache, block_table, cache_seqlens, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache,
        topk_length, extra_topk_length, seqlens_q, compute_dtype,
    )  # fmt: skip


def run_decode(
    call: DecodeCall,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    seqlens_q: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    visibility: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`flash_mla_with_kvcache` after its checks: `call` describes arguments already validated
    (by `check_decode`, or by a caller that built them, like `mla.plan.StepPlan`). visibility:
    `dense_visibility` of this call's tables when the caller already has it (a dense call)."""
    fmt, dtype = call.fmt, q.dtype
    b, s_q = call.b, call.s_q
    qg = q.to(compute_dtype).view(b, s_q, call.h_kv, -1, q.shape[-1]).permute(0, 2, 3, 1, 4)  # [b, h_kv, group, s_q, d]

    # MODEL1 pages are not arrays of rows: its keys are read by slot through the page layout
    model1 = isinstance(fmt, Model1Format)
    parts, visible = [], []
    if not call.sparse:
        table, read, seen = visibility or dense_visibility(
            block_table, cache_seqlens, seqlens_q, s_q, k_cache.shape[0], call.page_size, call.causal
        )
        if model1:
            position = torch.arange(read.shape[1], device=table.device)
            slots = table[:, position // call.page_size] * call.page_size + position % call.page_size  # [b, n]
            parts.append(_model1_keys(fmt, k_cache, slots, read, dtype, compute_dtype))
        else:
            rows = gather_pages(k_cache.view(fmt.storage_dtype), table, read.shape[1])
            parts.append(_row_values(fmt, rows, read, dtype, compute_dtype))  # [b, n, h_kv, *]
        visible.append(seen)
    listed = []  # key sets given as slot lists: (pages, slots, lengths)
    if call.sparse:
        listed.append((k_cache, indices, topk_length))
    if call.has_extra:
        listed.append((extra_k_cache, extra_indices_in_kvcache, extra_topk_length))
    for pages, slots, lengths in listed:
        if model1:
            read = _slot_read(pages.shape[0] * pages.shape[1], slots, lengths)
            parts.append(_model1_keys(fmt, pages, slots, read, dtype, compute_dtype))  # [b, s_q, topk, 1, 512]
        else:
            rows, read = _slot_rows(pages.view(fmt.storage_dtype), slots, lengths)
            parts.append(_row_values(fmt, rows, read, dtype, compute_dtype))  # [b, s_q, topk, h_kv, *]
        visible.append(_queries_only(read, seqlens_q))

    sink = None if attn_sink is None else attn_sink.view(call.h_kv, -1, 1)
    out, lse, _ = _attend(qg, call.dv, parts, visible, call.scale, sink)  # [b, h_kv, group, s_q, *]
    return out.permute(0, 3, 1, 2, 4).reshape(b, s_q, call.h_q, call.dv).to(dtype), lse.reshape(b, call.h_q, s_q).float()


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse attention over one flat KV array; arguments, returns and semantics as
    `mla.kernels.flash_mla_sparse_fwd`, plus `compute_dtype` (the dtype the math runs in).
    Memory: gathers [s_q, h_kv, topk, d] keys in compute_dtype."""
    call = check_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    s_q, h_kv, topk = call.s_q, call.h_kv, call.topk
    limit = topk_length.long() if topk_length is not None else torch.full((s_q,), topk, device=q.device)
    position = torch.arange(topk, device=q.device)
    read = (indices >= 0) & (indices < call.s_kv) & (position < limit[:, None, None])  # [s_q, h_kv, topk]
    heads = torch.arange(h_kv, device=q.device)[None, :, None]
    keys = kv[torch.where(read, indices, 0).long(), heads]  # [s_q, h_kv, topk, d], a fresh copy
    keys = keys.masked_fill_(~read[..., None], 0).to(compute_dtype)  # unread rows may hold NaN
    # each (token, kv head) is one query over its own key list: batch dims (t, g), one latent
    # head and one query inside
    qg = rearrange(q.to(compute_dtype), "t (g r) d -> t g 1 r 1 d", g=h_kv)
    keys = rearrange(keys, "t g n d -> t g 1 n 1 d")
    sink = None if attn_sink is None else attn_sink.view(h_kv, 1, -1, 1)
    parts = [keys]
    out, lse, max_logits = _attend(qg, d_v, parts, [read[:, :, None, :]], call.scale, sink)
    rows = "t g 1 r 1 -> t (g r)"
    return (
        rearrange(out, "t g 1 r 1 d -> t (g r) d").to(q.dtype),
        rearrange(max_logits, rows).float(),
        rearrange(lse, rows).float(),
    )
