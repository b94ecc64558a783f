"""Plain PyTorch reference for the paged MLA decode kernel (`mla.kernels.decode`).

Same signature and semantics as `mla.kernels.flash_mla_with_kvcache`, written for
clarity, not speed: gather each sequence's cache from its pages, attend in float32,
cast back. Runs on any device and dtype.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from .quant import dequantize_latent_fp8


def gather_pages(k_cache: torch.Tensor, block_table: torch.Tensor, seqlen: int, batch_idx: int) -> torch.Tensor:
    """The first `seqlen` tokens of sequence `batch_idx`: [seqlen, h_kv, d]."""
    page = k_cache.shape[1]
    n_pages = -(-seqlen // page)
    blocks = block_table[batch_idx, :n_pages].long()
    return k_cache[blocks].flatten(0, 1)[:seqlen]


def causal_limits(seqlen: int, s_q: int, causal: bool, device=None) -> torch.Tensor:
    """Last visible cache position (inclusive) for each of the s_q query tokens: [s_q].

    The query tokens are the last s_q tokens already written to the cache, so with
    `causal`, token i sees positions j <= seqlen - s_q + i; without it, all of them.
    """
    i = torch.arange(s_q, device=device)
    return seqlen - s_q + i if causal else torch.full((s_q,), seqlen - 1, device=device)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata=None,
    num_splits=None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over a paged latent cache.

    Args:
        q: [b, s_q, h_q, d] queries (absorbed: latent part then rope part).
        k_cache: [num_blocks, page_block_size, h_kv, d]; the first `head_dim_v` channels are also V.
        block_table: int32 [b, max_blocks], page ids of each sequence in order.
        cache_seqlens: int32 [b], tokens in the cache per sequence (the s_q queries included).
        head_dim_v: channels of V.
        tile_scheduler_metadata, num_splits: accepted for signature parity with the kernel; unused.
        softmax_scale: defaults to d ** -0.5.
        causal: query token i sees cache positions j <= seqlen - s_q + i.
        is_fp8_kvcache: k_cache holds FP8 bytes (`mla.reference.quant` layout, head_dim_v is the
            latent width); it is dequantized to q's dtype first, then attended as usual.
        compute_dtype: dtype the math runs in (not in the kernel's signature). Tests run it in
            q's own dtype to measure PyTorch's low-precision error, or in float64.

    Returns:
        out: [b, s_q, h_q, head_dim_v] in q's dtype; zero for rows that see no key.
        lse: float32 [b, h_q, s_q], natural-log sum of exp of the scaled scores; +inf for
        rows that see no key.
    """
    b, s_q, h_q, d = q.shape
    if (k_cache.dtype in (torch.uint8, torch.float8_e4m3fn)) != is_fp8_kvcache:
        raise TypeError(f"k_cache is {k_cache.dtype} but is_fp8_kvcache={is_fp8_kvcache}: FP8 caches are uint8/float8 bytes")
    if is_fp8_kvcache:
        kv, k_pe = dequantize_latent_fp8(k_cache, head_dim_v, d - head_dim_v)
        k_cache = torch.cat([kv.to(q.dtype), k_pe.to(q.dtype)], dim=-1)
    h_kv = k_cache.shape[2]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=compute_dtype, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=compute_dtype, device=q.device)
    lengths = cache_seqlens.tolist()
    for i in range(b):
        seqlen = lengths[i]
        if seqlen <= 0:
            continue
        kv = gather_pages(k_cache, block_table, seqlen, i).to(compute_dtype)  # [seqlen, h_kv, d]
        # query head h = g * group + r reads latent head g; grouping keeps the cache unrepeated
        qg = rearrange(q[i].to(compute_dtype), "s (g r) d -> g r s d", g=h_kv)
        scores = torch.einsum("grsd,ngd->grsn", qg, kv) * scale  # [h_kv, group, s_q, seqlen]
        limits = causal_limits(seqlen, s_q, causal, q.device)
        visible = torch.arange(seqlen, device=q.device)[None, :] <= limits[:, None]  # [s_q, seqlen]
        scores = scores.masked_fill(~visible, -math.inf)
        seen = visible.any(dim=1)  # [s_q]
        row_lse = torch.logsumexp(scores, dim=-1)  # [h_kv, group, s_q]
        probs = torch.exp(scores - row_lse[..., None]).nan_to_num(0.0)
        o = torch.einsum("grsn,ngd->sgrd", probs, kv[..., :head_dim_v]).flatten(1, 2)  # [s_q, h_q, dv]
        out[i] = torch.where(seen[:, None, None], o, 0.0)
        lse[i] = torch.where(seen[None, :], row_lse.flatten(0, 1), math.inf)
    return out.to(q.dtype), lse.float()
