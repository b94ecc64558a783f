"""Plain PyTorch reference for the paged latent cache write (`mla.kernels.cache`).

A token's row in a page is `[latent | k_pe]`; a flat slot `s` names row `s % page_size`
of page `s // page_size`. `write_latent` scatters n new rows to n slots with one
indexed assignment; the Triton kernel does the same with one program per block of tokens.
"""

from __future__ import annotations

import torch


def check_write_args(pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Validate the arguments of `write_latent` (both implementations share this contract).

    Raises TypeError for wrong dtypes and ValueError for wrong ranks, shapes, devices and,
    when `slots` is on the CPU, for slots outside the pool or repeated. On CUDA the slot
    values are not inspected, since that would synchronise the device on every layer's
    write; `LatentCache.slot_mapping` has already checked them on the host.
    """
    if pages.dim() != 4 or pages.shape[2] != 1:
        raise ValueError(f"pages must be [num_pages, page_size, 1, kv_lora_rank + rope_dim], got {tuple(pages.shape)}")
    if isinstance(slots, torch.Tensor) and slots.dim() != 1:
        raise ValueError(f"slots must be 1-D [n], got shape {tuple(slots.shape)}")
    check_slots(pages, slots, latent=latent, k_pe=k_pe)
    for name, t in (("latent", latent), ("k_pe", k_pe)):
        if t.dim() != 2 or t.shape[0] != slots.shape[0]:
            raise ValueError(f"{name} must be [n={slots.shape[0]}, channels], got shape {tuple(t.shape)}")
        if t.dtype != pages.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match the pages' dtype {pages.dtype}")
    if latent.shape[1] + k_pe.shape[1] != pages.shape[3]:
        raise ValueError(
            f"latent channels {latent.shape[1]} + k_pe channels {k_pe.shape[1]} != page row width {pages.shape[3]}"
        )


def check_slots(pages: torch.Tensor, slots: torch.Tensor, **rows: torch.Tensor) -> None:
    """slots must be an int64 tensor on the pages' device, like the row tensors.

    On the CPU the values are checked too: inside the pool (an out-of-bounds write kills the
    Triton interpreter) and distinct (with duplicates a parallel write leaves either value).
    """
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots must be a torch.Tensor, got {type(slots).__name__}")
    if slots.dtype != torch.int64:
        raise TypeError(f"slots must be int64, got {slots.dtype}")
    for name, t in (("slots", slots), *rows.items()):
        if t.device != pages.device:
            raise ValueError(f"{name} is on {t.device} but pages are on {pages.device}")
    if slots.device.type == "cpu" and slots.numel() > 0:
        num_slots = pages.shape[0] * pages.shape[1]
        outside = (slots < 0) | (slots >= num_slots)
        if outside.any():
            bad = slots[outside][0].item()
            raise ValueError(f"slot {bad} is outside the pool of {num_slots} slots (num_pages * page_size)")
        values, counts = torch.unique(slots, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"slot {values[counts > 1][0].item()} appears more than once in slots")


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
    check_write_args(pages, slots, latent, k_pe)
    page_size = pages.shape[1]
    pages[slots // page_size, slots % page_size, 0] = torch.cat([latent, k_pe], dim=1)
    return pages
