"""Triton quantize-on-write kernel for the paged FP8 latent cache.

Twin of `mla.reference.quant.write_latent_fp8`; the byte layout and the quantization rule
belong to `mla.formats.Fp8Format`, which also hands the kernel its tile and byte offsets.
The kernel is bit-exact with the reference.

Every byte is computed with integer arithmetic and stored through a uint8 pointer, instead
of casting to `tl.float8e4nv` and storing through float8 / float32 / bfloat16 views:
  - the Triton interpreter's fp32 -> fp8e4nv cast is wrong (Triton 3.7.1: when rounding up
    crosses a power of two the carry is lost, e.g. 31.6 -> 16 instead of 32, and ties do not
    go to even), while integer rounding is exact on every backend;
  - fp8e4nv needs sm_89+, the integer path runs on any GPU;
  - the interpreter's bf16 -> fp32 conversion is wrong for all 254 bf16 subnormals (it
    flushes or garbles them), so bf16 inputs are loaded as int16 bits and widened by a shift;
  - byte stores need no alignment of the page rows or their strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mla.reference.cache import check_write_args

from mla.backend import require_triton_device
from mla.formats import FP8_NAN_CODE, MAX_SCALE_EXPONENT, MIN_SCALE_EXPONENT, TOP_SCALE_MAX_CODE, Fp8Format

# Tokens per program: a [BLOCK_T, tile] = 16 x 128 fp32 block fits in registers, and small
# decode batches still spread over n_tokens / 16 x (kv_lora_rank / 128) programs.
BLOCK_T = 16

_NAN_CODE = tl.constexpr(FP8_NAN_CODE)
_MIN_EXP = tl.constexpr(MIN_SCALE_EXPONENT)
_MAX_EXP = tl.constexpr(MAX_SCALE_EXPONENT)
_TOP_MAX_CODE = tl.constexpr(TOP_SCALE_MAX_CODE)


@triton.jit
def _e4m3_code(y):
    """float32 y with |y| <= 448 -> float8_e4m3fn bits (int32), rounded to nearest even.

    e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; normals from 2 ** -6, subnormals
    are multiples of 2 ** -9.
    """
    b_bits = y.to(tl.int32, bitcast=True)
    b_sign = (b_bits >> 24) & 0x80
    b_abs = b_bits & 0x7FFFFFFF
    # Normal range |y| >= 2 ** -6 (biased fp32 exponent >= 121): drop 20 mantissa bits with
    # round-half-even; a carry out of the mantissa bumps the exponent, which is what we want.
    b_round = b_abs + 0x7FFFF + ((b_abs >> 20) & 1)
    b_normal = (b_round >> 20) - (120 << 3)
    # Subnormal range: adding 2 ** 14 (whose float32 ulp is 2 ** -9) rounds |y| to a multiple
    # of 2 ** -9 with the hardware's round-half-even; the low bits then count those steps
    # (0..8, where 8 is the smallest normal, code 0x08). The add acts on a value rebuilt from
    # integer bits, so it cannot be fused with the multiply that produced y.
    b_sub = (b_abs.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    return b_sign | tl.where(b_abs >= (121 << 23), b_normal, b_sub)


@triton.jit
def _bf16_bits(x):
    """float32 -> bfloat16 bits (int32 in [0, 0xFFFF]), round-half-even, NaN -> 0x7FC0.

    Integer rounding because the interpreter truncates fp32 -> bf16.
    """
    b_bits = x.to(tl.int32, bitcast=True)
    b_round = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, b_round & 0xFFFF)


@triton.jit
def _write_latent_fp8_kernel(
    pages,  # uint8 [num_pages, page_size, 1, bytes]
    slots,  # int64 [n]
    kv,  # [n, KV_LORA_RANK] int16 bits of bf16, or fp16 / fp32
    k_pe,  # [n, ROPE_DIM] int16 bits of bf16, or fp16 / fp32
    n_tokens,
    num_slots,
    page_size,
    s_page,
    s_row,
    s_byte,
    s_slot,
    s_kv_t,
    s_kv_c,
    s_pe_t,
    s_pe_c,
    KV_LORA_RANK: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    TILE: tl.constexpr,
    SCALE_OFFSET: tl.constexpr,
    ROPE_OFFSET: tl.constexpr,
    KV_IS_BF16: tl.constexpr,
    KPE_IS_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_TILE: tl.constexpr,
    BLOCK_PE: tl.constexpr,
):
    """Quantize tile i_tile of BLOCK_T tokens and store codes, scale and (tile 0 only) k_pe.

    scale = 2 ** max(ceil(log2(amax / 448)), -117), or 1 when amax == 0 (rule and edge cases
    in `mla.reference.quant`), built from exponent bits: with amax = m * 2 ** E, m in [1, 2),
    amax / 448 = (m / 1.75) * 2 ** (E - 8), so the exponent is E - 8, plus 1 when m > 1.75
    (mantissa bits > 0x600000). x / scale is computed as x * (1 / scale), both exact.
    """
    tl.static_assert(KV_LORA_RANK % TILE == 0)
    i_t = tl.program_id(0).to(tl.int64)
    i_tile = tl.program_id(1).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BT]
    b_slot = tl.load(slots + o_t * s_slot, mask=o_t < n_tokens, other=-1)  # [BT]
    # Out-of-range slots are skipped: on CUDA the host does not read slot values (no sync).
    m_t = (o_t < n_tokens) & (b_slot >= 0) & (b_slot < num_slots)
    o_row = (b_slot // page_size) * s_page + (b_slot % page_size) * s_row  # [BT]

    o_c = tl.arange(0, BLOCK_TILE).to(tl.int64)
    o_kv = i_tile * TILE + o_c  # [BTILE] latent channel
    m_kv = m_t[:, None] & (o_c < TILE)[None, :]  # [BT, BTILE]
    p_kv = kv + o_t[:, None] * s_kv_t + o_kv[None, :] * s_kv_c
    if KV_IS_BF16:
        b_x = (tl.load(p_kv, mask=m_kv, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        b_x = tl.load(p_kv, mask=m_kv, other=0.0).to(tl.float32)
    b_abs = tl.abs(b_x)
    b_finite = b_abs <= 3.4028234663852886e38  # False for NaN and +-inf
    b_poison = tl.max(tl.where(b_finite, 0, 1), axis=1) > 0  # [BT]
    b_amax = tl.max(tl.where(b_finite, b_abs, 0.0), axis=1)  # [BT]

    b_amax_bits = b_amax.to(tl.int32, bitcast=True)
    b_exp = (b_amax_bits >> 23) - 127 - 8 + ((b_amax_bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    b_exp = tl.where(b_amax == 0.0, 0, tl.maximum(b_exp, _MIN_EXP))  # [BT]
    b_scale_bits = tl.where(b_poison, 0x7FC00000, (b_exp + 127) << 23)  # [BT] float32 bits
    b_inv_scale = ((127 - b_exp) << 23).to(tl.float32, bitcast=True)  # exact 1 / scale

    # Non-finite values are zeroed first: their tile is poisoned below whatever they would give.
    b_code = _e4m3_code(tl.where(b_finite, b_x, 0.0) * b_inv_scale[:, None])  # [BT, BTILE]
    # Under the largest scale code 256 would dequantize to 2 ** 128 = inf: saturate at 240.
    m_top = (b_exp == _MAX_EXP)[:, None] & ((b_code & 0x7F) > _TOP_MAX_CODE)
    b_code = tl.where(m_top, (b_code & 0x80) | _TOP_MAX_CODE, b_code)
    b_code = tl.where(b_poison[:, None], _NAN_CODE, b_code)
    tl.store(pages + o_row[:, None] + o_kv[None, :] * s_byte, b_code.to(tl.uint8), mask=m_kv)

    # float32 scale as 4 little-endian bytes at SCALE_OFFSET + 4 * i_tile.
    o_b = tl.arange(0, 4)
    b_scale_bytes = (b_scale_bits[:, None] >> (8 * o_b)[None, :]) & 0xFF  # [BT, 4]
    o_scale = SCALE_OFFSET + 4 * i_tile + o_b.to(tl.int64)
    tl.store(pages + o_row[:, None] + o_scale[None, :] * s_byte, b_scale_bytes.to(tl.uint8), mask=m_t[:, None])

    # k_pe as little-endian bfloat16 after the scales; written by the tile-0 programs only.
    o_pe = tl.arange(0, BLOCK_PE).to(tl.int64)
    m_pe = m_t[:, None] & (o_pe < ROPE_DIM)[None, :] & (i_tile == 0)  # [BT, BPE]
    p_pe = k_pe + o_t[:, None] * s_pe_t + o_pe[None, :] * s_pe_c
    if KPE_IS_BF16:
        b_pe = tl.load(p_pe, mask=m_pe, other=0).to(tl.int32) & 0xFFFF  # copied bit for bit
    else:
        b_pe = _bf16_bits(tl.load(p_pe, mask=m_pe, other=0.0).to(tl.float32))
    o_pe_byte = ROPE_OFFSET + 2 * o_pe
    p_out = pages + o_row[:, None] + o_pe_byte[None, :] * s_byte
    tl.store(p_out, (b_pe & 0xFF).to(tl.uint8), mask=m_pe)
    tl.store(p_out + s_byte, (b_pe >> 8).to(tl.uint8), mask=m_pe)


def write_latent_fp8(pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Quantize tokens and store them into a paged FP8 cache, in place (bit-exact with the reference).

    Args:
        pages: uint8 (or float8_e4m3fn) [num_pages, page_size, 1, fp8_bytes_per_token(r, dr)];
            any strides.
        slots: int64 [n] distinct flat slots (page * page_size + offset); any stride. Checked
            on the host when on the CPU; on CUDA the kernel skips out-of-range slots.
        latent: [n, r] latent, bfloat16 / float16 / float32; any strides.
        k_pe: [n, dr], bfloat16 / float16 / float32 (stored as bfloat16); any strides.

    Returns:
        pages, modified in place.

    Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
    """
    fmt, raw = check_write_args(pages, slots, latent, k_pe, fp8=True)
    require_triton_device(raw.device, "mla.reference.write_latent_fp8")
    launch(fmt, raw, slots, latent, k_pe)
    return pages


