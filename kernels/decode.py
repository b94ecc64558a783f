"""Fused MLA decode over a paged latent cache (absorbed form, flash-decoding).

In the absorbed form MLA decode is multi-query attention over the latent cache: every
query head of a latent head reads the same [kv_lora_rank + rope] row per token, and the
first head_dim_v channels of that row double as V. So one program holds all query rows
that share a latent head (s_q x h_q/h_kv rows, tiled by BLOCK_M) and reads each cache
tile once for all of them, for both QK^T and PV.

The sequence is cut into splits (flash-decoding) so a small batch with a long context
still fills the GPU: stage 1 writes a normalised partial output and its log-sum-exp per
split, stage 2 merges them. Split boundaries are computed on the device by
`get_mla_metadata` with no host synchronisation, so a decode step can be captured in a
CUDA graph; only the split count (a grid dimension) is decided on the host, from shapes.

Twin: `mla.reference.decode` (same signature, plain PyTorch).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from mla.formats import Fp8Format

# Split boundaries are multiples of SPLIT_ALIGN tokens, so tiles stay aligned, and a
# split gets at least MIN_SPLIT_TOKENS: below that its fixed cost (load Q, write a fp32
# partial of head_dim_v per row) outweighs the cache it reads.
SPLIT_ALIGN = 64
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64
DEBUG = os.environ.get("MLA_DEBUG", "0") == "1"

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_m(rows: int) -> int:
    # tl.dot needs at least 16 rows. The interpreter is fastest with few, large tiles; on
    # the GPU a 32 x 512 fp32 accumulator is what 4 warps hold without spilling.
    cap = 64 if _interpreting() else 32
    return min(cap, max(16, triton.next_power_of_2(rows)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return os.cpu_count() or 1


@triton.jit
def _mla_decode_kernel(
    q_ptr,  # [b, s_q, h_q, d]
    k_ptr,  # [num_blocks, page_size, h_kv, d]; FP8: the same bytes as float8_e4m3fn [..., fp8 bytes]
    k_scale_ptr,  # FP8 only: the cache's bytes as float32 (tile scales)
    k_rope_ptr,  # FP8 only: the cache's bytes as bfloat16 (k_pe)
    block_table_ptr,  # int32 [b, max_blocks]
    seqlens_ptr,  # int32 [b]
    bounds_ptr,  # int32 [b, num_splits + 1]: split s covers [bounds[s], bounds[s+1])
    o_ptr,  # SPLIT: fp32 [b, num_splits, s_q, h_q, dv]; else [b, s_q, h_q, dv]
    lse_ptr,  # SPLIT: fp32 [b, num_splits, s_q, h_q] (log2 domain); else [b, h_q, s_q] (natural log)
    s_q,
    group,
    m_tiles,
    page_size,
    dv,
    d_rope,
    fp8_tile,
    scale_log2,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kn, stride_kp, stride_kh, stride_kd,
    stride_tb, stride_tn,
    stride_bb, stride_bs,
    stride_ob, stride_osp, stride_os, stride_oh, stride_od,
    stride_lb, stride_lsp, stride_ls, stride_lh,
    CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    IS_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_DR: tl.constexpr,
):
    """Stage 1. Row r of tile (b, g, m) is query token r // group of head g * group + r % group:
        s = (q . k) * scale over the split's visible positions, online softmax in base 2,
        o = softmax(s) @ k[:, :dv]."""
    i_b = tl.program_id(0).to(tl.int64)
    i_gm = tl.program_id(1)
    i_sp = tl.program_id(2).to(tl.int64)
    i_g = i_gm // m_tiles
    i_m = i_gm % m_tiles

    seqlen = tl.load(seqlens_ptr + i_b)
    n_start = tl.load(bounds_ptr + i_b * stride_bb + i_sp * stride_bs)
    n_end = tl.load(bounds_ptr + i_b * stride_bb + (i_sp + 1) * stride_bs)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < s_q * group
    i_tok = (o_m // group).to(tl.int64)
    i_head = (i_g * group + o_m % group).to(tl.int64)
    # last visible position per row: the s_q queries are the last s_q tokens of the cache
    if CAUSAL:
        last = seqlen - s_q + i_tok
    else:
        last = i_tok * 0 + seqlen - 1

    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < dv
    o_dr = tl.arange(0, BLOCK_DR)
    m_dr = o_dr < d_rope
    p_q = q_ptr + i_b * stride_qb + i_tok * stride_qs + i_head * stride_qh  # [BLOCK_M]
    b_qv = tl.load(p_q[:, None] + o_dv[None, :] * stride_qd, mask=m_m[:, None] & m_dv[None, :], other=0.0)
    if UPCAST:
        b_qv = b_qv.to(tl.float32)
    if HAS_ROPE:
        b_qr = tl.load(p_q[:, None] + (dv + o_dr)[None, :] * stride_qd, mask=m_m[:, None] & m_dr[None, :], other=0.0)
        if UPCAST:
            b_qr = b_qr.to(tl.float32)

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < n_end
        # positions past n_end are never loaded, so unused page slots and table entries,
        # whatever they hold, never reach the arithmetic
        i_blk = tl.load(block_table_ptr + i_b * stride_tb + (o_n // page_size) * stride_tn, mask=m_n, other=0)
        # offset of each token's row: elements of k_cache, or bytes for FP8
        o_row = i_blk.to(tl.int64) * stride_kn + (o_n % page_size).to(tl.int64) * stride_kp + i_g * stride_kh
        m_kv = m_n[:, None] & m_dv[None, :]
        if IS_FP8:
            # code * power-of-two tile scale is exact in bf16, so the dot sees the stored value
            b_code = tl.load(k_ptr + o_row[:, None] + o_dv[None, :], mask=m_kv, other=0.0)
            b_sc = tl.load(k_scale_ptr + (o_row[:, None] + dv + 4 * (o_dv // fp8_tile)[None, :]) // 4, mask=m_kv, other=0.0)
            b_kv = b_code.to(tl.float32) * b_sc
            if not UPCAST:
                b_kv = b_kv.to(q_ptr.dtype.element_ty)
        else:
            b_kv = tl.load(k_ptr + o_row[:, None] + o_dv[None, :] * stride_kd, mask=m_kv, other=0.0)
            if UPCAST:
                b_kv = b_kv.to(tl.float32)
        b_s = tl.dot(b_qv, tl.trans(b_kv), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_ROPE:
            m_kr = m_n[:, None] & m_dr[None, :]
            if IS_FP8:
                p_kr = k_rope_ptr + (o_row + dv + 4 * (dv // fp8_tile)) // 2
                b_kr = tl.load(p_kr[:, None] + o_dr[None, :], mask=m_kr, other=0.0)
                b_kr = b_kr.to(tl.float32) if UPCAST else b_kr.to(q_ptr.dtype.element_ty)
            else:
                b_kr = tl.load(k_ptr + o_row[:, None] + (dv + o_dr)[None, :] * stride_kd, mask=m_kr, other=0.0)
                if UPCAST:
                    b_kr = b_kr.to(tl.float32)
            b_s += tl.dot(b_qr, tl.trans(b_kr), input_precision=DOT_PRECISION)
        visible = m_n[None, :] & (o_n[None, :] <= last[:, None])
        b_s = tl.where(visible, b_s * scale_log2, float("-inf"))

        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # a row that has seen nothing yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_shift)
        b_p = tl.exp2(b_s - b_shift[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_kv.dtype), b_kv, input_precision=DOT_PRECISION)
        b_m = b_m_new

    seen = b_l > 0
    b_o = b_acc / tl.where(seen, b_l, 1.0)[:, None]
    p_o = o_ptr + i_b * stride_ob + i_sp * stride_osp + i_tok * stride_os + i_head * stride_oh  # [BLOCK_M]
    p_lse = lse_ptr + i_b * stride_lb + i_sp * stride_lsp + i_tok * stride_ls + i_head * stride_lh
    if SPLIT:
        b_lse = tl.where(seen, b_m + tl.log2(tl.where(seen, b_l, 1.0)), float("-inf"))
        m_store = m_m & (n_start < n_end)
    else:
        b_lse = tl.where(seen, (b_m + tl.log2(tl.where(seen, b_l, 1.0))) * 0.6931471805599453, float("inf"))
        m_store = m_m
    tl.store(p_o[:, None] + o_dv[None, :] * stride_od, b_o.to(o_ptr.dtype.element_ty), mask=m_store[:, None] & m_dv[None, :])
    tl.store(p_lse, b_lse, mask=m_store)


@triton.jit
def _mla_combine_kernel(
    o_part_ptr,  # fp32 [b, num_splits, s_q, h_q, dv]
    lse_part_ptr,  # fp32 [b, num_splits, s_q, h_q], log2 domain
    cu_splits_ptr,  # int32 [b + 1]: non-empty splits of sequence b are the first cu[b+1] - cu[b]
    o_ptr,  # [b, s_q, h_q, dv]
    lse_ptr,  # fp32 [b, h_q, s_q], natural log
    h_q,
    dv,
    stride_pb, stride_psp, stride_ps, stride_ph, stride_pd,
    stride_qb, stride_qsp, stride_qs, stride_qh,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    BLOCK_H: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Stage 2: o = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse); lse = log(sum_s w_s) + max."""
    i_b = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_hb = tl.program_id(2)
    n_splits = tl.load(cu_splits_ptr + i_b + 1) - tl.load(cu_splits_ptr + i_b)

    o_h = (i_hb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    m_h = o_h < h_q
    o_dv = tl.arange(0, BLOCK_DV)
    m_hd = m_h[:, None] & (o_dv < dv)[None, :]
    b_m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_H], tl.float32)
    b_acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for i_sp in range(0, n_splits):
        b_lse = tl.load(
            lse_part_ptr + i_b * stride_qb + i_sp * stride_qsp + i_s * stride_qs + o_h * stride_qh,
            mask=m_h,
            other=float("-inf"),
        )
        p_part = o_part_ptr + i_b * stride_pb + i_sp * stride_psp + i_s * stride_ps
        b_part = tl.load(p_part + o_h[:, None] * stride_ph + o_dv[None, :] * stride_pd, mask=m_hd, other=0.0)
        b_m_new = tl.maximum(b_m, b_lse)
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_shift)
        b_w = tl.exp2(b_lse - b_shift)
        b_acc = b_acc * b_alpha[:, None] + b_w[:, None] * b_part
        b_l = b_l * b_alpha + b_w
        b_m = b_m_new

    seen = b_l > 0
    b_o = b_acc / tl.where(seen, b_l, 1.0)[:, None]
    b_lse = tl.where(seen, (b_m + tl.log2(tl.where(seen, b_l, 1.0))) * 0.6931471805599453, float("inf"))
    p_o = o_ptr + i_b * stride_ob + i_s * stride_os
    tl.store(p_o + o_h[:, None] * stride_oh + o_dv[None, :] * stride_od, b_o.to(o_ptr.dtype.element_ty), mask=m_hd)
    tl.store(lse_ptr + i_b * stride_lb + o_h * stride_lh + i_s * stride_ls, b_lse, mask=m_h)


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_sm: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan the split-KV schedule of `flash_mla_with_kvcache`, on the device, without syncing.

    Args:
        cache_seqlens: int32 [b], tokens in the cache per sequence.
        num_q_tokens_per_head_k: s_q * h_q // h_kv, query rows that share one latent head.
        num_heads_k: h_kv.
        num_sm: processors to fill; defaults to the GPU's SM count (CPU cores under the
            interpreter). The split count is the only host decision and uses shapes alone.

    Returns:
        tile_scheduler_metadata: int32 [b, num_splits + 1]; split s of sequence i covers cache
            positions [meta[i, s], meta[i, s + 1]). Splits are sized from the batch's total
            length, so long sequences get more of them than short ones.
        num_splits: int32 [b + 1], prefix sums of the non-empty splits per sequence.
    """
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or cache_seqlens.dim() != 1:
        raise TypeError(f"cache_seqlens must be an int32 tensor [b], got {_describe(cache_seqlens)}")
    if num_q_tokens_per_head_k < 1 or num_heads_k < 1:
        raise ValueError(
            f"num_q_tokens_per_head_k and num_heads_k must be >= 1, got {num_q_tokens_per_head_k}, {num_heads_k}"
        )
    device = cache_seqlens.device
    batch = cache_seqlens.numel()
    m_tiles = triton.cdiv(num_q_tokens_per_head_k, _block_m(num_q_tokens_per_head_k))
    programs = max(1, batch * num_heads_k * m_tiles)
    max_splits = max(1, min(MAX_SPLITS, triton.cdiv(num_sm or _num_sms(device), programs)))

    lengths = cache_seqlens.to(torch.int64).clamp_min(0)
    if max_splits == 1:
        bounds = torch.stack([torch.zeros_like(lengths), lengths], dim=1)
        n_splits = (lengths > 0).to(torch.int64)
    else:
        # spread the whole batch's tokens over batch * max_splits programs, then give each
        # sequence as many of those chunks as it needs (at most max_splits)
        target = torch.clamp(_cdiv(lengths.sum(), batch * max_splits), min=MIN_SPLIT_TOKENS)
        want = torch.clamp(_cdiv(lengths, target), 1, max_splits)
        chunk = _cdiv(_cdiv(lengths, want), SPLIT_ALIGN) * SPLIT_ALIGN
        chunk = torch.clamp(chunk, min=SPLIT_ALIGN)
        starts = torch.arange(max_splits + 1, device=device, dtype=torch.int64)[None, :] * chunk[:, None]
        bounds = torch.minimum(starts, lengths[:, None])
        n_splits = _cdiv(lengths, chunk)
    cu_splits = torch.zeros(batch + 1, dtype=torch.int64, device=device)
    cu_splits[1:] = torch.cumsum(n_splits, 0)
    return bounds.to(torch.int32), cu_splits.to(torch.int32)


def _cdiv(a, b):
    return (a + b - 1) // b


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return repr(type(x).__name__)


def _check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, causal, is_fp8_kvcache) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_describe(t)}")
    if q.dim() != 4:
        raise ValueError(f"q must be [b, s_q, h_q, d], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, page_block_size, h_kv, d], got shape {tuple(k_cache.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be bfloat16, float16 or float32, got {q.dtype}")
    if is_fp8_kvcache:
        if q.dtype == torch.float32:
            raise TypeError("an FP8 k_cache takes a bfloat16 or float16 q, got float32")
        if k_cache.dtype not in (torch.uint8, torch.float8_e4m3fn):
            raise TypeError(f"with is_fp8_kvcache, k_cache must be uint8 or float8_e4m3fn bytes, got {k_cache.dtype}")
    elif k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} must match q dtype {q.dtype} (FP8 caches need is_fp8_kvcache=True)")
    if block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise TypeError(f"block_table must be an int32 tensor [b, max_blocks], got {_describe(block_table)}")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.dim() != 1:
        raise TypeError(f"cache_seqlens must be an int32 tensor [b], got {_describe(cache_seqlens)}")
    for name, t in (("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    b, s_q, h_q, d = q.shape
    num_blocks, page_size, h_kv, d_k = k_cache.shape
    if is_fp8_kvcache:
        _check_fp8_cache(k_cache, head_dim_v, d)
    elif d_k != d:
        raise ValueError(f"k_cache head dim {d_k} must equal q head dim {d}")
    if block_table.shape[0] != b or cache_seqlens.shape[0] != b:
        raise ValueError(
            f"batch mismatch: q has {b}, block_table {block_table.shape[0]}, cache_seqlens {cache_seqlens.shape[0]}"
        )
    if h_kv < 1 or h_q % h_kv != 0:
        raise ValueError(f"h_q ({h_q}) must be a multiple of the cache's h_kv ({h_kv})")
    if not isinstance(head_dim_v, int) or not 16 <= head_dim_v <= d:
        raise ValueError(f"head_dim_v must be an int with 16 <= head_dim_v <= d ({d}), got {head_dim_v!r}")
    if s_q < 1 or page_size < 1:
        raise ValueError(f"s_q and page_block_size must be >= 1, got s_q={s_q}, page_block_size={page_size}")
    if not isinstance(causal, bool) or not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"causal and is_fp8_kvcache must be bools, got {causal!r}, {is_fp8_kvcache!r}")
    # Value checks read the tensors on the host. On CPU that is free and required: the
    # interpreter dies on an out-of-bounds access. On the GPU it would sync, so debug only.
    if q.device.type == "cpu" or DEBUG:
        lengths = cache_seqlens.cpu()
        if (lengths < 0).any():
            raise ValueError(f"cache_seqlens must be >= 0, got {lengths.tolist()}")
        pages_needed = (lengths + page_size - 1) // page_size
        if pages_needed.numel() and pages_needed.max().item() > block_table.shape[1]:
            raise ValueError(
                f"block_table has {block_table.shape[1]} columns but the longest sequence "
                f"({lengths.max().item()} tokens, page size {page_size}) needs {pages_needed.max().item()}"
            )
        table = block_table.cpu()
        used = torch.arange(table.shape[1])[None, :] < pages_needed[:, None]
        bad = used & ((table < 0) | (table >= num_blocks))
        if bad.any():
            i, j = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"block_table[{i}, {j}] = {table[i, j].item()} is outside [0, {num_blocks})")


def _check_fp8_cache(k_cache: torch.Tensor, head_dim_v: int, d: int) -> None:
    if not isinstance(head_dim_v, int) or not 16 <= head_dim_v < d:
        raise ValueError(f"head_dim_v must be an int with 16 <= head_dim_v < d ({d}) for an FP8 cache, got {head_dim_v!r}")
    width = Fp8Format(head_dim_v, d - head_dim_v).bytes_per_token
    if k_cache.shape[-1] != width:
        raise ValueError(
            f"FP8 k_cache rows must be {width} bytes for kv_lora_rank={head_dim_v}, rope={d - head_dim_v} "
            f"(latent bytes, float32 tile scales, bfloat16 k_pe), got {k_cache.shape[-1]}"
        )
    # the kernel reads scales and k_pe through float32 / bfloat16 views of the same bytes
    if k_cache.stride(-1) != 1 or any(st % 4 for st in k_cache.stride()[:-1]) or head_dim_v % 4:
        raise ValueError(
            f"FP8 k_cache needs a contiguous last dim, other strides multiple of 4 bytes and kv_lora_rank % 4 == 0, "
            f"got strides {k_cache.stride()} and kv_lora_rank {head_dim_v}"
        )


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor | None = None,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over a paged latent cache (FlashMLA's contract, any page size and head dim).

    Args:
        q: [b, s_q, h_q, d], bfloat16 / float16 / float32.
        k_cache: [num_blocks, page_block_size, h_kv, d], q's dtype; the first head_dim_v
            channels of each row are also V. h_kv = 1 is MLA; h_q must be a multiple of h_kv.
        block_table: int32 [b, max_blocks], page ids of each sequence in order; entries past a
            sequence's last page are never read.
        cache_seqlens: int32 [b], tokens in the cache per sequence (the s_q queries included).
        head_dim_v: channels of V, 16 <= head_dim_v <= d.
        tile_scheduler_metadata, num_splits: from `get_mla_metadata`; computed here when None.
        softmax_scale: defaults to d ** -0.5.
        causal: query token i sees cache positions j <= seqlen - s_q + i.
        is_fp8_kvcache: k_cache is uint8 / float8_e4m3fn [num_blocks, page_block_size, h_kv,
            bytes] in the FP8 layout of `mla.reference.quant` (latent codes, float32 scale per
            tile, bfloat16 k_pe; 656 bytes for 512 + 64); q is bfloat16 or float16 and
            head_dim_v is the latent width. Dequantized on load; the math is the same.

    Returns:
        out: [b, s_q, h_q, head_dim_v] in q's dtype; zero for rows that see no key.
        lse: float32 [b, h_q, s_q], natural log; +inf for rows that see no key.
    """
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the Triton decode kernel needs a GPU (q is on {q.device}); on the CPU use "
            "mla.reference.flash_mla_with_kvcache, or set TRITON_INTERPRET=1 before importing mla.kernels"
        )
    _check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, causal, is_fp8_kvcache)
    b, s_q, h_q, d = q.shape
    page_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    rows = s_q * group
    if (tile_scheduler_metadata is None) != (num_splits is None):
        raise ValueError("pass both tile_scheduler_metadata and num_splits from get_mla_metadata, or neither")
    if tile_scheduler_metadata is None:
        tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, rows, h_kv)
    meta = tile_scheduler_metadata
    if meta.dtype != torch.int32 or meta.dim() != 2 or meta.shape[0] != b or meta.shape[1] < 2 or meta.device != q.device:
        raise ValueError(f"tile_scheduler_metadata must be int32 [b={b}, splits + 1] on {q.device}, got {_describe(meta)}")
    if num_splits.dtype != torch.int32 or tuple(num_splits.shape) != (b + 1,) or num_splits.device != q.device:
        raise ValueError(f"num_splits must be int32 [b + 1 = {b + 1}] on {q.device}, got {_describe(num_splits)}")
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    n_split = meta.shape[1] - 1

    interpret = _interpreting()
    # the interpreter truncates fp32 -> bf16 stores; write fp32 and let torch round
    out_dtype = torch.float32 if interpret and q.dtype == torch.bfloat16 else q.dtype
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=out_dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)

    block_m = _block_m(rows)
    m_tiles = triton.cdiv(rows, block_m)
    block_dv = triton.next_power_of_2(head_dim_v)
    d_rope = d - head_dim_v
    block_dr = max(16, triton.next_power_of_2(max(d_rope, 1)))
    if is_fp8_kvcache:
        fp8_tile = Fp8Format(head_dim_v, d_rope).tile
        raw = k_cache.view(torch.uint8)
        k_main, k_scale, k_rope = raw.view(torch.float8_e4m3fn), raw.view(torch.float32), raw.view(torch.bfloat16)
        k_strides = (*raw.stride()[:3], 1)
    else:
        fp8_tile, k_main, k_scale, k_rope, k_strides = 1, k_cache, k_cache, k_cache, k_cache.stride()
    if n_split == 1:
        o_stage, lse_stage = out, lse
        o_strides = (out.stride(0), 0, out.stride(1), out.stride(2), out.stride(3))
        lse_strides = (lse.stride(0), 0, lse.stride(2), lse.stride(1))
    else:
        o_stage = torch.empty(b, n_split, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
        lse_stage = torch.empty(b, n_split, s_q, h_q, dtype=torch.float32, device=q.device)
        o_strides, lse_strides = o_stage.stride(), lse_stage.stride()
    _mla_decode_kernel[(b, h_kv * m_tiles, n_split)](
        q, k_main, k_scale, k_rope, block_table, cache_seqlens, meta, o_stage, lse_stage,
        s_q, group, m_tiles, page_size, head_dim_v, d_rope, fp8_tile, scale * math.log2(math.e),
        *q.stride(), *k_strides, *block_table.stride(), *meta.stride(), *o_strides, *lse_strides,
        CAUSAL=causal,
        SPLIT=n_split > 1,
        UPCAST=interpret,
        IS_FP8=is_fp8_kvcache,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_ROPE=d_rope > 0,
        BLOCK_M=block_m,
        BLOCK_N=64 if interpret else 32,
        BLOCK_DV=block_dv,
        BLOCK_DR=block_dr,
        num_warps=4,
        num_stages=2,
    )
    if n_split > 1:
        block_h = min(16, triton.next_power_of_2(h_q))
        _mla_combine_kernel[(b, s_q, triton.cdiv(h_q, block_h))](
            o_stage, lse_stage, num_splits, out, lse, h_q, head_dim_v,
            *o_stage.stride(), *lse_stage.stride(), *out.stride(), *lse.stride(),
            BLOCK_H=block_h,
            BLOCK_DV=block_dv,
            num_warps=4,
        )
    return out.to(q.dtype), lse
