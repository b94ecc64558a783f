"""Triton write kernel for the paged latent cache.

Twin of `mla.reference.cache.write_latent`: scatter n token rows `[latent | k_pe]` to flat
slots of one layer's pages (slot s is row s % page_size of page s // page_size). A pure
copy, so the result is bit-identical to the reference in every dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mla.reference.cache import check_write_args

from mla.backend import require_triton_device
from mla.formats import PlainFormat

# Tokens per program: enough rows to keep a program busy at decode batch sizes while
# a [BLOCK_T, next_pow2(kv_lora_rank)] tile (16 x 512 for DeepSeek) stays in registers.
BLOCK_T = 16


@triton.jit
def _write_latent_kernel(
    pages,
    slots,
    latent,
    k_pe,
    n_tokens,
    num_slots,
    page_size,
    s_page,
    s_row,
    s_chan,
    s_slot,
    s_lat_t,
    s_lat_c,
    s_pe_t,
    s_pe_c,
    KV_LORA_RANK: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_PE: tl.constexpr,
):
    """pages[slot // page_size, slot % page_size, 0, :] = [latent[t] | k_pe[t]] for slot = slots[t]."""
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BT]
    b_slot = tl.load(slots + o_t * s_slot, mask=o_t < n_tokens, other=-1).to(tl.int64)  # [BT]
    # Out-of-range slots are skipped: on CUDA the host does not read slot values (no sync).
    m_t = (o_t < n_tokens) & (b_slot >= 0) & (b_slot < num_slots)
    o_row = (b_slot // page_size) * s_page + (b_slot % page_size) * s_row  # [BT]

    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_r = m_t[:, None] & (o_r < KV_LORA_RANK)[None, :]  # [BT, BR]
    b_lat = tl.load(latent + o_t[:, None] * s_lat_t + o_r[None, :] * s_lat_c, mask=m_r, other=0.0)
    tl.store(pages + o_row[:, None] + o_r[None, :] * s_chan, b_lat, mask=m_r)

    o_pe = tl.arange(0, BLOCK_PE).to(tl.int64)
    m_pe = m_t[:, None] & (o_pe < ROPE_DIM)[None, :]  # [BT, BPE]
    b_pe = tl.load(k_pe + o_t[:, None] * s_pe_t + o_pe[None, :] * s_pe_c, mask=m_pe, other=0.0)
    tl.store(pages + o_row[:, None] + (KV_LORA_RANK + o_pe[None, :]) * s_chan, b_pe, mask=m_pe)


def write_latent(pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Store token rows into the paged cache in place: pages[s // P, s % P, 0] = [latent | k_pe].

    Args:
        pages: [num_pages, page_size, 1, kv_lora_rank + rope_dim] one layer's pages; any strides.
        slots: int64 [n] distinct flat slots (page * page_size + offset); any stride.
        latent: [n, kv_lora_rank] in pages' dtype; any strides.
        k_pe: [n, rope_dim] in pages' dtype; any strides.

    Returns:
        pages, modified in place.

    Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
    """
    fmt, _ = check_write_args(pages, slots, latent, k_pe, fp8=False)
    require_triton_device(pages.device, "mla.reference.write_latent")
    launch(fmt, pages, slots, latent, k_pe)
    return pages


def launch(fmt: PlainFormat, pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
    """The kernel launch alone, for callers that validated the arguments."""
    n = slots.shape[0]
    if n == 0:
        return
    _write_latent_kernel[(triton.cdiv(n, BLOCK_T),)](
        pages, slots, latent, k_pe, n, pages.shape[0] * pages.shape[1], pages.shape[1],
        pages.stride(0), pages.stride(1), pages.stride(3), slots.stride(0),
        latent.stride(0), latent.stride(1), k_pe.stride(0), k_pe.stride(1),
        KV_LORA_RANK=fmt.kv_lora_rank,
        ROPE_DIM=fmt.rope_dim,
        BLOCK_T=BLOCK_T,
        BLOCK_R=triton.next_power_of_2(fmt.kv_lora_rank),
        BLOCK_PE=triton.next_power_of_2(max(fmt.rope_dim, 1)),
    )  # fmt: skip
