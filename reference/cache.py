"""Plain PyTorch reference for the paged latent cache writes, and the one page gather.

A flat slot `s` names row `s % page_size` of page `s // page_size`. `write_latent` (plain rows)
and `mla.reference.quant.write_latent_fp8` (FP8 rows) scatter n new rows to n slots with one
indexed assignment of the format's packed rows; the Triton kernels (`mla.kernels.cache`,
`mla.kernels.quant`) do the same with one program per block of tokens. Both implementations
share `check_write_args`. `gather_pages` is how every reader turns a block table into rows.
"""

from __future__ import annotations

import torch

from mla.formats import CacheFormat, Fp8Format, PlainFormat


def check_write_args(pages, slots, latent, k_pe, fp8: bool) -> tuple[CacheFormat, torch.Tensor]:
    """Validate the arguments of a cache write (the references and the kernel launchers share
    this) and return the write's format and pages as the format's storage dtype.

    Raises TypeError for wrong types and dtypes and ValueError for wrong ranks, shapes, devices,
    a row the format cannot hold and, when `slots` is on the CPU, for slots outside the pool or
    repeated. On CUDA the slot values are not read: that would synchronise the device on every
    layer's write (the kernels skip out-of-range slots; `LatentCache` only hands out reserved slots).
    """
    for name, t in (("pages", pages), ("slots", slots), ("latent", latent), ("k_pe", k_pe)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if slots.dtype != torch.int64:
        raise TypeError(f"slots must be int64, got {slots.dtype}")
    if slots.dim() != 1:
        raise ValueError(f"slots must be 1-D [n], got shape {tuple(slots.shape)}")
    for name, t in (("latent", latent), ("k_pe", k_pe)):
        if t.dim() != 2 or t.shape[0] != slots.shape[0]:
            raise ValueError(f"{name} must be [n={slots.shape[0]}, channels], got shape {tuple(t.shape)}")
    for name, t in (("slots", slots), ("latent", latent), ("k_pe", k_pe)):
        if t.device != pages.device:
            raise ValueError(f"{name} is on {t.device} but pages are on {pages.device}")
    if fp8:
        fmt = Fp8Format(latent.shape[1], k_pe.shape[1])
        for name, t in (("latent", latent), ("k_pe", k_pe)):
            if t.dtype not in Fp8Format.input_dtypes:
                raise TypeError(f"{name} must be bfloat16, float16 or float32 for an FP8 cache, got {t.dtype}")
    else:
        if pages.dim() == 4 and latent.shape[1] + k_pe.shape[1] != pages.shape[3]:
            raise ValueError(
                f"latent channels {latent.shape[1]} + k_pe channels {k_pe.shape[1]} != page row width {pages.shape[3]}"
            )
        for name, t in (("latent", latent), ("k_pe", k_pe)):
            if t.dtype != pages.dtype:
                raise TypeError(f"{name} dtype {t.dtype} does not match the pages' dtype {pages.dtype}")
        fmt = PlainFormat(latent.shape[1], k_pe.shape[1], pages.dtype)
    pages = fmt.check_pages(pages)
    if pages.shape[2] != 1:
        raise ValueError(f"pages must be [num_pages, page_size, 1, {fmt.row_width}], got {tuple(pages.shape)}")
    if slots.device.type == "cpu" and slots.numel() > 0:
        num_slots = pages.shape[0] * pages.shape[1]
        outside = (slots < 0) | (slots >= num_slots)
        if outside.any():
            bad = slots[outside][0].item()
            raise ValueError(f"slot {bad} is outside the pool of {num_slots} slots (num_pages * page_size)")
        # with a repeated slot a parallel write leaves either value
        values, counts = torch.unique(slots, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"slot {values[counts > 1][0].item()} appears more than once in slots")
    return fmt, pages


def write_rows(fmt: CacheFormat, pages: torch.Tensor, slots: torch.Tensor, latent, k_pe) -> None:
    """pages[s // P, s % P, 0] = fmt.pack(latent, k_pe) for each slot s; no checks (the callers')."""
    page_size = pages.shape[1]
    pages[slots // page_size, slots % page_size, 0] = fmt.pack(latent, k_pe)


def write_latent(pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Store token rows into the paged cache in place: pages[s // P, s % P, 0] = [latent | k_pe].

    Args:
        pages: [num_pages, page_size, 1, kv_lora_rank + rope_dim] one layer's pages; any strides.
        slots: int64 [n] distinct flat slots (page * page_size + offset).
        latent: [n, kv_lora_rank] in pages' dtype.
        k_pe: [n, rope_dim] in pages' dtype.

    Returns:
        pages, modified in place.
    """
    fmt, _ = check_write_args(pages, slots, latent, k_pe, fp8=False)
    write_rows(fmt, pages, slots, latent, k_pe)
    return pages


def gather_pages(k_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` rows of every sequence: [b, num_tokens, h_kv, row_width].

    Row j of sequence i comes from page block_table[i, j // page_size]; rows past a
    sequence's own length come from whatever that table entry names, so callers mask them.
    num_tokens may not exceed block_table.shape[1] * page_size. Whole pages are gathered, then
    trimmed: one index per page, not per token.
    """
    page_size = k_cache.shape[1]
    pages = block_table[:, : -(-num_tokens // page_size)].long().to(k_cache.device)  # [b, pages]
    return k_cache[pages].flatten(1, 2)[:, :num_tokens]
