"""The Triton kernels as PyTorch custom ops (`torch.ops.mla.*`), and the one dispatch between
them and their PyTorch references.

Registered as custom ops so that `torch.compile` traces a decode step through them without a
graph break and CUDA graphs capture them like any other op. Registering loads no Triton: the
kernels are imported when an op first runs. The ops take arguments that a `StepPlan` (or the
public functions' checks) has already validated.
"""

from __future__ import annotations

import torch

from mla.formats import CacheFormat, Fp8Format, Mxfp4KeyFormat, PlainFormat
from mla.reference import cache as reference_cache
from mla.reference import indexer as reference_indexer
from mla.reference.contract import DecodeCall
from mla.reference.decode import flash_mla_with_kvcache as reference_decode
from mla.reference.decode import run_decode


@torch.library.custom_op("mla::write_latent", mutates_args=("pages",))
def write_latent(pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
    """`mla.kernels.write_latent` without its checks: pages[s // P, s % P, 0] = [latent | k_pe]."""
    from mla.kernels import cache

    cache.launch(PlainFormat(latent.shape[1], k_pe.shape[1], pages.dtype), pages, slots, latent, k_pe)


@write_latent.register_fake
def _(pages, slots, latent, k_pe) -> None:
    return None


@torch.library.custom_op("mla::write_latent_fp8", mutates_args=("pages",))
def write_latent_fp8(pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
    """`mla.kernels.write_latent_fp8` without its checks; pages is the uint8 view."""
    from mla.kernels import quant

    quant.launch(Fp8Format(latent.shape[1], k_pe.shape[1]), pages, slots, latent, k_pe)


@write_latent_fp8.register_fake
def _(pages, slots, latent, k_pe) -> None:
    return None


@torch.library.custom_op("mla::decode", mutates_args=())
def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
    is_fp8_kvcache: bool,
    seqlens_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mla.kernels.flash_mla_with_kvcache` with a schedule (and ragged query lengths when
    seqlens_q is given): (out [b, s_q, h_q, dv] in q's dtype, lse float32 [b, h_q, s_q])."""
    from mla.kernels import flash_mla_with_kvcache

    return flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale=softmax_scale, causal=causal, is_fp8_kvcache=is_fp8_kvcache, seqlens_q=seqlens_q,
    )  # fmt: skip


@decode.register_fake
def _(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, head_dim_v, softmax_scale,
      causal, is_fp8_kvcache, seqlens_q=None):  # fmt: skip
    b, s_q, h_q, _ = q.shape
    return q.new_empty(b, s_q, h_q, head_dim_v), q.new_empty(b, h_q, s_q, dtype=torch.float32)


@torch.library.custom_op("mla::sparse_decode", mutates_args=())
def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    is_fp8_kvcache: bool,
    seqlens_q: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mla.kernels.flash_mla_with_kvcache` over the slots `indices` (int32 [b, s_q, topk], -1
    skipped), and the slots `extra_indices` of `extra_k_cache` in the same softmax, with a
    per-head sink, scheduled per call: (out [b, s_q, h_q, dv] in q's dtype, lse float32 [b, h_q, s_q])."""
    from mla.kernels import flash_mla_with_kvcache

    return flash_mla_with_kvcache(
        q, k_cache, None, None, head_dim_v, softmax_scale=softmax_scale, is_fp8_kvcache=is_fp8_kvcache,
        indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices,
        seqlens_q=seqlens_q,
    )  # fmt: skip


@sparse_decode.register_fake
def _(q, k_cache, indices, head_dim_v, softmax_scale, is_fp8_kvcache, seqlens_q=None, attn_sink=None,
      extra_k_cache=None, extra_indices=None):  # fmt: skip
    b, s_q, h_q, _ = q.shape
    return q.new_empty(b, s_q, h_q, head_dim_v), q.new_empty(b, h_q, s_q, dtype=torch.float32)


@torch.library.custom_op("mla::index_scores", mutates_args=())
def index_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    max_seqlen: int,
    seqlens_q: torch.Tensor | None,
    is_fp8: bool,
    is_fp4: bool = False,
) -> torch.Tensor:
    """`mla.kernels.index_scores`: float32 [b, s_q, max_seqlen] indexer scores, -inf where unseen."""
    from mla.kernels import indexer

    return indexer.index_scores(q, weights, index_cache, block_table, cache_seqlens, max_seqlen, seqlens_q, is_fp8,
                                is_fp4)  # fmt: skip


@index_scores.register_fake
def _(q, weights, index_cache, block_table, cache_seqlens, max_seqlen, seqlens_q, is_fp8, is_fp4=False):
    return q.new_empty(q.shape[0], q.shape[1], max_seqlen, dtype=torch.float32)


@torch.library.custom_op("mla::index_topk", mutates_args=())
def index_topk(
    scores: torch.Tensor, topk: int, block_table: torch.Tensor | None, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mla.kernels.index_topk` (page_size 0 without a block table): (int32 [b, s_q, topk]
    positions or slots, -1 after the last; int32 [b, s_q] counts)."""
    from mla.kernels import indexer

    return indexer.index_topk(scores, topk, block_table, page_size or None)


@index_topk.register_fake
def _(scores, topk, block_table, page_size):
    b, s_q, _ = scores.shape
    return scores.new_empty(b, s_q, topk, dtype=torch.int32), scores.new_empty(b, s_q, dtype=torch.int32)


def select(fmt: CacheFormat | Mxfp4KeyFormat, q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor,
           block_table: torch.Tensor, cache_seqlens: torch.Tensor, max_seqlen: int, seqlens_q: torch.Tensor | None,
           topk: int, page_size: int | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """DeepSeek-V3.2's selection through `backend`: the indexer scores of q [b, s, H, D] with
    weights float32 [b, s, H] over a paged key cache of format `fmt` (`index_key_format`), then
    their exact top-k (`mla.reference.indexer`); slots through block_table when page_size is
    given, else positions. Arguments already checked, as for `attend`. Plain keys are scored in
    their own dtype; FP8 and MXFP4 keys (an `Mxfp4KeyFormat` fmt, index_cache its rows as uint8
    [num_pages, page_size, 1, bytes_per_token]) dequantize to q's (a float64 q as float32)."""
    quantized = fmt.is_fp8 or fmt.is_fp4
    q = q.to(fmt.dtype if not quantized else torch.float32 if q.dtype == torch.float64 else q.dtype)
    if backend == "triton":
        scores = torch.ops.mla.index_scores(q, weights, index_cache, block_table, cache_seqlens, max_seqlen, seqlens_q,
                                            fmt.is_fp8, fmt.is_fp4)  # fmt: skip
        return torch.ops.mla.index_topk(scores, topk, block_table if page_size else None, page_size or 0)
    scores = reference_indexer.index_scores(q, weights, index_cache, block_table, cache_seqlens, max_seqlen, seqlens_q,
                                            fmt.is_fp8, fmt.is_fp4)  # fmt: skip
    if page_size:
        return reference_indexer.index_topk(scores, topk, block_table, page_size)
    return reference_indexer.index_topk(scores, topk)


def _query(q: torch.Tensor, is_fp8: bool, cache_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """q as a decode call takes it: in the cache dtype over plain rows; over FP8 rows in its own
    dtype (the kernel dequantizes to it, as the reference does), a float64 q as float32 for the
    kernel, which takes 16- and 32-bit q."""
    if not is_fp8:
        return q.to(cache_dtype)
    return q.float() if backend == "triton" and q.dtype == torch.float64 else q


def attend_lists(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    is_fp8: bool,
    backend: str,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse decode through `backend`: each query of q [b, s, h, d] attends the slots
    `indices` [b, s, k] of k_cache and, in the same softmax, the slots `extra_indices` of
    extra_k_cache (-1 skipped), with an optional float32 sink per head (`flash_mla_with_kvcache`'s
    contract; the reference checks its arguments and computes in at least float32). q is taken as
    `attend` takes it (`_query`); out [b, s, h, head_dim_v] is in that dtype."""
    q = _query(q, is_fp8, k_cache.dtype, backend)
    if backend == "triton":
        out, _ = torch.ops.mla.sparse_decode(q, k_cache, indices, head_dim_v, softmax_scale, is_fp8, None, attn_sink,
                                             extra_k_cache, extra_indices)  # fmt: skip
        return out
    out, _ = reference_decode(
        q, k_cache, None, None, head_dim_v, softmax_scale=softmax_scale, is_fp8_kvcache=is_fp8, indices=indices,
        attn_sink=attn_sink, extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices,
        compute_dtype=torch.promote_types(q.dtype, torch.float32),
    )  # fmt: skip
    return out


def write(fmt: CacheFormat, pages: torch.Tensor, slots: torch.Tensor, latent, k_pe, backend: str,
          padded: bool = False) -> None:  # fmt: skip
    """Store rows of format `fmt` at `slots` through `backend`'s writer; arguments already checked
    (pages in the format's storage dtype). latent and k_pe are converted to the format's store
    dtype. `padded`: slots of -1 mark rows to skip (the Triton writers skip any out-of-range slot)."""
    latent, k_pe = latent.to(fmt.store_dtype(latent.dtype)), k_pe.to(fmt.store_dtype(k_pe.dtype))
    if backend == "reference":
        if padded:
            keep = slots >= 0
            slots, latent, k_pe = slots[keep], latent[keep], k_pe[keep]
        reference_cache.write_rows(fmt, pages, slots, latent, k_pe)
    elif fmt.is_fp8:
        torch.ops.mla.write_latent_fp8(pages, slots, latent, k_pe)
    else:
        torch.ops.mla.write_latent(pages, slots, latent, k_pe)


def write_index(fmt: CacheFormat, pages: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor,
                padded: bool = False) -> None:  # fmt: skip
    """Store indexer keys [n, index_head_dim] at `slots` in rows of `fmt` (`mla.formats.index_key_format`),
    one PyTorch scatter on every backend (a key is 256 or 132 bytes; the latent writers' kernels
    buy nothing here). `padded`: slots of -1 are skipped."""
    keys = keys.to(fmt.store_dtype(keys.dtype))
    if padded:
        keep = slots >= 0
        slots, keys = slots[keep], keys[keep]
    reference_cache.write_rows(fmt, pages, slots, keys, keys.new_zeros(keys.shape[0], 0))


def attend(
    fmt: CacheFormat,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    seqlens_q: torch.Tensor | None,
    schedule: tuple[torch.Tensor, torch.Tensor] | None,
    softmax_scale: float,
    backend: str,
    visibility: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal decode attention of q [b, s, h, r + dr] over a paged cache of format `fmt` through
    `backend`: [b, s, h, r] in the dtype the backend computes in. seqlens_q: int32 [b] queries
    per row (the first seqlens_q[i] columns; the rest padding, output 0), or None: all s.
    visibility: the reference's `dense_visibility` of these tables, when the caller has it.
    indices: int32 [b, s, topk] slots each query attends instead (sparse attention; -1 skipped):
    block_table, cache_seqlens, schedule and visibility are then unused.

    q goes in the cache dtype for plain rows; over FP8 rows in its own dtype (the kernel dequantizes
    to it, as the reference does), a float64 q as float32 for the kernel, which takes 16- and 32-bit q.
    """
    q = _query(q, fmt.is_fp8, fmt.dtype, backend)
    if backend == "triton" and indices is not None:
        out, _ = torch.ops.mla.sparse_decode(q, k_cache, indices, fmt.head_dim_v, softmax_scale, fmt.is_fp8, seqlens_q)
        return out
    if backend == "triton":
        out, _ = torch.ops.mla.decode(
            q, k_cache, block_table, cache_seqlens, *schedule, fmt.head_dim_v, softmax_scale, True, fmt.is_fp8, seqlens_q
        )
        return out
    b, s, h_q, _ = q.shape
    num_blocks, page_size, h_kv, _ = k_cache.shape
    # the plan built and validated every argument: describe the call instead of re-checking it
    call = DecodeCall(
        fmt=fmt, b=b, s_q=s, h_q=h_q, h_kv=h_kv, dv=fmt.head_dim_v, page_size=page_size,
        num_slots=num_blocks * page_size, scale=softmax_scale, causal=indices is None,
        topk=None if indices is None else indices.shape[-1], extra_page_size=None, extra_num_slots=None, extra_topk=None,
    )  # fmt: skip
    out, _ = run_decode(call, q, k_cache, block_table, cache_seqlens, indices=indices, seqlens_q=seqlens_q,
                        compute_dtype=torch.promote_types(q.dtype, torch.float32), visibility=visibility)  # fmt: skip
    return out
