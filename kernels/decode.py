"""Fused MLA attention over a paged latent cache (absorbed form, flash-decoding): dense, sparse
(top-k slot lists), a second ("extra") cache in the same softmax, attention sinks, ragged
query lengths, plain rows, DeepSeek-V3's FP8 rows or DeepSeek-V4's FP8 "MODEL1" pages.

In the absorbed form MLA decode is multi-query attention over the latent cache: every query
head of a latent head reads the same [kv_lora_rank + rope] row per token, and the first
head_dim_v channels of that row double as V. So one program holds query rows that share a
latent head and reads each block of key rows once for all of them, for both QK^T and PV:
  - dense calls: all s_q x h_q/h_kv rows of a sequence (tiled by BLOCK_M) share the same
    keys, positions [0, cache_seqlens) through the block table, causal per row;
  - per-token calls (sparse indices or an extra cache): each query token has its own slot
    list, so a program holds the h_q/h_kv rows of one token.
A program walks its key list in blocks: gather the block's slots (block table or indices,
`_block_rows`, one block ahead of the math so the cache loads can be pipelined), load the rows
(`_load_latent`, `_load_rope`: plain or FP8 dequantised on load; `_load_model1`: a MODEL1
token's K = V vector), update the online softmax (`_online_softmax`). The extra cache's
entries follow the main list's in the same walk.
How a launch is cut (tiles, warps, stages) per GPU arch: `decode_tiles`, which the
compiled-code report (`python -m bench.compiled`) checks for spills, MMA kind and pipelining.

The key list is cut into splits (flash-decoding) so a small batch with a long context still
fills the GPU: stage 1 writes a normalised partial output and its log-sum-exp per split,
stage 2 (`_mla_combine_kernel`) merges them and applies the sink. Split boundaries are
computed on the device (`get_mla_metadata`, or on first use of a `FlashMLASchedMeta`) with no
host synchronisation, so a decode step can be captured in a CUDA graph; only the split count
(a grid dimension) is decided on the host, from shapes.

Argument checks: `mla.reference.contract`, shared with the twin `mla.reference.decode`; it
also picks the format (`mla.formats.decode_format`). Byte layout of V3's FP8 rows:
`mla.formats.Fp8Format`, whose offsets and scale count reach the kernel as arguments. MODEL1
(`mla.formats.Model1Format`) is not an array of rows: in a page all tokens' data runs (448 e4m3
codes, 64 bfloat16 rope values) come first, then all their scale runs (7 UE8M0 bytes + pad), so
a key has two pointers, each found by the row addressing with its run's base and step (the
kernel's M1_* constants, the format's numbers); the page stride is passed. In V4, K = V over
all 512 channels: there is no separate rope dot, and the output has the rope channels too.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from mla.backend import interpreting, require_triton_device
from mla.formats import Model1Format
from mla.reference.contract import (
    DecodeCall,
    FlashMLASchedMeta,
    check_decode,
    check_schedule,
    check_sparse_prefill,
    describe,
)

# Split boundaries are multiples of SPLIT_ALIGN keys, so tiles stay aligned, and a split gets
# at least MIN_SPLIT_TOKENS: below that its fixed cost (load Q, write a fp32 partial of
# head_dim_v per row) outweighs the cache it reads.
SPLIT_ALIGN = 64
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64

LN2 = tl.constexpr(math.log(2.0))
RCP_LN2 = tl.constexpr(1.0 / math.log(2.0))
# An e4m3 code's bits placed as fp16 bits read as its value times 2^-8 (exponent biases 7, 15).
E4M3_AS_FP16_SCALE = tl.constexpr(256.0)
# DeepSeek-V4's MODEL1 token (`Model1Format`, the layout's owner): 512 channels, the first 448
# e4m3 codes with one UE8M0 scale per 64, the last 64 bfloat16 rope values; in its page, a
# token's data run is M1_DATA bytes and its scale run M1_SCALE, all scale runs after all data runs.
M1_DIM = tl.constexpr(Model1Format.head_dim)
M1_NOPE = tl.constexpr(Model1Format.nope_dim)
M1_TILE = tl.constexpr(Model1Format.tile)
M1_DATA = tl.constexpr(Model1Format.data_bytes)
M1_SCALE = tl.constexpr(Model1Format.scale_bytes)
# UE8M0 bytes whose float32 value is not the byte shifted into the exponent field: 0 is the
# subnormal 2^-127 (bits 0x00400000), 255 is NaN
UE8M0_ZERO_BITS = tl.constexpr(0x00400000)
F32_NAN_BITS = tl.constexpr(0x7FC00000)
# a bfloat16 is the high half of its float32: the high value of an int32 word as float32 bits
BF16_HIGH = tl.constexpr(-65536)


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    """How a decode launch is cut: query rows per program (block_m), keys per loop step
    (block_n), warps, software-pipeline stages (cache blocks in flight: num_stages - 1), and
    whether FP8 codes are decoded with integer ops (soft_e4m3) or fp8 conversions."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    soft_e4m3: bool


# Tensor-core row tiles: mma.sync needs 16 rows; a Hopper warp-group MMA (wgmma) needs 64 per
# warp group, so on sm_90 a latent head's rows are padded to 64, as FlashMLA does.
MMA_ROWS = 16
WGMMA_ROWS = 64


def decode_tiles(rows: int, is_fp8: bool, arch: int | None, model1: bool = False) -> DecodeTiles:
    """The tiles of a launch with `rows` query rows per latent head, for sm_<arch> (None: the
    interpreter), as the compiled-code report (`python -m bench.compiled`) checks them: no
    register spills with DeepSeek's 512-channel latent, two or more cache blocks in flight,
    and a CTA that fits the arch's shared memory. model1: DeepSeek-V4's MODEL1 pages.

    GPU: 8 warps hold a [32, 512] fp32 accumulator in 64 registers per thread (4 warps need
    128 and spill) and a [64, 512] one in 128; 3 stages keep two cache blocks in flight.
    Blocks of 32 keys on sm_80 (164 KB of shared memory per SM), 16 where memory is tighter:
    sm_86 / sm_89 (100 KB), FP8 (its decoded tile is staged in shared memory too) and the
    64-row Hopper tiles (whose registers are full). MODEL1 builds its 512-channel K = V tile
    from codes, scales and rope in registers: with 32 rows it spills on sm_80 / sm_89 (255
    registers and ~1 KB of spills), with 16 it does not, so there a latent head's rows take
    more programs (each re-reads the keys, from L2)."""
    if arch is None:
        # the interpreter is fastest with few, large tiles
        return DecodeTiles(min(64, max(MMA_ROWS, triton.next_power_of_2(rows))), 64, 4, 1, False)
    if arch >= 90:
        return DecodeTiles(WGMMA_ROWS, 16, 8, 3, False)
    block_m = min(MMA_ROWS if model1 else 32, max(MMA_ROWS, triton.next_power_of_2(rows)))
    tight = arch != 80 or is_fp8
    # sm_80 has no fp8 conversion instructions: its codes are decoded with integer ops
    return DecodeTiles(block_m, 16 if tight else 32, 8, 3, soft_e4m3=arch < 89)


def _target_arch() -> int | None:
    """The compute capability kernels are compiled for (80, 89, 90, ...), None under the
    interpreter. Asked of Triton's active driver: the current CUDA device's on a GPU, the
    stub target's in `bench.compiled` (which compiles without a GPU)."""
    if interpreting():
        return None
    target = triton.runtime.driver.active.get_current_target()
    return target.arch if target.backend == "cuda" else None


