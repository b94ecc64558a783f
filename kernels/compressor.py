"""DeepSeek-V4's token compressor in Triton: the twin of `mla.reference.compressor` (the math,
its sources and the argument checks live there).

One program per entry. It walks its window BLOCK_T tokens at a time with a per-channel online
softmax (running max, running sum, running weighted sum, all float32), so a 128-token HCA
window never sits in registers at once; a CSA entry walks its two series in turn (the previous
window's Ca half, then its own Cb half). Then RMSNorm over the row, RoPE on the last rope_dim
channels, and the store: a plain row, or FlashMLA's FP8 "MODEL1" page layout
(`mla.formats.Model1Format`): e4m3 codes per 64-channel tile with a UE8M0 scale, bfloat16 rope
values, every byte built with integer arithmetic as in `mla.kernels.quant`.

Channels are held as [pairs, 2] blocks (channel 2p + k at [p, k]): RoPE rotates the pairs
(2i, 2i + 1), and tl.split / tl.join give the two members without a shuffle through memory.

Where the kernel may differ from the reference: float32 rounding of the pooling (online vs
torch's two-pass softmax), of the norm and of RoPE (the compiler may fuse x0 cos - x1 sin into
an FMA), so after rounding to bfloat16 an element can land one bfloat16 step away. The FP8
scale is the exact 2 ** ceil(log2(r)) of r = max(amax / 448, 1e-4) (r by IEEE division, as
torch's float32 division); `Model1Format.pack` takes ceil of torch's float32 log2, which for r
one to a few ulps above 2 ** k returns k (seen on the CPU for k <= -5 and k >= 7), so pack
picks the scale half as large for such a tile, its codes then saturating at 448. Random data
does not meet this; the cache reads back within one e4m3 step either way.
A tile holding NaN or inf gets scale byte 0xFF (reads back NaN) like pack, and codes 0x7F.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mla.backend import require_triton_device
from mla.formats import Model1Format
from mla.reference.compressor import CompressShape, check_compress_args, check_write_args

from .quant import _bf16_bits, _e4m3_code

FP32_MAX = tl.constexpr(3.4028234663852886e38)
E4M3_MAX = tl.constexpr(448.0)
E4M3_NAN = tl.constexpr(0x7F)
UE8M0_NAN = tl.constexpr(0xFF)
ROUND_BF16 = tl.constexpr(1)
ROUND_FP16 = tl.constexpr(2)
_ROUNDING = {torch.float32: 0, torch.bfloat16: ROUND_BF16.value, torch.float16: ROUND_FP16.value}


@triton.jit
def _load_f32(p, mask, IS_BF16: tl.constexpr):
    """float32 of a masked load (0 where masked); bfloat16 arrives as int16 bits and is widened
    by a shift, since the interpreter's bf16 -> fp32 conversion garbles subnormals."""
    if IS_BF16:
        return (tl.load(p, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(p, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _round(x, ROUND: tl.constexpr):
    """float32 x rounded to the activation dtype (nearest even) and back."""
    if ROUND == ROUND_BF16:
        return (_bf16_bits(x) << 16).to(tl.float32, bitcast=True)
    elif ROUND == ROUND_FP16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _pool_series(b_m, b_l, b_acc, p_kv, p_gate, p_bias, s_kv_t, s_kv_c, s_gate_t, s_gate_c, s_bias_t, s_bias_c,
                 o_c, m_c, n_tokens, IS_BF16: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """Fold n_tokens tokens (values p_kv, logits p_gate + p_bias, channels o_c [BP, 2]) into
    the per-channel online softmax state b_m, b_l, b_acc [BP, 2]."""
    for t0 in range(0, n_tokens, BLOCK_T):
        o_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        m_tc = (o_t < n_tokens)[:, None, None] & m_c[None, :, :]  # [BT, BP, 2]
        b_v = _load_f32(p_kv + o_t[:, None, None] * s_kv_t + o_c[None, :, :] * s_kv_c, m_tc, IS_BF16)
        b_z = _load_f32(p_gate + o_t[:, None, None] * s_gate_t + o_c[None, :, :] * s_gate_c, m_tc, IS_BF16)
        b_z += tl.load(p_bias + o_t[:, None, None] * s_bias_t + o_c[None, :, :] * s_bias_c, mask=m_tc, other=0.0)
        b_z = tl.where(m_tc, b_z, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_z, 0))
        # a channel that has seen only -inf keeps max -inf; shift by 0 there so exp gives 0, not NaN
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp(b_z - b_shift[None, :, :])
        b_alpha = tl.exp(b_m - b_shift)
        b_l = b_l * b_alpha + tl.sum(b_p, 0)
        b_acc = b_acc * b_alpha + tl.sum(b_p * b_v, 0)
        b_m = b_m_new
    return b_m, b_l, b_acc


@triton.jit
def _store_fp8(p_row_data, p_row_scale, b_x, o_c, D: tl.constexpr, ROPE_DIM: tl.constexpr, TILE: tl.constexpr,
               BLOCK_P: tl.constexpr, SCALE_BYTES: tl.constexpr):  # fmt: skip
    """One Model1Format token: e4m3 codes of channels [0, D - ROPE_DIM) with one UE8M0 scale per
    TILE channels, bfloat16 rope values, scale bytes and a zero pad byte."""
    NOPE: tl.constexpr = D - ROPE_DIM
    NUM_TILES: tl.constexpr = NOPE // TILE
    ROWS: tl.constexpr = 2 * BLOCK_P // TILE
    m_nope = o_c < NOPE
    b_abs = tl.where(m_nope, tl.abs(b_x), 0.0)
    b_finite = b_abs <= FP32_MAX  # False for NaN and +-inf
    # [BP, 2] -> [tiles, TILE]: row-major, so row t holds channels t * TILE .. (t + 1) * TILE - 1
    b_amax = tl.max(tl.reshape(b_abs, [ROWS, TILE]), 1)
    b_poison = tl.max(tl.reshape(tl.where(b_finite, 0, 1), [ROWS, TILE]), 1) > 0
    b_r = tl.maximum(tl.math.div_rn(b_amax, E4M3_MAX), 1e-4)
    b_r_bits = b_r.to(tl.int32, bitcast=True)
    # ceil(log2 r) of a normal float32 r >= 1e-4: its exponent, plus one unless a power of two
    b_exp = (b_r_bits >> 23) - 127 + ((b_r_bits & 0x7FFFFF) != 0).to(tl.int32)  # [ROWS]
    b_inv = ((127 - b_exp) << 23).to(tl.float32, bitcast=True)  # exact 2 ** -exp
    b_inv_c = tl.reshape(tl.broadcast_to(b_inv[:, None], [ROWS, TILE]), [BLOCK_P, 2])
    b_poison_c = tl.reshape(tl.broadcast_to(b_poison[:, None], [ROWS, TILE]), [BLOCK_P, 2])
    b_code = tl.where(b_poison_c, E4M3_NAN, _e4m3_code(tl.where(b_finite, b_x, 0.0) * b_inv_c))
    tl.store(p_row_data + o_c, b_code.to(tl.uint8), mask=m_nope)

    m_rope = (o_c >= NOPE) & (o_c < D)
    b_bits = _bf16_bits(b_x)
    o_rope = NOPE + 2 * (o_c - NOPE)
    tl.store(p_row_data + o_rope, (b_bits & 0xFF).to(tl.uint8), mask=m_rope)
    tl.store(p_row_data + o_rope + 1, (b_bits >> 8).to(tl.uint8), mask=m_rope)

    o_s = tl.arange(0, ROWS)
    b_scale = tl.where(b_poison, UE8M0_NAN, b_exp + 127)
    tl.store(p_row_scale + o_s, tl.where(o_s < NUM_TILES, b_scale, 0).to(tl.uint8), mask=o_s < SCALE_BYTES)


@triton.heuristics(
    {
        "HAS_PREV": lambda a: a["prev_kv"] is not None,
        "HAS_SLOTS": lambda a: a["slots"] is not None,
    }
)
@triton.jit
def _compress_kernel(
    kv, gate,  # [n, m, W]: bf16 as int16 bits, fp16, fp32
    bias,  # float32 [m, W]
    norm_weight,  # float32 [D]
    cos, sin,  # float32 [n, ROPE_DIM // 2]
    prev_kv, prev_gate,  # [m, D] like kv (None: no previous window)
    slots,  # int64 [n] (None: entry i goes to row i)
    out,  # plain: [rows, ...] of D values; FP8: uint8 pages [num_pages, page_bytes]
    m, page_size, eps,
    s_kv_n, s_kv_t, s_kv_c, s_gate_n, s_gate_t, s_gate_c, s_bias_t, s_bias_c, s_cos_n, s_sin_n,
    s_prev_kv_t, s_prev_kv_c, s_prev_gate_t, s_prev_gate_c, s_slot,
    s_out_page, s_out_row, s_out_c,
    D: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    OVERLAP: tl.constexpr,
    IS_BF16: tl.constexpr,
    ROUND: tl.constexpr,
    IS_FP8: tl.constexpr,
    TILE: tl.constexpr,
    DATA_BYTES: tl.constexpr,
    SCALE_BYTES: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Entry i = RoPE(RMSNorm(sum over the window's slots of softmax(logits) * values))."""
    i_n = tl.program_id(0).to(tl.int64)
    o_p = tl.arange(0, BLOCK_P)
    o_c = (2 * o_p[:, None] + tl.arange(0, 2)[None, :]).to(tl.int64)  # [BP, 2] channel 2p + k
    m_c = o_c < D

    b_m = tl.full([BLOCK_P, 2], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_P, 2], tl.float32)
    b_acc = tl.zeros([BLOCK_P, 2], tl.float32)
    if OVERLAP:
        # Ca: the first D channels of the previous window (absent for a sequence's first window)
        if i_n > 0:
            b_m, b_l, b_acc = _pool_series(b_m, b_l, b_acc, kv + (i_n - 1) * s_kv_n, gate + (i_n - 1) * s_gate_n, bias,
                                           s_kv_t, s_kv_c, s_gate_t, s_gate_c, s_bias_t, s_bias_c, o_c, m_c, m,
                                           IS_BF16, BLOCK_T)  # fmt: skip
        elif HAS_PREV:
            b_m, b_l, b_acc = _pool_series(b_m, b_l, b_acc, prev_kv, prev_gate, bias, s_prev_kv_t, s_prev_kv_c,
                                           s_prev_gate_t, s_prev_gate_c, s_bias_t, s_bias_c, o_c, m_c, m,
                                           IS_BF16, BLOCK_T)  # fmt: skip
        # Cb: channels D .. 2D - 1 of this window
        b_m, b_l, b_acc = _pool_series(b_m, b_l, b_acc, kv + i_n * s_kv_n + D * s_kv_c,
                                       gate + i_n * s_gate_n + D * s_gate_c, bias + D * s_bias_c, s_kv_t, s_kv_c,
                                       s_gate_t, s_gate_c, s_bias_t, s_bias_c, o_c, m_c, m, IS_BF16,
                                       BLOCK_T)  # fmt: skip
    else:
        b_m, b_l, b_acc = _pool_series(b_m, b_l, b_acc, kv + i_n * s_kv_n, gate + i_n * s_gate_n, bias,
                                       s_kv_t, s_kv_c, s_gate_t, s_gate_c, s_bias_t, s_bias_c, o_c, m_c, m,
                                       IS_BF16, BLOCK_T)  # fmt: skip
    b_x = _round(tl.where(m_c, tl.math.div_rn(b_acc, tl.where(m_c, b_l, 1.0)), 0.0), ROUND)  # [BP, 2]

    b_ms = tl.sum(tl.sum(b_x * b_x, 1), 0) / D
    b_rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(b_ms + eps))
    b_w = tl.load(norm_weight + o_c, mask=m_c, other=0.0)
    b_x = _round(b_w * (b_x * b_rstd), ROUND)

    # RoPE on pairs p >= (D - ROPE_DIM) / 2, with cos / sin of pair p - (D - ROPE_DIM) / 2
    o_r = o_p - (D - ROPE_DIM) // 2
    m_r = (o_r >= 0) & (o_p < D // 2)
    b_cos = tl.load(cos + i_n * s_cos_n + o_r, mask=m_r, other=1.0)
    b_sin = tl.load(sin + i_n * s_sin_n + o_r, mask=m_r, other=0.0)
    b_x0, b_x1 = tl.split(b_x)
    b_rot = _round(tl.join(b_x0 * b_cos - b_x1 * b_sin, b_x0 * b_sin + b_x1 * b_cos), ROUND)
    b_x = tl.where(m_r[:, None], b_rot, b_x)

    i_slot = i_n
    if HAS_SLOTS:
        i_slot = tl.load(slots + i_n * s_slot)
    o_page = (i_slot // page_size) * s_out_page
    i_row = i_slot % page_size
    if IS_FP8:
        p_data = out + o_page + i_row * DATA_BYTES
        p_scale = out + o_page + page_size * DATA_BYTES + i_row * SCALE_BYTES
        _store_fp8(p_data, p_scale, b_x, o_c, D, ROPE_DIM, TILE, BLOCK_P, SCALE_BYTES)
    else:
        tl.store(out + o_page + i_row * s_out_row + o_c * s_out_c, b_x.to(out.dtype.element_ty), mask=m_c)


def _launch(shape: CompressShape, out, slots, page_size, fp8, kv, gate, bias, norm_weight, cos, sin, prev_kv,
            prev_gate, eps, dtype, s_out_page, s_out_row, s_out_c) -> None:  # fmt: skip
    """Pass bf16 inputs as int16 bits, launch one program per entry."""
    if shape.n == 0:
        return
    is_bf16 = kv.dtype == torch.bfloat16
    if gate.dtype != kv.dtype or (prev_kv is not None and {prev_kv.dtype, prev_gate.dtype} != {kv.dtype}):
        # one load path per launch: the inputs' dtypes agree (a copy otherwise)
        gate = gate.to(kv.dtype)
        if prev_kv is not None:
            prev_kv, prev_gate = prev_kv.to(kv.dtype), prev_gate.to(kv.dtype)

    def bits(t):
        return t.view(torch.int16) if t is not None and is_bf16 else t

    kv, gate, prev_kv, prev_gate = bits(kv), bits(gate), bits(prev_kv), bits(prev_gate)
    # small per-call tensors: float32 copies cost nothing and keep one load path
    bias, norm_weight = bias.float(), norm_weight.float().contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    fmt = Model1Format()
    _compress_kernel[(shape.n,)](
        kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, slots, out,
        shape.m, page_size, float(eps),
        *kv.stride(), *gate.stride(), *bias.stride(), cos.stride(0), sin.stride(0),
        *(prev_kv.stride() if prev_kv is not None else (0, 0)),
        *(prev_gate.stride() if prev_gate is not None else (0, 0)),
        slots.stride(0) if slots is not None else 0,
        s_out_page, s_out_row, s_out_c,
        D=shape.head_dim,
        ROPE_DIM=shape.rope_dim,
        OVERLAP=shape.overlap,
        IS_BF16=is_bf16,
        ROUND=_ROUNDING[dtype],
        IS_FP8=fp8,
        TILE=fmt.tile,
        DATA_BYTES=fmt.data_bytes,
        SCALE_BYTES=fmt.scale_bytes,
        BLOCK_T=min(triton.next_power_of_2(shape.m), 8),
        BLOCK_P=triton.next_power_of_2(shape.head_dim // 2 + shape.head_dim % 2),
    )  # fmt: skip


def compress(
    kv: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prev_kv: torch.Tensor | None = None,
    prev_gate: torch.Tensor | None = None,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Compressed entries [n, head_dim] in dtype; arguments as `mla.reference.compressor.compress`
    (any strides). Runs on CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    shape = check_compress_args(kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps, dtype)
    require_triton_device(kv.device, "mla.reference.compress")
    out = torch.empty(shape.n, shape.head_dim, dtype=dtype, device=kv.device)
    _launch(shape, out, None, 1, False, kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps, dtype,
            out.stride(0), 0, out.stride(1))  # fmt: skip
    return out


def write_compressed(
    pages: torch.Tensor,
    page_size: int,
    slots: torch.Tensor,
    kv: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prev_kv: torch.Tensor | None = None,
    prev_gate: torch.Tensor | None = None,
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`compress` stored into a paged cache (plain rows or Model1Format FP8), in place; arguments
    as `mla.reference.compressor.write_compressed`. Returns pages."""
    shape = check_compress_args(kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps,
                                torch.float32 if dtype is None else dtype)  # fmt: skip
    fmt, dtype, slots = check_write_args(pages, page_size, slots, shape, dtype)
    require_triton_device(pages.device, "mla.reference.write_compressed")
    if fmt is not None:
        raw = pages.view(torch.uint8)
        if raw.stride(1) != 1:
            raise ValueError(f"FP8 pages must have contiguous bytes within a page, got strides {tuple(raw.stride())}")
        _launch(shape, raw, slots, page_size, True, kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps,
                dtype, raw.stride(0), 0, 1)  # fmt: skip
    else:
        _launch(shape, pages, slots, page_size, False, kv, gate, bias, norm_weight, cos, sin, prev_kv, prev_gate, eps,
                dtype, pages.stride(0), pages.stride(1), pages.stride(3))  # fmt: skip
    return pages