def launch(fmt: Fp8Format, pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
    """The kernel launch alone, for callers that validated the arguments (pages: the uint8 view)."""
    n = slots.shape[0]
    if n == 0:
        return
    # bf16 inputs travel as raw 16-bit words: the interpreter's bf16 -> fp32 conversion
    # flushes subnormals, and k_pe's NaN payloads then survive as in torch's copy.
    kv_is_bf16 = latent.dtype == torch.bfloat16
    kpe_is_bf16 = k_pe.dtype == torch.bfloat16
    kv_arg = latent.view(torch.int16) if kv_is_bf16 else latent
    k_pe_arg = k_pe.view(torch.int16) if kpe_is_bf16 else k_pe
    grid = (triton.cdiv(n, BLOCK_T), fmt.num_tiles)
    _write_latent_fp8_kernel[grid](
        pages, slots, kv_arg, k_pe_arg, n, pages.shape[0] * pages.shape[1], pages.shape[1],
        pages.stride(0), pages.stride(1), pages.stride(3), slots.stride(0),
        latent.stride(0), latent.stride(1), k_pe.stride(0), k_pe.stride(1),
        KV_LORA_RANK=fmt.kv_lora_rank,
        ROPE_DIM=fmt.rope_dim,
        TILE=fmt.tile,
        SCALE_OFFSET=fmt.scale_offset,
        ROPE_OFFSET=fmt.rope_offset,
        KV_IS_BF16=kv_is_bf16,
        KPE_IS_BF16=kpe_is_bf16,
        BLOCK_T=BLOCK_T,
        BLOCK_TILE=triton.next_power_of_2(fmt.tile),
        BLOCK_PE=triton.next_power_of_2(fmt.rope_dim),
    )  # fmt: skip
