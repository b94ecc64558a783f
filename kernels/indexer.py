"""DeepSeek-V3.2's lightning indexer in Triton: scores of every cached position for every query
token (`index_scores`), and their exact top-k as a sparse decode slot list (`index_topk`).

Scores: one program per (row r, query token i, chunk of positions). It loads the token's
[heads, dim] queries and weights once, then walks its chunk in blocks of BLOCK_N positions:
gather the block's key rows through the block table (`_table_rows`, shared with decode; one
block ahead of the math, so Triton's pipeliner streams the key loads), load them plain or
FP8-dequantized (`_load_latent`, the decode kernel's tile loader) or MXFP4-dequantized
(`_load_mxfp4`: DeepSeek-V4's 4-bit keys, e2m1 nibbles and UE8M0 scales), one [heads, dim] x
[dim, BLOCK_N] dot on the tensor cores, relu, weighted sum over heads, store (-inf where the
token does not see the position). The compiled-code report (`python -m bench.compiled`,
configurations index-*) shows registers, spills, MMA kind and stages per arch.

Top-k: one program per (r, i), exact and without a sort. Scores map to int32 keys that order
like the floats (negative floats: flip the magnitude bits). The k-th largest key T is found a
digit at a time, radix 16 from the top: with the digits above fixed, one pass over the row
counts the keys >= each of the 16 extensions by the next digit, and the largest extension
with at least k keys is kept (8 passes for 32 bits); then one pass in position order keeps the
keys above T and the first (k - count above T) keys equal to T, and writes their positions at
a running offset (a cumulative sum in the block plus the count so far).

Argument checks and the reference twins: `mla.reference.indexer`, whose signatures and
semantics these launchers share. Key row layout: `mla.formats.index_key_format`.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from mla.backend import interpreting, require_triton_device
from mla.reference.indexer import check_index_scores_args, check_topk_args

from .decode import _block_d, _load_latent, _table_rows, _target_arch

# int32 keys of the top-k: non-candidates take KEY_NONE, below every candidate's key (the
# smallest, -FLT_MAX's, is 0x80800000). The search runs over key + 2^31 (KEY_OFFSET), the same
# order as unsigned numbers, RADIX_BITS per pass.
KEY_NONE = tl.constexpr(-(2**31))
KEY_OFFSET = tl.constexpr(2**31)
MAGNITUDE_BITS = tl.constexpr(0x7FFFFFFF)
RADIX_BITS = tl.constexpr(4)
RADIX = tl.constexpr(16)


@dataclasses.dataclass(frozen=True)
class ScoresTiles:
    """How an index_scores launch is cut: positions per dot (block_n), blocks per program (a
    program loads its queries once for all of them), warps, pipeline stages."""

    block_n: int
    blocks: int
    num_warps: int
    num_stages: int


def scores_tiles(arch: int | None) -> ScoresTiles:
    """The tiles for sm_<arch> (None: the interpreter, where two blocks per program exercise
    the loop). GPU: a [64 heads, 64 positions] fp32 score tile is 32 registers per thread at 4
    warps; 8 blocks of 64 make a 512-position chunk, so q is re-read once per 512 keys; 3
    stages keep two key blocks in flight (triton 3.7.1, H=64, D=128: no spills, mma.sync on
    sm_80 / sm_89 at 162-183 registers, wgmma on sm_90 at 95-116; MXFP4 keys 194 and 128)."""
    if arch is None:
        return ScoresTiles(64, 2, 4, 1)
    return ScoresTiles(64, 8, 4, 3)


def topk_block(arch: int | None) -> int:
    """Scores per step of the top-k passes: small under the interpreter so that rows of a few
    hundred positions span several blocks (the carried counts are tested)."""
    return 128 if arch is None else 1024


# float32 bits of the e2m1 magnitudes 2..7 (1, 1.5, 2, 3, 4, 6) are (code + E2M1_BIAS) << 22:
# bit 0 of the code is the mantissa bit, bits 1-2 the exponent (bias 1, float32's 127)
E2M1_BIAS = tl.constexpr(252)
F32_HALF_BITS = tl.constexpr(0x3F000000)
F32_SIGN_BIT = tl.constexpr(-(2**31))
UE8M0_ZERO_BITS = tl.constexpr(0x00400000)  # scale byte 0: 2^-127, a float32 subnormal
UE8M0_NAN = tl.constexpr(0xFF)


@triton.jit
def _e2m1_to_f32(b_code):
    """float32 values of float4 e2m1 codes (int32 holding 0..15), exactly, branch-free: codes
    0 and 1 (0 and 0.5) are the subnormals, set apart; bit 3 is the sign."""
    b_mag = b_code & 7
    b_bits = tl.where(b_mag < 2, b_mag * F32_HALF_BITS, (b_mag + E2M1_BIAS) << 22)
    b_bits = tl.where((b_code & 8) != 0, b_bits | F32_SIGN_BIT, b_bits)
    return b_bits.to(tl.float32, bitcast=True)


@triton.jit
def _ue8m0_to_f32(b_e):
    """float32 values of UE8M0 scale bytes (int32 holding 0..255): 2^(e - 127), the float32
    with exponent field e; 0 is the subnormal 2^-127, 0xFF is NaN (as torch.float8_e8m0fnu)."""
    b_bits = tl.where(b_e == 0, UE8M0_ZERO_BITS, b_e << 23)
    return tl.where(b_e == UE8M0_NAN, float("nan"), b_bits.to(tl.float32, bitcast=True))


@triton.jit
def _load_mxfp4(p_row, m_key, dim, stride_d, scale_offset, num_scales, BLOCK_D: tl.constexpr,
                WORDS: tl.constexpr):  # fmt: skip
    """MXFP4 keys (`mla.formats.Mxfp4KeyFormat`) of the rows at p_row (their bytes): [BLOCK_N,
    BLOCK_D] float32, code * scale, exact. Byte i holds channel 2 i (low nibble) and 2 i + 1
    (high); one UE8M0 scale per 32 channels (16 bytes) at byte scale_offset + i // 16. Bytes of
    masked rows and past dim are not read (code 0: the value 0).

    WORDS (rows 4-byte aligned, contiguous: dim a multiple of 128): the codes are read as int32
    words of 8 channels and split with shifts, which Triton's pipeliner streams through a
    shared-memory ring (as `_load_latent`'s FP8 codes); else byte by byte."""
    BLOCK_N: tl.constexpr = p_row.shape[0]
    BLOCK_S: tl.constexpr = BLOCK_D // 32  # scales
    tl.static_assert(BLOCK_D % 32 == 0, "MXFP4 keys come in blocks of 32 channels")
    o_s = tl.arange(0, BLOCK_S)
    m_s = m_key[:, None] & (o_s < num_scales)[None, :]
    b_e = tl.load(p_row[:, None] + (scale_offset + o_s[None, :]) * stride_d, mask=m_s, other=0).to(tl.int32)
    b_sc = _ue8m0_to_f32(b_e)  # [BLOCK_N, BLOCK_S]
    if WORDS:
        BLOCK_W: tl.constexpr = BLOCK_D // 8
        o_w = tl.arange(0, BLOCK_W)
        p_w = p_row.to(tl.pointer_type(tl.int32), bitcast=True)  # [BLOCK_N]
        b_w = tl.load(p_w[:, None] + o_w[None, :], mask=m_key[:, None] & (o_w < dim // 8)[None, :], other=0)
        b_sc = tl.reshape(tl.broadcast_to(b_sc[:, :, None], [BLOCK_N, BLOCK_S, 4]), [BLOCK_N, BLOCK_W])
        # nibble k of word w is channel 8 w + k (little-endian bytes, low nibble first); join
        # stacks on a new last axis, so these three levels put nibble 4 c + 2 b + a at [w, c, b, a]
        b_v0 = _e2m1_to_f32(b_w & 0xF) * b_sc
        b_v1 = _e2m1_to_f32((b_w >> 4) & 0xF) * b_sc
        b_v2 = _e2m1_to_f32((b_w >> 8) & 0xF) * b_sc
        b_v3 = _e2m1_to_f32((b_w >> 12) & 0xF) * b_sc
        b_v4 = _e2m1_to_f32((b_w >> 16) & 0xF) * b_sc
        b_v5 = _e2m1_to_f32((b_w >> 20) & 0xF) * b_sc
        b_v6 = _e2m1_to_f32((b_w >> 24) & 0xF) * b_sc
        b_v7 = _e2m1_to_f32((b_w >> 28) & 0xF) * b_sc
        b_k = tl.join(tl.join(tl.join(b_v0, b_v4), tl.join(b_v2, b_v6)),
                      tl.join(tl.join(b_v1, b_v5), tl.join(b_v3, b_v7)))  # fmt: skip
    else:
        BLOCK_C: tl.constexpr = BLOCK_D // 2  # code bytes
        o_c = tl.arange(0, BLOCK_C)
        m_c = m_key[:, None] & (o_c < dim // 2)[None, :]
        b_c = tl.load(p_row[:, None] + o_c[None, :] * stride_d, mask=m_c, other=0).to(tl.int32)  # [BLOCK_N, BLOCK_C]
        b_sc = tl.reshape(tl.broadcast_to(b_sc[:, :, None], [BLOCK_N, BLOCK_S, 16]), [BLOCK_N, BLOCK_C])
        # join stacks on a new last axis: [n, i, 0] is channel 2 i, [n, i, 1] channel 2 i + 1
        b_k = tl.join(_e2m1_to_f32(b_c & 0xF) * b_sc, _e2m1_to_f32(b_c >> 4) * b_sc)
    return tl.reshape(b_k, [BLOCK_N, BLOCK_D])


@triton.jit
def _block_key_rows(p_table, n0, n_seen, stride_tn, num_pages, page_size, stride_kn, stride_kp,
                    PAGE_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Row offsets [BLOCK_N] of positions n0 + [0, BLOCK_N) and the mask of those read: seen
    (below n_seen) and on a page of the cache."""
    o_n = n0 + tl.arange(0, BLOCK_N)
    return _table_rows(p_table, n0, o_n, o_n < n_seen, n0 < n_seen, stride_tn, num_pages, page_size, stride_kn,
                       stride_kp, 0, PAGE_BLOCKS)  # fmt: skip


@triton.heuristics(
    {
        "RAGGED": lambda a: a["seqlens_q_ptr"] is not None,
        "PAGE_BLOCKS": lambda a: a["page_size"] % a["BLOCK_N"] == 0,
    }
)
@triton.jit
def _index_scores_kernel(
    q_ptr,  # [b, s_q, heads, dim]
    w_ptr,  # float32 [b, s_q, heads]
    k_ptr,  # [num_pages, page_size, 1, dim]; FP8 / MXFP4: the rows' bytes, uint8 [..., row_width]
    block_table_ptr,  # int32 [b, table_width]
    seqlens_ptr,  # int32 [b]
    seqlens_q_ptr,  # int32 [b] (None: every row has s_q queries)
    out_ptr,  # float32 [b, s_q, max_seqlen]
    s_q, heads, dim, page_size, num_pages, table_width, max_seqlen, scale_offset, num_tiles,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_wb, stride_ws, stride_wh,
    stride_kn, stride_kp, stride_kd,
    stride_tb, stride_tn,
    stride_ob, stride_os, stride_on,
    IS_FP8: tl.constexpr,
    IS_FP4: tl.constexpr,
    FP4_WORDS: tl.constexpr,
    SOFT_E4M3: tl.constexpr,
    DOT_IN_Q_DTYPE: tl.constexpr,
    RAGGED: tl.constexpr,
    PAGE_BLOCKS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """score[r, i, j] = sum_h w[r, i, h] * relu(q[r, i, h] . k[r, j]) for the positions j of
    this program's chunk that token i sees; -inf for the others."""
    i_b = (tl.program_id(0) // s_q).to(tl.int64)
    i_s = (tl.program_id(0) % s_q).to(tl.int64)
    n_begin = tl.program_id(1) * (BLOCK_N * BLOCKS)
    n_end = tl.minimum(n_begin + BLOCK_N * BLOCKS, max_seqlen)

    n_q = s_q
    if RAGGED:
        n_q = tl.load(seqlens_q_ptr + i_b)
    seqlen = tl.load(seqlens_ptr + i_b)
    has_q = i_s < n_q
    # the n_q queries are the last tokens of the row: token i is at position seqlen - n_q + i
    # and sees positions up to it; padding tokens see nothing
    n_seen = tl.where(has_q, tl.maximum(seqlen - n_q + i_s + 1, 0), 0)
    n_seen = tl.minimum(n_seen, table_width * page_size)

    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_h = (o_h < heads) & has_q
    m_d = o_d < dim
    p_q = q_ptr + i_b * stride_qb + i_s * stride_qs + o_h[:, None].to(tl.int64) * stride_qh + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_h[:, None] & m_d[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    if not DOT_IN_Q_DTYPE:
        b_q = b_q.to(tl.float32)
    b_w = tl.load(w_ptr + i_b * stride_wb + i_s * stride_ws + o_h * stride_wh, mask=m_h, other=0.0)  # [BLOCK_H]
    p_table = block_table_ptr + i_b * stride_tb
    p_out = out_ptr + i_b * stride_ob + i_s * stride_os

    # block i + 1's rows are gathered while block i is scored, as in decode: the key loads then
    # depend on no load of their own iteration and the pipeliner can issue them ahead
    o_row, m_key = _block_key_rows(p_table, n_begin, n_seen, stride_tn, num_pages, page_size, stride_kn, stride_kp,
                                   PAGE_BLOCKS, BLOCK_N)  # fmt: skip
    for n0 in range(n_begin, n_end, BLOCK_N):
        o_row_next, m_key_next = _block_key_rows(p_table, n0 + BLOCK_N, n_seen, stride_tn, num_pages, page_size,
                                                 stride_kn, stride_kp, PAGE_BLOCKS, BLOCK_N)  # fmt: skip
        o_n = n0 + tl.arange(0, BLOCK_N)
        if IS_FP4:
            b_k = _load_mxfp4(k_ptr + o_row, m_key, dim, stride_kd, scale_offset, num_tiles, BLOCK_D, FP4_WORDS)
        else:
            b_k = _load_latent(k_ptr + o_row, m_key, o_d, m_d, dim, stride_kd, scale_offset, num_tiles, IS_FP8,
                               SOFT_E4M3, BLOCK_T)  # fmt: skip
        b_s = tl.dot(b_q, tl.trans(b_k.to(b_q.dtype)), input_precision="ieee")  # [BLOCK_H, BLOCK_N]
        # relu that keeps NaN (as torch.relu does; max.f32 would return the 0)
        b_s = tl.where(b_s < 0.0, 0.0, b_s)
        # padded heads (zero queries) score 0 * inf = NaN against an infinite key: leave them out
        b_score = tl.sum(tl.where(m_h[:, None], b_s * b_w[:, None], 0.0), 0)  # [BLOCK_N]
        tl.store(p_out + o_n.to(tl.int64) * stride_on, tl.where(m_key, b_score, float("-inf")), mask=o_n < n_end)
        o_row, m_key = o_row_next, m_key_next


@triton.jit
def _topk_keys(p_s, n0, reach, stride_sn, BLOCK: tl.constexpr):
    """int32 keys [BLOCK] of scores n0 + [0, BLOCK): ordered as the floats, -0.0 as 0.0;
    KEY_NONE for non-candidates (-inf, NaN, past reach)."""
    o_n = n0 + tl.arange(0, BLOCK)
    b_s = tl.load(p_s + o_n.to(tl.int64) * stride_sn, mask=o_n < reach, other=float("-inf"))
    m_c = (b_s == b_s) & (b_s != float("-inf"))
    b_s = tl.where(b_s == 0.0, 0.0, b_s)
    b_bits = b_s.to(tl.int32, bitcast=True)
    # a negative float's bits grow with its magnitude: flipping them reverses that order
    b_key = tl.where(b_bits < 0, b_bits ^ MAGNITUDE_BITS, b_bits)
    return tl.where(m_c, b_key, KEY_NONE)


@triton.jit
def _count_at_least(p_s, reach, stride_sn, t, BLOCK: tl.constexpr):
    """How many keys of the row are >= t (int64; above KEY_NONE: candidates only)."""
    count = tl.zeros([], dtype=tl.int32)
    for n0 in range(0, reach, BLOCK):
        count += tl.sum((_topk_keys(p_s, n0, reach, stride_sn, BLOCK) >= t).to(tl.int32), 0)
    return count


@triton.jit
def _count_at_least_each(p_s, reach, stride_sn, b_t, BLOCK: tl.constexpr):
    """_count_at_least for each threshold of b_t (int64 [RADIX]) in one pass: [RADIX]."""
    b_count = tl.zeros([RADIX], dtype=tl.int32)
    for n0 in range(0, reach, BLOCK):
        b_key = _topk_keys(p_s, n0, reach, stride_sn, BLOCK)
        b_count += tl.sum((b_key[:, None] >= b_t[None, :]).to(tl.int32), 0)
    return b_count


@triton.heuristics({"HAS_TABLE": lambda a: a["block_table_ptr"] is not None})
@triton.jit
def _index_topk_kernel(
    scores_ptr,  # float32 [b, s_q, n]
    block_table_ptr,  # int32 [b, table_width] (None: write positions)
    indices_ptr,  # int32 [b, s_q, topk]
    counts_ptr,  # int32 [b, s_q]
    s_q, reach, topk, page_size,
    stride_sb, stride_ss, stride_sn,
    stride_tb, stride_tn,
    stride_ib, stride_is, stride_ik,
    stride_cb, stride_cs,
    HAS_TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The k = min(topk, candidates) highest keys of scores[r, i, :reach], lower position first
    among equal keys, written in position order, then -1."""
    i_b = (tl.program_id(0) // s_q).to(tl.int64)
    i_s = (tl.program_id(0) % s_q).to(tl.int64)
    p_s = scores_ptr + i_b * stride_sb + i_s * stride_ss
    p_idx = indices_ptr + i_b * stride_ib + i_s * stride_is

    k = tl.minimum(_count_at_least(p_s, reach, stride_sn, KEY_NONE + 1, BLOCK), topk)
    # t (offset key): the largest with count(key + KEY_OFFSET >= t) >= k, digit by digit. Digit
    # 0 keeps the current t, which always qualifies (at t = 0 every key counts); counts fall
    # as the digit grows, so the largest qualifying digit is how many qualify, minus one.
    # k = 0 qualifies everywhere: t ends at the top, at or above every key, and nothing is kept.
    o_d = tl.arange(0, RADIX).to(tl.int64)
    offset = tl.full([], KEY_OFFSET, tl.int64)  # 2^31 as an int64 (a bare literal is uint32)
    t = tl.zeros([], dtype=tl.int64)
    for i in range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (i + 1)
        b_count = _count_at_least_each(p_s, reach, stride_sn, t + (o_d << shift) - offset, BLOCK)
        t += (tl.sum((b_count >= k).to(tl.int64), 0) - 1) << shift
    threshold = t - offset  # the k-th largest key
    # keys equal to the threshold that are kept: the first ones by position
    ties = k - _count_at_least(p_s, reach, stride_sn, threshold + 1, BLOCK)

    written = tl.zeros([], dtype=tl.int32)
    equal_so_far = tl.zeros([], dtype=tl.int32)
    for n0 in range(0, reach, BLOCK):
        o_n = n0 + tl.arange(0, BLOCK)
        b_key = _topk_keys(p_s, n0, reach, stride_sn, BLOCK)
        b_eq = (b_key == threshold).to(tl.int32)
        b_rank = equal_so_far + tl.cumsum(b_eq, 0) - b_eq  # equal keys before this one
        b_keep = ((b_key > threshold) | ((b_eq == 1) & (b_rank < ties))).to(tl.int32)
        o_out = written + tl.cumsum(b_keep, 0) - b_keep
        b_val = o_n.to(tl.int64)
        if HAS_TABLE:
            p_page = block_table_ptr + i_b * stride_tb + (o_n // page_size) * stride_tn
            i_page = tl.load(p_page, mask=b_keep == 1, other=0)
            b_val = i_page.to(tl.int64) * page_size + o_n % page_size
        tl.store(p_idx + o_out.to(tl.int64) * stride_ik, b_val.to(tl.int32), mask=b_keep == 1)
        written += tl.sum(b_keep, 0)
        equal_so_far += tl.sum(b_eq, 0)
    for k0 in range(0, topk, BLOCK):
        o_k = k0 + tl.arange(0, BLOCK)
        tl.store(p_idx + o_k.to(tl.int64) * stride_ik, tl.full([BLOCK], -1, tl.int32), mask=(o_k >= k) & (o_k < topk))
    tl.store(counts_ptr + i_b * stride_cb + i_s * stride_cs, k)


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
    """Lightning-indexer scores of every cached position for every query token.

        score[r, i, j] = sum_h weights[r, i, h] * relu(q[r, i, h, :] . k[r, j, :])

    Args:
        q: [b, s_q, heads, dim] indexer queries (roped), bfloat16 / float16 / float32.
        weights: float32 [b, s_q, heads], per-head weights with every scale folded in.
        index_cache: [num_pages, page_size, 1, dim] in q's dtype; FP8 (is_fp8): uint8 or
            float8_e4m3fn [num_pages, page_size, 1, row_width] rows of
            `mla.formats.index_key_format("fp8", dim)` (codes, then one float32 scale per 128
            channels; 132 bytes for 128), dequantized exactly on load. MXFP4 (is_fp4): uint8
            [num_pages, page_size, 1, row_width] rows of `mla.formats.Mxfp4KeyFormat(dim)`
            (DeepSeek-V4's indexer keys: dim / 2 bytes of e2m1 nibbles, then one UE8M0 scale
            per 32 channels; 68 bytes for 128; dim a multiple of 32), dequantized exactly.
        block_table: int32 [b, max_pages]: position j of row r is row j % page_size of page
            block_table[r, j // page_size]; entries past a row's last page are never read.
        cache_seqlens: int32 [b], L_r: cached tokens per row, this step's queries included.
        max_seqlen: int >= max(cache_seqlens), the scores' width (known on the host; no device
            value is read to find it).
        seqlens_q: int32 [b] or None: row r's queries are its first n_r = seqlens_q[r] columns
            (the rest of q is padding, never read); None: n_r = s_q.
        is_fp8: index_cache holds FP8 rows.
        is_fp4: index_cache holds MXFP4 rows (not with is_fp8: ValueError).

    Returns:
        float32 [b, s_q, max_seqlen]: the score where query i of row r sees position j (i < n_r,
        j < L_r and j <= L_r - n_r + i: query i is the token at position L_r - n_r + i), -inf
        everywhere else (padding queries are all -inf). Products and sums in float32: the dot
        runs in q's dtype with float32 accumulation when the keys are exact in it (plain keys;
        FP8 and MXFP4 keys under bfloat16), else in float32; a NaN or inf in a visible key reaches its
        score. Value checks as `mla.reference.contract`'s: on CPU tensors only; unchecked page
        ids outside the cache are skipped (-inf), never read.
    """
    call = check_index_scores_args(q, weights, index_cache, block_table, cache_seqlens, max_seqlen, seqlens_q, is_fp8,
                                   is_fp4)  # fmt: skip
    require_triton_device(q.device, "mla.reference.index_scores")
    fmt = call.fmt
    out = torch.empty(call.b, call.s_q, call.max_seqlen, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    interpret = interpreting()
    arch = _target_arch()
    cut = scores_tiles(arch)
    # bfloat16 holds every dequantized FP8 or MXFP4 key exactly (power-of-two scales); float16
    # does not. The interpreter computes bfloat16 dots wrongly: everything in float32 there.
    quantized = is_fp8 or is_fp4
    exact_in_q = not quantized or q.dtype == torch.bfloat16
    cache = index_cache.view(torch.uint8) if quantized else index_cache
    # MXFP4 codes as int32 words need 4-byte aligned rows (68 bytes per 128 channels)
    fp4_words = is_fp4 and cache.stride(3) == 1 and all(x % 4 == 0 for x in (*cache.stride()[:2],
                                                                             cache.storage_offset()))  # fmt: skip
    grid = (call.b * call.s_q, triton.cdiv(call.max_seqlen, cut.block_n * cut.blocks))
    _index_scores_kernel[grid](
        q, weights, cache, block_table, cache_seqlens, seqlens_q, out,
        call.s_q, call.heads, call.dim, call.page_size, call.num_pages, block_table.shape[1], call.max_seqlen,
        fmt.scale_offset if quantized else 0, fmt.num_blocks if is_fp4 else fmt.num_tiles if is_fp8 else 1,
        *q.stride(), *weights.stride(), cache.stride(0), cache.stride(1), cache.stride(3), *block_table.stride(),
        *out.stride(),
        IS_FP8=is_fp8,
        IS_FP4=is_fp4,
        FP4_WORDS=fp4_words,
        SOFT_E4M3=arch is not None and arch < 89,
        DOT_IN_Q_DTYPE=exact_in_q and not interpret,
        BLOCK_H=_block_d(call.heads),
        BLOCK_D=_block_d(call.dim),
        BLOCK_N=cut.block_n,
        BLOCKS=cut.blocks,
        BLOCK_T=triton.next_power_of_2(fmt.num_tiles) if is_fp8 else 1,
        num_warps=cut.num_warps,
        num_stages=cut.num_stages,
    )  # fmt: skip
    return out


def index_topk(
    scores: torch.Tensor,
    topk: int,
    block_table: torch.Tensor | None = None,
    page_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k positions of each row of scores, as a sparse decode's slot list.

    Candidates are the positions whose score is neither -inf nor NaN (NaN counts as not
    visible; +inf ranks highest; -0.0 equals 0.0). Each (r, i) selects its
    min(topk, candidates) highest scores; among equal scores the lower position wins, so the
    selection is deterministic and identical in both twins.

    Args:
        scores: float32 [b, s_q, n], e.g. `index_scores`' (-inf: not visible, never selected).
        topk: int >= 1, positions to select per query token.
        block_table: int32 [b, max_pages] or None: with it (and page_size) the selected
            positions are written as flat cache slots block_table[r, j // page_size] *
            page_size + j % page_size, the `indices` of `flash_mla_with_kvcache`; positions at
            or past max_pages * page_size, which no table entry covers, are not candidates.
        page_size: int >= 1, the index cache's page size; given with block_table only.

    Returns:
        indices: int32 [b, s_q, topk]: the selected positions (or slots) in ascending position
            order, then -1 (skipped by sparse decode) after the last.
        counts: int32 [b, s_q]: how many entries of indices are selected, min(topk, candidates).

    Cost: 11 passes over each row's scores (count, 8 digits of the k-th largest, count above
    it, select).
    """
    call = check_topk_args(scores, topk, block_table, page_size)
    require_triton_device(scores.device, "mla.reference.index_topk")
    indices = torch.empty(call.b, call.s_q, call.topk, dtype=torch.int32, device=scores.device)
    counts = torch.empty(call.b, call.s_q, dtype=torch.int32, device=scores.device)
    if counts.numel() == 0:
        return indices, counts
    table_strides = block_table.stride() if block_table is not None else (0, 0)
    _index_topk_kernel[(call.b * call.s_q,)](
        scores, block_table, indices, counts,
        call.s_q, call.reach, call.topk, call.page_size or 1,
        *scores.stride(), *table_strides, *indices.stride(), *counts.stride(),
        BLOCK=topk_block(_target_arch()),
        num_warps=4,
    )  # fmt: skip
    return indices, counts