def _block_d(channels: int) -> int:
    # tl.dot needs K >= 16; masked loads fill the padding with zeros
    return max(16, triton.next_power_of_2(max(channels, 1)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return os.cpu_count() or 1


@triton.jit
def _row_offsets(i_page, i_off, m_key, stride_kn, stride_kp, o_head):
    """Offsets (elements; bytes for FP8) of the rows at (page, offset in page) [BLOCK_N]; keys
    outside m_key point at page 0 and are never loaded."""
    i_page = tl.where(m_key, i_page, 0)
    return i_page.to(tl.int64) * stride_kn + i_off.to(tl.int64) * stride_kp + o_head


@triton.jit
def _table_rows(p_table, n0, o_n, m_n, m_page, stride_tn, num_blocks, page_size, stride_kn, stride_kp, o_head,
                PAGE_BLOCKS: tl.constexpr):  # fmt: skip
    """Rows of cache positions o_n = n0 + [0, BLOCK_N) of one sequence, through its block table
    row: (offsets, mask of keys to read). Page ids outside the cache are skipped, never read.
    PAGE_BLOCKS: the block lies in one page (page_size a multiple of BLOCK_N, n0 of BLOCK_N),
    so its page id is one scalar load (m_page: the block holds keys), not one per key."""
    if PAGE_BLOCKS:
        i_blk = tl.load(p_table + (n0 // page_size) * stride_tn, mask=m_page, other=-1)
        m_key = m_n & (i_blk >= 0) & (i_blk < num_blocks)
        i_blk = tl.where((i_blk >= 0) & (i_blk < num_blocks), i_blk, 0)
        o_off = (n0 % page_size + tl.arange(0, o_n.shape[0])).to(tl.int64)
        return i_blk.to(tl.int64) * stride_kn + o_off * stride_kp + o_head, m_key
    i_blk = tl.load(p_table + (o_n // page_size) * stride_tn, mask=m_n, other=-1)
    m_key = m_n & (i_blk >= 0) & (i_blk < num_blocks)
    return _row_offsets(i_blk, o_n % page_size, m_key, stride_kn, stride_kp, o_head), m_key


@triton.jit
def _list_rows(p_list, o_n, m_n, stride_ln, num_slots, page_size, stride_kn, stride_kp, o_head):
    """Rows of slot-list entries o_n [BLOCK_N] (slot = page * page_size + offset): (offsets,
    mask of keys to read). -1 and any slot outside the cache are skipped, so nothing outside
    it is ever read, whatever unchecked (GPU) indices hold."""
    i_slot = tl.load(p_list + o_n * stride_ln, mask=m_n, other=-1)
    m_key = m_n & (i_slot >= 0) & (i_slot < num_slots)
    i_slot = tl.where(m_key, i_slot, 0)
    return _row_offsets(i_slot // page_size, i_slot % page_size, m_key, stride_kn, stride_kp, o_head), m_key


@triton.jit
def _block_rows(
    n0, n_start, n_stop, n_main,
    k_ptr, p_keys, stride_key, num_keys, page_size, stride_kn, stride_kp, o_kh, stride_kd,
    x_ptr, p_x, stride_xkey, x_num_slots, x_page_size, stride_xn, stride_xp, o_xh, stride_xd,
    SPARSE: tl.constexpr, HAS_EXTRA: tl.constexpr, PAGE_BLOCKS: tl.constexpr, MODEL1: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The rows of key-list entries [n0, n0 + BLOCK_N) in [n_start, n_stop): (pointers [BLOCK_N],
    scale pointers [BLOCK_N], mask of keys to read, channel strides). Entries below n_main are
    the main list's (k_cache through a slot list if SPARSE, else the block table), the rest the
    extra slot list's (x_ptr's cache), so one loop walks both and one software pipeline streams
    them. MODEL1: the pointers are the tokens' data runs (stride_kp: the data run's bytes) and
    the scale pointers their scale runs; otherwise the scale pointers are the rows'."""
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = (o_n >= n_start) & (o_n < n_stop)
    m_main = m_n & (o_n < n_main)
    if SPARSE:
        o_row, m_key = _list_rows(p_keys, o_n, m_main, stride_key, num_keys, page_size, stride_kn, stride_kp, o_kh)
    else:
        m_page = (n0 < n_stop) & (n0 < n_main)
        o_row, m_key = _table_rows(p_keys, n0, o_n, m_main, m_page, stride_key, num_keys, page_size, stride_kn,
                                   stride_kp, o_kh, PAGE_BLOCKS)  # fmt: skip
    p_row = k_ptr + o_row
    p_sc = p_row
    if MODEL1:
        # the scale runs follow the page's data runs: the same addressing, another base and step
        o_sc_run = page_size * M1_DATA + o_kh
        if SPARSE:
            o_sc, _ = _list_rows(p_keys, o_n, m_main, stride_key, num_keys, page_size, stride_kn, M1_SCALE, o_sc_run)
        else:
            o_sc, _ = _table_rows(p_keys, n0, o_n, m_main, m_page, stride_key, num_keys, page_size, stride_kn,
                                  M1_SCALE, o_sc_run, PAGE_BLOCKS)  # fmt: skip
        p_sc = k_ptr + o_sc
    stride_d = stride_kd
    if HAS_EXTRA:
        o_x = o_n - n_main
        m_x_list = m_n & (o_x >= 0)
        x_row, m_x = _list_rows(p_x, o_x, m_x_list, stride_xkey, x_num_slots, x_page_size, stride_xn, stride_xp, o_xh)
        p_row = tl.where(o_x >= 0, x_ptr + x_row, p_row)
        if MODEL1:
            x_sc, _ = _list_rows(p_x, o_x, m_x_list, stride_xkey, x_num_slots, x_page_size, stride_xn, M1_SCALE,
                                 x_page_size * M1_DATA + o_xh)  # fmt: skip
            p_sc = tl.where(o_x >= 0, x_ptr + x_sc, p_sc)
        else:
            p_sc = p_row
        m_key = m_key | m_x
        stride_d = tl.where(o_x >= 0, stride_xd, stride_kd)[:, None]
    return p_row, p_sc, m_key, stride_d


@triton.jit
def _e4m3_to_f32(b_code, SOFT_E4M3: tl.constexpr):
    """float32 values of float8_e4m3fn codes (int32 holding 0..255), exactly.

    SOFT_E4M3 (GPUs without fp8 conversions, sm_80): integer ops. The sign bit and the 7
    exponent + mantissa bits placed as fp16 bits are the e4m3 value times 2^-8 (biases 7 and
    15), subnormals included, so the fp16 read times 256 is exact. The NaN codes 0x7F / 0xFF
    read as +-480; only poisoned tiles hold them, and their NaN scale makes the product NaN."""
    if SOFT_E4M3:
        b_bits = ((b_code & 0x80) << 8) | ((b_code & 0x7F) << 7)
        return b_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * E4M3_AS_FP16_SCALE
    else:
        return b_code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _load_latent(p_row, m_key, o_dv, m_dv, dv, stride_d, scale_offset, num_tiles,
                 IS_FP8: tl.constexpr, SOFT_E4M3: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """The first dv channels (the latent, also V) of the rows at p_row: [BLOCK_N, BLOCK_DV].

    FP8 (p_row: the rows' bytes): code * tile scale in float32, exact for the power-of-two
    scales of our quantizer. The codes are read as int32 words of 4 and split with shifts:
    Triton's pipeliner streams such a load through a shared-memory ring, while a uint8 load
    whose conversion it moves into both dots' operand layouts is left unpipelined. A row's
    num_tiles scales (float32 at byte scale_offset) are loaded once, [BLOCK_N, BLOCK_T], and
    broadcast over their tiles: every tile is BLOCK_DV // BLOCK_T channels (tile 128, or a
    single tile; the format allows nothing else)."""
    if IS_FP8:
        BLOCK_N: tl.constexpr = p_row.shape[0]
        BLOCK_DV: tl.constexpr = o_dv.shape[0]
        BLOCK_W: tl.constexpr = BLOCK_DV // 4
        o_w = tl.arange(0, BLOCK_W)
        p_w = p_row.to(tl.pointer_type(tl.int32), bitcast=True)  # [BLOCK_N]
        m_w = m_key[:, None] & (o_w < dv // 4)[None, :]  # the format keeps dv a multiple of 4
        b_w = tl.load(p_w[:, None] + o_w[None, :], mask=m_w, other=0)  # [BLOCK_N, BLOCK_W]
        o_t = tl.arange(0, BLOCK_T)
        p_sc = (p_row + scale_offset).to(tl.pointer_type(tl.float32), bitcast=True)  # [BLOCK_N]
        b_sc = tl.load(p_sc[:, None] + o_t[None, :], mask=m_key[:, None] & (o_t < num_tiles)[None, :], other=0.0)
        b_sc = tl.reshape(tl.broadcast_to(b_sc[:, :, None], [BLOCK_N, BLOCK_T, BLOCK_W // BLOCK_T]), [BLOCK_N, BLOCK_W])
        # byte k of word w is channel 4 w + k (little-endian); join stacks on a new last axis,
        # so joining (v0, v2) with (v1, v3) puts byte 2 j + i at [w, j, i]
        b_v0 = _e4m3_to_f32(b_w & 0xFF, SOFT_E4M3) * b_sc
        b_v1 = _e4m3_to_f32((b_w >> 8) & 0xFF, SOFT_E4M3) * b_sc
        b_v2 = _e4m3_to_f32((b_w >> 16) & 0xFF, SOFT_E4M3) * b_sc
        b_v3 = _e4m3_to_f32((b_w >> 24) & 0xFF, SOFT_E4M3) * b_sc
        b_kv = tl.reshape(tl.join(tl.join(b_v0, b_v2), tl.join(b_v1, b_v3)), [BLOCK_N, BLOCK_DV])
    else:
        m = m_key[:, None] & m_dv[None, :]
        b_kv = tl.load(p_row[:, None] + o_dv[None, :] * stride_d, mask=m, other=0.0)
    return b_kv


@triton.jit
def _ue8m0_to_f32(b_e):
    """float32 values 2^(e - 127) of UE8M0 bytes e (int32 holding 0..255), exactly: the byte
    shifted into float32's exponent field, except 0 (the subnormal 2^-127) and 255 (NaN)."""
    b_bits = tl.where(b_e == 0, UE8M0_ZERO_BITS, b_e << 23)
    b_bits = tl.where(b_e == 255, F32_NAN_BITS, b_bits)
    return b_bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_model1(p_row, p_sc, m_key, SOFT_E4M3: tl.constexpr):
    """MODEL1 K = V tile [BLOCK_N, M1_DIM] float32 of the tokens whose data runs start at p_row
    and scale runs at p_sc (byte pointers [BLOCK_N]): channels [0, M1_NOPE) code * scale of
    their M1_TILE-channel tile (exact), the rest the bfloat16 rope values (exact).

    Every run is read as int32 words, split with shifts, as `_load_latent` reads V3's codes:
    word loads are what Triton's pipeliner streams through shared memory (scale bytes read as
    uint8 are not, and cost registers on sm_90). Byte k of code word w is channel 4 w + k;
    the four byte planes are joined at the end. The planes' last M1_TILE // 4 word lanes are
    the rope channels: each plane takes there its share of the rope words (value 4 i + k is in
    word 2 i + k // 2, half k % 2), spread as the scales are, so one [BLOCK_N, 512] operand
    serves both dots, with no concatenation and no masked full-width load."""
    BLOCK_N: tl.constexpr = p_row.shape[0]
    BLOCK_W: tl.constexpr = M1_DIM // 4
    N_TILES: tl.constexpr = M1_DIM // M1_TILE
    TILE_W: tl.constexpr = M1_TILE // 4
    o_w = tl.arange(0, BLOCK_W)
    p_w = p_row.to(tl.pointer_type(tl.int32), bitcast=True)  # [BLOCK_N]
    # all BLOCK_W words: the lanes past the codes read rope bytes, replaced below
    b_w = tl.load(p_w[:, None] + o_w[None, :], mask=m_key[:, None], other=0)  # [BLOCK_N, BLOCK_W]
    # the scale run's 8 bytes (7 scales and the pad, whose tile is the rope's) as 2 words;
    # scale t is byte t % 4 of word t // 4, joined in the codes' order
    o_s = tl.arange(0, N_TILES // 4)
    p_sw = p_sc.to(tl.pointer_type(tl.int32), bitcast=True)  # [BLOCK_N]
    b_sw = tl.load(p_sw[:, None] + o_s[None, :], mask=m_key[:, None], other=0)  # [BLOCK_N, 2]
    b_e = tl.join(tl.join(b_sw & 0xFF, (b_sw >> 16) & 0xFF), tl.join((b_sw >> 8) & 0xFF, (b_sw >> 24) & 0xFF))
    b_sc = _ue8m0_to_f32(tl.reshape(b_e, [BLOCK_N, N_TILES]))
    b_sc = tl.reshape(tl.broadcast_to(b_sc[:, :, None], [BLOCK_N, N_TILES, TILE_W]), [BLOCK_N, BLOCK_W])
    o_r = tl.arange(0, M1_TILE // 2)
    p_r = (p_row + M1_NOPE).to(tl.pointer_type(tl.int32), bitcast=True)  # [BLOCK_N]
    b_r = tl.load(p_r[:, None] + o_r[None, :], mask=m_key[:, None], other=0)  # [BLOCK_N, 32] two rope values each
    b_r02, b_r13 = tl.split(tl.reshape(b_r, [BLOCK_N, TILE_W, 2]))  # words 2 i and 2 i + 1
    m_rope = (o_w >= M1_NOPE // 4)[None, :]
    b_v0 = tl.where(m_rope, _spread_rope(b_r02 << 16, N_TILES), _e4m3_to_f32(b_w & 0xFF, SOFT_E4M3) * b_sc)
    b_v1 = tl.where(m_rope, _spread_rope(b_r02 & BF16_HIGH, N_TILES),
                    _e4m3_to_f32((b_w >> 8) & 0xFF, SOFT_E4M3) * b_sc)  # fmt: skip
    b_v2 = tl.where(m_rope, _spread_rope(b_r13 << 16, N_TILES), _e4m3_to_f32((b_w >> 16) & 0xFF, SOFT_E4M3) * b_sc)
    b_v3 = tl.where(m_rope, _spread_rope(b_r13 & BF16_HIGH, N_TILES),
                    _e4m3_to_f32((b_w >> 24) & 0xFF, SOFT_E4M3) * b_sc)  # fmt: skip
    return tl.reshape(tl.join(tl.join(b_v0, b_v2), tl.join(b_v1, b_v3)), [BLOCK_N, M1_DIM])


@triton.jit
def _spread_rope(b_bits, N_TILES: tl.constexpr):
    """float32 values of bfloat16 bits in the high half of int32 [BLOCK_N, TILE_W], repeated
    over N_TILES tiles as word lanes [BLOCK_N, N_TILES * TILE_W] (only the last tile is used)."""
    BLOCK_N: tl.constexpr = b_bits.shape[0]
    TILE_W: tl.constexpr = b_bits.shape[1]
    b_val = b_bits.to(tl.float32, bitcast=True)
    return tl.reshape(tl.broadcast_to(b_val[:, None, :], [BLOCK_N, N_TILES, TILE_W]), [BLOCK_N, N_TILES * TILE_W])


@triton.jit
def _load_rope(p_row, m_key, o_dr, m_dr, stride_d, rope_offset, IS_FP8: tl.constexpr):
    """The rope channels of the rows at p_row: [BLOCK_N, BLOCK_DR]. FP8: bfloat16 at byte
    rope_offset of the row (a pointer cast, not a division of byte offsets, so the loads keep
    the rows' 16-byte alignment and vectorise); plain: channels rope_offset + [0, d_rope)."""
    m = m_key[:, None] & m_dr[None, :]
    if IS_FP8:
        p_kr = (p_row + rope_offset).to(tl.pointer_type(tl.bfloat16), bitcast=True)  # [BLOCK_N]
        b_kr = tl.load(p_kr[:, None] + o_dr[None, :], mask=m, other=0.0)
    else:
        b_kr = tl.load(p_row[:, None] + (rope_offset + o_dr)[None, :] * stride_d, mask=m, other=0.0)
    return b_kr


@triton.jit
def _online_softmax(b_s, visible, b_kv, b_m, b_l, b_acc, scale_log2, DOT_PRECISION: tl.constexpr):
    """Fold a block of raw scores [BLOCK_M, BLOCK_N] into the running max m, sum l (base 2)
    and output acc [BLOCK_M, BLOCK_DV]."""
    b_s = tl.where(visible, b_s * scale_log2, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    # a row that has seen nothing yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
    b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_alpha = tl.exp2(b_m - b_shift)
    b_p = tl.exp2(b_s - b_shift[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_kv.dtype), b_kv, input_precision=DOT_PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit
def _attend_block(
    b_qv, b_qr, p_row, p_sc, m_key, stride_d, visible, b_m, b_l, b_acc,
    o_dv, m_dv, dv, o_dr, m_dr, scale_offset, rope_offset, num_tiles, scale_log2,
    IS_FP8: tl.constexpr, MODEL1: tl.constexpr, SOFT_E4M3: tl.constexpr, HAS_ROPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """One block of keys: load (in q's compute dtype), score, fold into the softmax state."""
    if MODEL1:
        b_kv = _load_model1(p_row, p_sc, m_key, SOFT_E4M3)
    else:
        b_kv = _load_latent(p_row, m_key, o_dv, m_dv, dv, stride_d, scale_offset, num_tiles, IS_FP8, SOFT_E4M3,
                            BLOCK_T)  # fmt: skip
    b_kv = b_kv.to(b_qv.dtype)  # [BLOCK_N, BLOCK_DV]
    b_s = tl.dot(b_qv, tl.trans(b_kv), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_ROPE:
        b_kr = _load_rope(p_row, m_key, o_dr, m_dr, stride_d, rope_offset, IS_FP8)
        b_s += tl.dot(b_qr, tl.trans(b_kr.to(b_qr.dtype)), input_precision=DOT_PRECISION)
    return _online_softmax(b_s, visible, b_kv, b_m, b_l, b_acc, scale_log2, DOT_PRECISION)


@triton.jit
def _sink_scale(sink_ptr, i_head, b_lse, seen, m_row):
    """exp(lse) / (exp(lse) + exp(sink)) per row (lse natural): +inf sink -> 0, -inf -> 1;
    0 for rows that saw nothing, whatever the sink."""
    b_sink = tl.load(sink_ptr + i_head, mask=m_row, other=float("-inf"))
    # lse is +inf where nothing was seen; 0 there keeps inf - inf (NaN) out of the arithmetic
    b_lse = tl.where(seen, b_lse, 0.0)
    return tl.where(seen, 1.0 / (1.0 + tl.exp2((b_sink - b_lse) * RCP_LN2)), 0.0)


@triton.heuristics(
    {
        "SPARSE": lambda a: a["indices_ptr"] is not None,
        "HAS_TOPK_LENGTH": lambda a: a["topk_length_ptr"] is not None,
        "HAS_EXTRA": lambda a: a["x_indices_ptr"] is not None,
        "HAS_X_TOPK_LENGTH": lambda a: a["x_topk_length_ptr"] is not None,
        "RAGGED": lambda a: a["seqlens_q_ptr"] is not None,
        "HAS_SINK": lambda a: a["sink_ptr"] is not None,
        "WRITE_MAX": lambda a: a["max_ptr"] is not None,
        "PAGE_BLOCKS": lambda a: a["indices_ptr"] is None and a["page_size"] % a["BLOCK_N"] == 0,
    }
)
@triton.jit
def _mla_decode_kernel(
    q_ptr,  # [b, s_q, h_q, d]
    k_ptr,  # [num_blocks, page_size, h_kv, d]; FP8: the rows' bytes, uint8 [..., row bytes]
    x_ptr,  # extra cache, the same format (None without)
    block_table_ptr,  # dense: int32 [b, table_width]
    seqlens_ptr,  # dense: int32 [b]
    indices_ptr,  # sparse: int32 [b, s_q, (h_kv,) topk] slots of k_cache, -1 = skip
    topk_length_ptr,  # int32 [b]: entries used per row (None: all topk)
    x_indices_ptr,  # extra: int32 [b, s_q, x_topk] slots of the extra cache
    x_topk_length_ptr,  # int32 [b]
    seqlens_q_ptr,  # ragged: int32 [b], query tokens per row (None: all s_q)
    sink_ptr,  # float32 [h_q]; applied here when not SPLIT, else by the combine kernel
    bounds_ptr,  # int32 [b, num_splits + 1]: split s covers key list [bounds[s], bounds[s+1])
    o_ptr,  # SPLIT: fp32 [b, num_splits, s_q, h_q, dv]; else [b, s_q, h_q, dv]
    lse_ptr,  # SPLIT: fp32 [b, num_splits, s_q, h_q] (log2 domain); else [b, h_q, s_q] (natural log)
    max_ptr,  # not SPLIT: fp32 max scaled logit per row, lse's layout (None: not written)
    s_q, group, m_tiles, h_kv,
    page_size, num_blocks, num_slots, table_width, topk,
    x_page_size, x_num_slots, x_topk,
    dv, d_rope, scale_offset, rope_offset, num_tiles, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kn, stride_kp, stride_kh, stride_kd,
    stride_xn, stride_xp, stride_xh, stride_xd,
    stride_tb, stride_tn,
    stride_ib, stride_it, stride_ig, stride_in,
    stride_jb, stride_jt, stride_jn,
    stride_bb, stride_bs,
    stride_ob, stride_osp, stride_os, stride_oh, stride_od,
    stride_lb, stride_lsp, stride_ls, stride_lh,
    CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    IS_FP8: tl.constexpr,
    MODEL1: tl.constexpr,
    SOFT_E4M3: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    SPARSE: tl.constexpr,
    HAS_TOPK_LENGTH: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_X_TOPK_LENGTH: tl.constexpr,
    RAGGED: tl.constexpr,
    HAS_SINK: tl.constexpr,
    WRITE_MAX: tl.constexpr,
    PAGE_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Stage 1. Row r of a tile is query token t0 + r // group of head g * group + r % group:
        s = (q . k) * scale over the split's part of the row's key list (main list, then the
        extra list), online softmax in base 2, o = softmax(s) @ k[:, :dv]."""
    # program (sequence b, tile x) is b * tiles + x: a sequence's row tiles are neighbours in
    # launch order, so they run together and all but the first read its cache from L2
    tiles = h_kv * m_tiles
    if PER_TOKEN:
        tiles *= s_q
    i_b = (tl.program_id(0) // tiles).to(tl.int64)
    i_x = tl.program_id(0) % tiles
    i_sp = tl.program_id(1).to(tl.int64)
    if PER_TOKEN:
        i_t0 = i_x // (h_kv * m_tiles)
        i_gm = i_x % (h_kv * m_tiles)
        n_rows = group
    else:
        i_t0 = i_x * 0
        i_gm = i_x
        n_rows = s_q * group
    i_g = (i_gm // m_tiles).to(tl.int64)
    i_m = i_gm % m_tiles

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < n_rows
    # int32 while they live through the loop, widened where they become offsets
    i_tok = (i_t0 + o_m // group).to(tl.int32)
    i_head = (i_g * group + o_m % group).to(tl.int32)
    n_q = s_q
    if RAGGED:
        n_q = tl.load(seqlens_q_ptr + i_b)
    m_q = m_m & (i_tok < n_q)
    has_q = i_t0 + (i_m * BLOCK_M) // group < n_q  # the tile's first row is a query: else skip

    if SPARSE:
        n_main = topk
        if HAS_TOPK_LENGTH:
            n_main = tl.minimum(tl.maximum(tl.load(topk_length_ptr + i_b), 0), topk)
    else:
        seqlen = tl.load(seqlens_ptr + i_b)
        n_main = tl.maximum(tl.minimum(seqlen, table_width * page_size), 0)
        # the s_q (or seqlens_q) queries are the last tokens of the cache
        if CAUSAL:
            last = seqlen - n_q + i_tok
        else:
            last = i_tok * 0 + seqlen - 1
    n_start = tl.load(bounds_ptr + i_b * stride_bb + i_sp * stride_bs)
    n_end = tl.load(bounds_ptr + i_b * stride_bb + (i_sp + 1) * stride_bs)
    n_end = tl.where(has_q, n_end, n_start)

    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < dv
    o_dr = tl.arange(0, BLOCK_DR)
    m_dr = o_dr < d_rope
    p_q = q_ptr + i_b * stride_qb + i_tok.to(tl.int64) * stride_qs + i_head.to(tl.int64) * stride_qh  # [BLOCK_M]
    b_qv = tl.load(p_q[:, None] + o_dv[None, :] * stride_qd, mask=m_q[:, None] & m_dv[None, :], other=0.0)
    if UPCAST:
        b_qv = b_qv.to(tl.float32)
    b_qr = b_qv
    if HAS_ROPE:
        b_qr = tl.load(p_q[:, None] + (dv + o_dr)[None, :] * stride_qd, mask=m_q[:, None] & m_dr[None, :], other=0.0)
        if UPCAST:
            b_qr = b_qr.to(tl.float32)

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # the row's key list: main entries [0, n_main), then extra entries [n_main, n_all)
    n_all = n_main
    if HAS_EXTRA:
        n_x = x_topk
        if HAS_X_TOPK_LENGTH:
            n_x = tl.minimum(tl.maximum(tl.load(x_topk_length_ptr + i_b), 0), x_topk)
        n_all += n_x
    n_stop = tl.minimum(n_end, n_all)
    if SPARSE:
        p_keys = indices_ptr + i_b * stride_ib + i_t0 * stride_it + i_g * stride_ig
        stride_key = stride_in
        num_keys = num_slots
    else:
        p_keys = block_table_ptr + i_b * stride_tb
        stride_key = stride_tn
        num_keys = num_blocks
    p_x = p_keys
    if HAS_EXTRA:
        p_x = x_indices_ptr + i_b * stride_jb + i_t0 * stride_jt
    o_kh = i_g * stride_kh
    o_xh = i_g * stride_xh
    # The rows of block i + 1 are gathered (block table or slot lists) while block i is
    # computed: the cache loads then depend on no load of their own iteration, so Triton's
    # pipeliner can issue them num_stages - 1 blocks ahead of the math. Blocks start at
    # multiples of BLOCK_N (the first one masked below n_start), so with PAGE_BLOCKS each
    # block lies in one page whatever the split bounds.
    n_first = n_start - n_start % BLOCK_N
    p_row, p_sc, m_key, stride_d = _block_rows(
        n_first, n_start, n_stop, n_main, k_ptr, p_keys, stride_key, num_keys, page_size, stride_kn, stride_kp, o_kh,
        stride_kd, x_ptr, p_x, stride_jn, x_num_slots, x_page_size, stride_xn, stride_xp, o_xh, stride_xd,
        SPARSE, HAS_EXTRA, PAGE_BLOCKS, MODEL1, BLOCK_N,
    )  # fmt: skip
    for n0 in range(n_first, n_stop, BLOCK_N):
        p_row_next, p_sc_next, m_key_next, stride_d_next = _block_rows(
            n0 + BLOCK_N, n_start, n_stop, n_main, k_ptr, p_keys, stride_key, num_keys, page_size, stride_kn,
            stride_kp, o_kh, stride_kd, x_ptr, p_x, stride_jn, x_num_slots, x_page_size, stride_xn, stride_xp, o_xh,
            stride_xd, SPARSE, HAS_EXTRA, PAGE_BLOCKS, MODEL1, BLOCK_N,
        )  # fmt: skip
        visible = m_key[None, :] & m_q[:, None]
        if not SPARSE:
            # causal (or up to the cache length) on the main keys; extra keys are never masked
            o_n = n0 + tl.arange(0, BLOCK_N)
            visible &= (o_n[None, :] <= last[:, None]) | (o_n[None, :] >= n_main)
        b_m, b_l, b_acc = _attend_block(
            b_qv, b_qr, p_row, p_sc, m_key, stride_d, visible, b_m, b_l, b_acc,
            o_dv, m_dv, dv, o_dr, m_dr, scale_offset, rope_offset, num_tiles, scale_log2,
            IS_FP8, MODEL1, SOFT_E4M3, HAS_ROPE, DOT_PRECISION, BLOCK_T,
        )  # fmt: skip
        p_row, p_sc, m_key, stride_d = p_row_next, p_sc_next, m_key_next, stride_d_next

    # l != 0 (not l > 0): a NaN key that was selected must reach the output
    seen = b_l != 0
    b_o = b_acc / tl.where(seen, b_l, 1.0)[:, None]
    o_o = i_b * stride_ob + i_sp * stride_osp + i_tok.to(tl.int64) * stride_os + i_head.to(tl.int64) * stride_oh
    p_o = o_ptr + o_o  # [BLOCK_M]
    o_lse = i_b * stride_lb + i_tok.to(tl.int64) * stride_ls + i_head.to(tl.int64) * stride_lh  # [BLOCK_M]
    p_lse = lse_ptr + i_sp * stride_lsp + o_lse
    if SPLIT:
        b_lse = tl.where(seen, b_m + tl.log2(tl.where(seen, b_l, 1.0)), float("-inf"))
        m_store = m_q & (n_start < n_end)
    else:
        b_lse = tl.where(seen, (b_m + tl.log2(tl.where(seen, b_l, 1.0))) * LN2, float("inf"))
        if HAS_SINK:
            b_o = b_o * _sink_scale(sink_ptr, i_head, b_lse, seen, m_m)[:, None]
        m_store = m_m
        if WRITE_MAX:
            tl.store(max_ptr + o_lse, b_m * LN2, mask=m_store)
    m_o = m_store[:, None] & m_dv[None, :]
    tl.store(p_o[:, None] + o_dv[None, :] * stride_od, b_o.to(o_ptr.dtype.element_ty), mask=m_o)
    tl.store(p_lse, b_lse, mask=m_store)


@triton.heuristics(
    {"RAGGED": lambda a: a["seqlens_q_ptr"] is not None, "HAS_SINK": lambda a: a["sink_ptr"] is not None}
)
@triton.jit
def _mla_combine_kernel(
    o_part_ptr,  # fp32 [b, num_splits, s_q, h_q, dv]
    lse_part_ptr,  # fp32 [b, num_splits, s_q, h_q], log2 domain
    cu_splits_ptr,  # int32 [b + 1]: non-empty splits of row b are its first cu[b+1] - cu[b]
    seqlens_q_ptr,  # ragged: int32 [b]; tokens past a row's count have no partials
    sink_ptr,  # float32 [h_q] or None
    o_ptr,  # [b, s_q, h_q, dv]
    lse_ptr,  # fp32 [b, h_q, s_q], natural log
    h_q,
    dv,
    stride_pb, stride_psp, stride_ps, stride_ph, stride_pd,
    stride_qb, stride_qsp, stride_qs, stride_qh,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    RAGGED: tl.constexpr,
    HAS_SINK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Stage 2: o = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse); lse = log(sum_s w_s) + max;
    then the sink scale."""
    i_b = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_hb = tl.program_id(2)
    n_splits = tl.load(cu_splits_ptr + i_b + 1) - tl.load(cu_splits_ptr + i_b)
    if RAGGED:
        n_splits = tl.where(i_s < tl.load(seqlens_q_ptr + i_b), n_splits, 0)

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

    seen = b_l != 0
    b_o = b_acc / tl.where(seen, b_l, 1.0)[:, None]
    b_lse = tl.where(seen, (b_m + tl.log2(tl.where(seen, b_l, 1.0))) * LN2, float("inf"))
    if HAS_SINK:
        b_o = b_o * _sink_scale(sink_ptr, o_h, b_lse, seen, m_h)[:, None]
    p_o = o_ptr + i_b * stride_ob + i_s * stride_os
    tl.store(p_o + o_h[:, None] * stride_oh + o_dv[None, :] * stride_od, b_o.to(o_ptr.dtype.element_ty), mask=m_hd)
    tl.store(lse_ptr + i_b * stride_lb + o_h * stride_lh + i_s * stride_ls, b_lse, mask=m_h)


def _plan(
    lengths: torch.Tensor, programs: int, num_sm: int | None, max_keys: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each row's key list [0, lengths[i]) (int64 [b], on the device) into at most
    max_splits aligned pieces, with device ops only; max_splits comes from shapes: enough
    programs (`programs` per split) to fill num_sm processors, and no more than a list of
    max_keys keys (a bound known from shapes, e.g. topk) can fill.

    Returns (bounds int32 [b, max_splits + 1], cu_splits int32 [b + 1]) as `get_mla_metadata`.
    """
    device = lengths.device
    batch = lengths.numel()
    max_splits = max(1, min(MAX_SPLITS, triton.cdiv(num_sm or _num_sms(device), max(1, programs))))
    if max_keys is not None:
        # a split holds at least MIN_SPLIT_TOKENS keys (below), so more would stay empty
        max_splits = max(1, min(max_splits, triton.cdiv(max_keys, MIN_SPLIT_TOKENS)))
    lengths = lengths.clamp_min(0)
    if max_splits == 1:
        bounds = torch.stack([torch.zeros_like(lengths), lengths], dim=1)
        n_splits = (lengths > 0).to(torch.int64)
    else:
        # spread the whole batch's keys over batch * max_splits programs, then give each row
        # as many of those chunks as it needs (at most max_splits)
        target = torch.clamp(_cdiv(lengths.sum(), batch * max_splits), min=MIN_SPLIT_TOKENS)
        want = torch.clamp(_cdiv(lengths, target), 1, max_splits)
        chunk = torch.clamp(_cdiv(_cdiv(lengths, want), SPLIT_ALIGN) * SPLIT_ALIGN, min=SPLIT_ALIGN)
        # unsqueeze, not [None, :]: indexing needs a device guard, which the compile-only
        # report (bench.compiled, fake CUDA tensors on a CPU-only torch) does not have
        starts = torch.arange(max_splits + 1, device=device, dtype=torch.int64).unsqueeze(0) * chunk.unsqueeze(1)
        bounds = torch.minimum(starts, lengths.unsqueeze(1))
        n_splits = _cdiv(lengths, chunk)
    cu_splits = torch.cat([n_splits.new_zeros(1), torch.cumsum(n_splits, 0)])
    return bounds.to(torch.int32), cu_splits.to(torch.int32)


def _cdiv(a, b):
    return (a + b - 1) // b


def _dense_schedule(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int, num_sm: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or cache_seqlens.dim() != 1:
        raise TypeError(f"cache_seqlens must be an int32 tensor [b], got {describe(cache_seqlens)}")
    if num_q_tokens_per_head_k < 1 or num_heads_k < 1:
        raise ValueError(
            f"num_q_tokens_per_head_k and num_heads_k must be >= 1, got {num_q_tokens_per_head_k}, {num_heads_k}"
        )
    # planned for the tiles the launcher will cut (the old form does not know the cache format)
    arch = _target_arch() if cache_seqlens.is_cuda else None
    m_tiles = triton.cdiv(num_q_tokens_per_head_k, decode_tiles(num_q_tokens_per_head_k, False, arch).block_m)
    return _plan(cache_seqlens.to(torch.int64), cache_seqlens.numel() * num_heads_k * m_tiles, num_sm)


def get_mla_metadata(*args, **kwargs):
    """Plan the split-KV schedule of `flash_mla_with_kvcache`; both FlashMLA call forms.

    New form, `get_mla_metadata(num_sm=None)` (FlashMLA's current interface):
        returns `(FlashMLASchedMeta(), None)`. The first `flash_mla_with_kvcache` call that
        receives it records its configuration and plans the schedule from that call's lengths,
        on the device; later calls reuse it (same configuration and length values, as in FlashMLA;
        a different configuration raises ValueError naming the field). Works for every call:
        dense, sparse, extra cache, ragged.

    Old form, `get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm=None)`
    (dense calls only):
        cache_seqlens: int32 [b], tokens in the cache per sequence.
        num_q_tokens_per_head_k: s_q * h_q // h_kv, query rows that share one latent head.
        num_heads_k: h_kv.
        returns (tile_scheduler_metadata int32 [b, num_splits + 1]: split s of sequence i
        covers cache positions [meta[i, s], meta[i, s + 1]); num_splits int32 [b + 1]: prefix
        sums of the non-empty splits per sequence). Splits are sized from the batch's total
        length, so long sequences get more of them than short ones.

    num_sm: processors to fill; defaults to the GPU's SM count (CPU cores under the
    interpreter). The split count is the only host decision and uses shapes alone.
    """
    if not args and "cache_seqlens" not in kwargs:
        unknown = sorted(set(kwargs) - {"num_sm"})
        if unknown:
            raise TypeError(f"get_mla_metadata() takes only num_sm in its new form, got {unknown}")
        return FlashMLASchedMeta(num_sm=kwargs.get("num_sm")), None
    return _dense_schedule(*args, **kwargs)


def _key_lengths(call: DecodeCall, cache_seqlens, topk_length, extra_topk_length, device) -> torch.Tensor:
    """int64 [b]: each row's key list, main part (cache length or used indices) plus extra part."""
    def used(length, topk):
        if length is None:
            return torch.full((call.b,), topk, dtype=torch.int64, device=device)
        return length.to(torch.int64).clamp(0, topk)

    lengths = used(topk_length, call.topk) if call.sparse else cache_seqlens.to(torch.int64).clamp_min(0)
    if call.has_extra:
        lengths = lengths + used(extra_topk_length, call.extra_topk)
    return lengths


def _row_layout(fmt) -> tuple[int, int, int]:
    """(scale_offset, rope_offset, num_tiles) of a row as the kernel indexes it: FP8 byte
    offsets and scale count from the format; plain rows: rope channels start at channel
    kv_lora_rank, no scales; MODEL1 tokens: none (their layout is the kernel's M1_* constants)."""
    if isinstance(fmt, Model1Format):
        return 0, 0, 1
    if fmt.is_fp8:
        return fmt.scale_offset, fmt.rope_offset, fmt.num_tiles
    return 0, fmt.kv_lora_rank, 1


def _cache_args(cache: torch.Tensor | None, fmt) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    """(pointer, strides) of a cache for the kernel: FP8 rows as their bytes (uint8, byte
    strides), plain rows as they are; (None, zeros) without a cache. MODEL1: the page stride,
    the step between a page's data runs (not the view's stride(1)) and head stride 0 (one KV
    head; the view's 584 would also cost the loads their 16-byte alignment)."""
    if cache is None:
        return None, (0, 0, 0, 0)
    if fmt.is_fp8:
        cache = cache.view(torch.uint8)
    if isinstance(fmt, Model1Format):
        return cache, (cache.stride(0), fmt.data_bytes, 0, 1)
    return cache, cache.stride()


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta | torch.Tensor | None = None,
    num_splits: torch.Tensor | None = None,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over a paged latent cache: FlashMLA's interface, any page size and head dim.

    Args:
        q: [b, s_q, h_q, d], bfloat16 / float16 / float32 (absorbed query: latent part, then rope).
        k_cache: [num_blocks, page_block_size, h_kv, d] in q's dtype; the first head_dim_v
            channels of each row are also V. h_kv = 1 is MLA; h_q must be a multiple of h_kv.
            FP8 (is_fp8_kvcache): uint8 / float8_e4m3fn [..., bytes] in `mla.formats.Fp8Format`'s
            layout (656 bytes for 512 + 64), dequantized to q's dtype on load.
            MODEL1 (DeepSeek-V4, FlashMLA's FP8KVCacheLayout.MODEL1_FP8Sparse): is_fp8_kvcache
            with d = head_dim_v = 512 and 584 bytes per token: uint8 / float8_e4m3fn
            [num_blocks, page_block_size, 1, 584] = `Model1Format().kvcache_view(pages, page_size)`
            of uint8 pages [num_blocks, page_bytes]; stride(0) is the page stride (>= page_bytes),
            tokens are found by the page layout, not by stride(1). K = V = all 512 channels.
        block_table: int32 [b, max_blocks], page ids of each sequence in order; entries past a
            sequence's last page are never read. Ignored (may be None) with indices.
        cache_seqlens: int32 [b], tokens in the cache per sequence (the queries included).
            Ignored (may be None) with indices.
        head_dim_v: channels of V, 1 <= head_dim_v <= d (FP8: the format's rules; MODEL1: 512).
        tile_scheduler_metadata, num_splits: `get_mla_metadata()`'s (FlashMLASchedMeta, None),
            the old form's two tensors (dense calls), or None (planned here, on the device).
        softmax_scale: defaults to d ** -0.5.
        causal: dense only: query token i of a row with n queries and L cached tokens sees
            positions j <= L - n + i (n = s_q, or seqlens_q[row]).
        is_fp8_kvcache: k_cache (and extra_k_cache) hold FP8 rows, dequantised on load.
        indices: int32 [b, s_q, topk]: sparse attention: the slots (page * page_block_size +
            offset, any page) each query token attends; -1 skips an entry; a slot listed twice
            counts twice. causal must be False.
        attn_sink: float32 [h_q]: out *= exp(lse) / (exp(lse) + exp(attn_sink[h])); lse unchanged.
        extra_k_cache: [num_blocks', page_block_size', h_kv, d], k_cache's format, attended in
            the same softmax through extra_indices_in_kvcache (int32 [b, s_q, extra_topk], slots
            of extra_k_cache, -1 skips).
        topk_length, extra_topk_length: int32 [b]: only the first topk_length[i] entries of row
            i's indices (extra indices) are used.
        seqlens_q: int32 [b], keyword only: ragged query lengths. Row i's queries are
            q[i, :seqlens_q[i]] (0 allowed); the rest of q is padding, never read, and its
            output is 0 with lse +inf. Packed [total_q, ...] queries are not accepted.

    Returns:
        out: [b, s_q, h_q, head_dim_v] in q's dtype; 0 for rows that see no key (with or
            without a sink).
        lse: float32 [b, h_q, s_q], natural log of the sum of exp(scaled scores); +inf for
            rows that see no key.
    """
    call = check_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache,
        indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length, seqlens_q,
    )  # fmt: skip
    check_schedule(call, q.device, tile_scheduler_metadata, num_splits)
    require_triton_device(q.device, "mla.reference.flash_mla_with_kvcache")
    b, s_q, h_q, d = q.shape
    h_kv, dv = call.h_kv, head_dim_v
    group = h_q // h_kv
    rows = group if call.per_token else s_q * group
    fmt = call.fmt
    model1 = isinstance(fmt, Model1Format)
    cut = decode_tiles(rows, fmt.is_fp8, _target_arch(), model1)
    m_tiles = triton.cdiv(rows, cut.block_m)
    tiles = (s_q if call.per_token else 1) * h_kv * m_tiles

    meta = tile_scheduler_metadata
    if meta is None or isinstance(meta, FlashMLASchedMeta) and meta.tile_scheduler_metadata is None:
        lengths = _key_lengths(call, cache_seqlens, topk_length, extra_topk_length, q.device)
        # slot lists have a static length; dense plans match the old get_mla_metadata form's
        max_keys = (call.topk or 0) + (call.extra_topk or 0) if call.per_token else None
        plan = _plan(lengths, b * tiles, None if meta is None else meta.num_sm, max_keys)
        if meta is not None:
            meta.tile_scheduler_metadata, meta.num_splits = plan
        bounds, cu_splits = plan
    elif isinstance(meta, FlashMLASchedMeta):
        bounds, cu_splits = meta.tile_scheduler_metadata, meta.num_splits
    else:
        bounds, cu_splits = meta, num_splits
    n_split = bounds.shape[1] - 1

    interpret = interpreting()
    # the interpreter truncates fp32 -> bf16 stores; write fp32 and let torch round
    out_dtype = torch.float32 if interpret and q.dtype == torch.bfloat16 else q.dtype
    out = torch.empty(b, s_q, h_q, dv, dtype=out_dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    if b == 0:
        return out.to(q.dtype), lse
    if n_split == 1:
        o_stage, lse_stage = out, lse
        o_strides = (out.stride(0), 0, out.stride(1), out.stride(2), out.stride(3))
        lse_strides = (lse.stride(0), 0, lse.stride(2), lse.stride(1))
    else:
        o_stage = torch.empty(b, n_split, s_q, h_q, dv, dtype=torch.float32, device=q.device)
        lse_stage = torch.empty(b, n_split, s_q, h_q, dtype=torch.float32, device=q.device)
        o_strides, lse_strides = o_stage.stride(), lse_stage.stride()

    k_arg, k_strides = _cache_args(k_cache, fmt)
    x_arg, x_strides = _cache_args(extra_k_cache, fmt)
    sparse, extra = call.sparse, call.has_extra
    table_args = (0, 0) if sparse else block_table.stride()
    index_args = (*indices.stride()[:2], 0, indices.stride(2)) if sparse else (0, 0, 0, 0)
    x_index_args = extra_indices_in_kvcache.stride() if extra else (0, 0, 0)
    _mla_decode_kernel[(b * tiles, n_split)](
        q, k_arg, x_arg,
        None if sparse else block_table, None if sparse else cache_seqlens,
        indices, topk_length, extra_indices_in_kvcache, extra_topk_length,
        seqlens_q, attn_sink if n_split == 1 else None, bounds, o_stage, lse_stage, None,
        s_q, group, m_tiles, h_kv,
        call.page_size, k_cache.shape[0], call.num_slots, 0 if sparse else block_table.shape[1], call.topk or 0,
        call.extra_page_size or 1, call.extra_num_slots or 0, call.extra_topk or 0,
        dv, d - dv, *_row_layout(fmt), call.scale * math.log2(math.e),
        *q.stride(), *k_strides, *x_strides, *table_args, *index_args, *x_index_args, *bounds.stride(),
        *o_strides, *lse_strides,
        CAUSAL=causal,
        SPLIT=n_split > 1,
        UPCAST=interpret,
        IS_FP8=fmt.is_fp8 and not model1,
        MODEL1=model1,
        SOFT_E4M3=cut.soft_e4m3,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_ROPE=d > dv,
        PER_TOKEN=call.per_token,
        BLOCK_M=cut.block_m,
        BLOCK_N=cut.block_n,
        BLOCK_DV=_block_d(dv),
        BLOCK_DR=_block_d(d - dv),
        BLOCK_T=triton.next_power_of_2(fmt.num_tiles) if fmt.is_fp8 and not model1 else 1,
        num_warps=cut.num_warps,
        num_stages=cut.num_stages,
    )  # fmt: skip
    if n_split > 1:
        block_h = min(16, triton.next_power_of_2(h_q))
        _mla_combine_kernel[(b, s_q, triton.cdiv(h_q, block_h))](
            o_stage, lse_stage, cu_splits, seqlens_q, attn_sink, out, lse, h_q, dv,
            *o_stage.stride(), *lse_stage.stride(), *out.stride(), *lse.stride(),
            BLOCK_H=block_h,
            BLOCK_DV=_block_d(dv),
            num_warps=4,
        )  # fmt: skip
    return out.to(q.dtype), lse


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse attention over one flat KV array (FlashMLA's sparse prefill), any head dims.

    Args:
        q: [s_q, h_q, d], bfloat16 / float16 / float32.
        kv: [s_kv, h_kv, d] in q's dtype; the first d_v channels are also V; h_q % h_kv == 0.
        indices: int32 [s_q, h_kv, topk]: the kv rows query token t attends through kv head g;
            entries < 0 or >= s_kv are skipped; a row listed twice counts twice.
        sm_scale: softmax scale.
        d_v: channels of V, 1 <= d_v <= d.
        attn_sink: float32 [h_q]: out *= exp(lse) / (exp(lse) + exp(attn_sink[h])).
        topk_length: int32 [s_q]: token t uses only indices[t, :, :topk_length[t]].

    Returns:
        out: [s_q, h_q, d_v] in q's dtype; 0 for a token that sees no valid index.
        max_logits: float32 [s_q, h_q], the largest scaled score (sm_scale * q . k); -inf when
            nothing is seen.
        lse: float32 [s_q, h_q], natural log-sum-exp of the scaled scores (without the sink);
            +inf when nothing is seen.
    """
    call = check_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    require_triton_device(q.device, "mla.reference.flash_mla_sparse_fwd")
    s_q, h_q, d = q.shape
    h_kv, dv, topk = call.h_kv, d_v, call.topk
    interpret = interpreting()
    out_dtype = torch.float32 if interpret and q.dtype == torch.bfloat16 else q.dtype
    out = torch.empty(s_q, h_q, dv, dtype=out_dtype, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    if s_q == 0:
        return out.to(q.dtype), max_logits, lse
    group = h_q // h_kv
    cut = decode_tiles(group, False, _target_arch())
    m_tiles = triton.cdiv(group, cut.block_m)
    # each query token is a "row" of one query over a one-page cache holding all of kv
    # (made on the device: a host tensor would be a blocking copy)
    bounds = (torch.arange(2, dtype=torch.int32, device=q.device) * topk).expand(s_q, 2)  # [0, topk] per token
    _mla_decode_kernel[(s_q * h_kv * m_tiles, 1)](
        q, kv, None, None, None, indices, topk_length, None, None, None,
        attn_sink, bounds, out, lse, max_logits,
        1, group, m_tiles, h_kv,
        max(call.s_kv, 1), 1, call.s_kv, 0, topk, 1, 0, 0,
        dv, d - dv, 0, dv, 1, call.scale * math.log2(math.e),
        q.stride(0), 0, q.stride(1), q.stride(2), 0, kv.stride(0), kv.stride(1), kv.stride(2), 0, 0, 0, 0, 0, 0,
        indices.stride(0), 0, indices.stride(1), indices.stride(2), 0, 0, 0, *bounds.stride(),
        out.stride(0), 0, 0, out.stride(1), out.stride(2), lse.stride(0), 0, 0, lse.stride(1),
        CAUSAL=False,
        SPLIT=False,
        UPCAST=interpret,
        IS_FP8=False,
        MODEL1=False,
        SOFT_E4M3=False,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_ROPE=d > dv,
        PER_TOKEN=True,
        BLOCK_M=cut.block_m,
        BLOCK_N=cut.block_n,
        BLOCK_DV=_block_d(dv),
        BLOCK_DR=_block_d(d - dv),
        BLOCK_T=1,
        num_warps=cut.num_warps,
        num_stages=cut.num_stages,
    )  # fmt: skip
    return out.to(q.dtype), max_logits, lse
