"""`StepPlan`: what every layer of one forward step reads, built once by `LatentCache.plan`.

A step appends s tokens to each of b sequences (or n_i <= s to sequence i: a ragged step, where
row i's new tokens are its first n_i columns and the rest is padding that is written nowhere). Before any layer runs, the cache turns its
host bookkeeping into device tables (the new tokens' slots and positions, the block table,
the lengths), the rotary tables of those positions, the backend (`mla.backend`), the
attention form (absorbed or decompressed, from `mla.backend.absorbed_is_cheaper`) and, for
the Triton decode kernel, its split schedule. The layers only read the plan: nothing in a
layer validates ids, builds tables or synchronises with the device.

On CUDA the four integer tables travel in one pinned host buffer and one asynchronous copy,
so building a plan never waits for the GPU; a plan refilled in place (`LatentCache.plan(...,
out=plan)`) keeps its tensors, so a decode step captured in a CUDA graph can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mla import ops
from mla.backend import absorbed_is_cheaper
from mla.reference.cache import gather_pages
from mla.reference.decode import dense_visibility
from mla.rope import RotaryEmbedding


@dataclass
class StepPlan:
    """The shared, read-only state of one forward step (build it with `LatentCache.plan`).

    Attributes:
        cache: the `LatentCache` the step writes to and attends over.
        seq_ids: the b sequence ids, in batch order.
        positions: int64 [b, s], the new tokens' positions: the last s (n_i) of each sequence.
        slots: int64 [b * s], their flat cache slots, row-major over (sequence, token); -1 for
            padding columns, which the writers skip.
        block_table: int32 [b, width] page ids, padded with 0.
        seqlens: int32 [b] lengths, the new tokens included.
        num_new: int32 [b], each row's new tokens n_i, when they differ (ragged); else None.
        max_seqlen: max of seqlens, on the host.
        cos, sin: float32 [b, s, rope_dim // 2], rotary tables of `positions`.
        backend: "triton" or "reference", for cache writes and attention alike.
        absorbed: whether the layers attend in the absorbed form (through `attend`) or decompress
            the cached latents (through `context`).
        schedule: (tile_scheduler_metadata, num_splits) of the Triton decode kernel, or None
            (also for sparse layers, whose calls are scheduled from their indices).
        masks: for the reference backend's dense absorbed form, what every layer's attention reads
            and sees (`mla.reference.decode.dense_visibility` of these tables), or None.
    """

    cache: object
    seq_ids: tuple[int, ...]
    positions: torch.Tensor
    slots: torch.Tensor
    block_table: torch.Tensor
    seqlens: torch.Tensor
    num_new: torch.Tensor | None
    max_seqlen: int
    cos: torch.Tensor
    sin: torch.Tensor
    backend: str
    absorbed: bool
    schedule: tuple[torch.Tensor, torch.Tensor] | None
    masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    @property
    def num_new_tokens(self) -> int:
        """s: the step's columns (the most new tokens of any row)."""
        return self.positions.shape[1]

    def visible(self) -> torch.Tensor:
        """bool [b, s, max_seqlen]: which cached positions each column's query sees. Column i of
        row r (n_r new tokens, length L_r) sees j <= L_r - n_r + i; padding columns see positions
        past the row's end, which `context` zeroes, so they stay finite."""
        n = self.num_new[:, None, None] if self.num_new is not None else self.num_new_tokens
        i = torch.arange(self.num_new_tokens, device=self.seqlens.device)
        j = torch.arange(self.max_seqlen, device=self.seqlens.device)
        return j[None, None, :] <= (self.seqlens[:, None, None] - n + i[None, :, None])

    @classmethod
    def build(cls, cache, seq_ids, positions, slots, table, seqlens, num_new, config, rotary, backend,
              out=None) -> StepPlan:  # fmt: skip
        """From what `LatentCache.plan` computed and validated on the host: positions and slots
        (b * s ints each, row-major), table (int32 [b, width]), seqlens (b ints) and num_new (b
        ints, or None for a uniform step)."""
        b = len(seq_ids)
        s = len(positions) // b
        max_seqlen = max(seqlens)
        absorbed = absorbed_is_cheaper(config, s, max_seqlen)
        if out is not None:
            out._check_refill(seq_ids, s, table.shape[1], num_new is not None, backend, absorbed)
            table = F.pad(table, (0, out.block_table.shape[1] - table.shape[1]))
        width = table.shape[1]
        ints = positions + slots + seqlens + (num_new or [])
        host = torch.cat([torch.tensor(ints, dtype=torch.int64), table.flatten().long()])
        if cache.device.type == "cuda":
            host = host.pin_memory()
        sizes = [b * s, b * s, b] + ([b] if num_new else []) + [b * width]
        positions, slots, seqlens, *num_new, table = host.to(cache.device, non_blocking=True).split(sizes)
        positions, table = positions.view(b, s), table.view(b, width).to(torch.int32)
        seqlens, num_new = seqlens.to(torch.int32), num_new[0].to(torch.int32) if num_new else None
        cos, sin = (rotary or RotaryEmbedding(config))(positions)
        schedule = None
        dense = absorbed and not config.has_indexer  # sparse layers attend through select's slots
        if backend == "triton" and dense:
            from mla.kernels import get_mla_metadata  # Triton is imported only when it runs

            h_kv = cache.pages[0].shape[2]
            schedule = get_mla_metadata(seqlens, s * config.num_heads // h_kv, h_kv)
        masks = None
        if backend == "reference" and dense:
            num_blocks, page_size = cache.pages[0].shape[:2]
            masks = dense_visibility(table, seqlens, num_new, s, num_blocks, page_size, causal=True)
        plan = cls(cache, tuple(seq_ids), positions, slots, table, seqlens, num_new, max_seqlen, cos, sin, backend,
                   absorbed, schedule, masks)  # fmt: skip
        return plan if out is None else out._refill(plan)

    def write(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store the new tokens' rows of one layer: latent [b * s, r], k_pe [b * s, dr], any float
        dtype (converted to what the cache stores)."""
        ops.write(self.cache.format, self.cache.pages[layer], self.slots, latent, k_pe, self.backend,
                  padded=self.num_new is not None)  # fmt: skip

    def write_index(self, layer: int, keys: torch.Tensor) -> None:
        """Store the new tokens' indexer keys of one layer: keys [b * s, index_head_dim], any float dtype."""
        cache = self.cache
        ops.write_index(cache.index_format, cache.index_pages[layer], self.slots, keys, padded=self.num_new is not None)

    def select(self, layer: int, q: torch.Tensor, weights: torch.Tensor, topk: int,
               as_slots: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """DeepSeek-V3.2's sparse selection over one layer's cached indexer keys (written first,
        `write_index`): each query column keeps the `topk` visible positions (causal, as in
        `visible`) of highest score sum_h weights[h] * relu(q[h] . key), ties to the lower
        position (`mla.ops.select`).

        Args:
            q: [b, s, index_n_heads, index_head_dim] roped indexer queries.
            weights: float32 [b, s, index_n_heads], every scale folded in.
            as_slots: return cache slots (the sparse decode's `indices`) instead of positions.

        Returns:
            (int32 [b, s, topk] positions or slots in ascending position order, -1 after the
            last; int32 [b, s] how many each column kept: min(topk, visible)).
        """
        cache = self.cache
        return ops.select(cache.index_format, q, weights, cache.index_pages[layer], self.block_table, self.seqlens,
                          self.max_seqlen, self.num_new, topk, cache.page_size if as_slots else None,
                          self.backend)  # fmt: skip

    def attend(self, layer: int, q: torch.Tensor, softmax_scale: float,
               indices: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Absorbed attention of q [b, s, h, r + dr] over one layer's cache, causal in the step, or
        over the slots `indices` (int32 [b, s, topk], -1 skipped: `select(..., as_slots=True)`):
        [b, s, h, r] (`mla.ops.attend`)."""
        cache = self.cache
        return ops.attend(cache.format, q, cache.pages[layer], self.block_table, self.seqlens, self.num_new,
                          self.schedule, softmax_scale, self.backend, self.masks, indices)  # fmt: skip

    def context(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """Every cached row of the batch for the decompressed form: [b, max_seqlen, r + dr] in
        `dtype` (FP8 rows dequantized exactly first); rows past a sequence's length are zero."""
        cache = self.cache
        rows = gather_pages(cache.pages[layer], self.block_table, self.max_seqlen)[:, :, 0]  # [b, L, row_width]
        values = cache.format.values(rows, dtype)
        # rows past a sequence's end come from other pages; zero them so they cannot be NaN
        in_seq = torch.arange(self.max_seqlen, device=values.device)[None, :] < self.seqlens[:, None]
        return values.masked_fill(~in_seq[..., None], 0.0)

    def _check_refill(self, seq_ids, s: int, width: int, ragged: bool, backend: str, absorbed: bool) -> None:
        if len(seq_ids) != len(self.seq_ids) or s != self.num_new_tokens or ragged != (self.num_new is not None):
            raise ValueError(
                f"out was planned for {len(self.seq_ids)} sequences of {self.num_new_tokens} new tokens "
                f"({'ragged' if self.num_new is not None else 'uniform'}), not {len(seq_ids)} of {s} "
                f"({'ragged' if ragged else 'uniform'})"
            )
        if width > self.block_table.shape[1]:
            raise ValueError(
                f"out's block table has {self.block_table.shape[1]} columns, this step needs {width}; plan the "
                "first step with a cache whose sequences were reserved to their final length"
            )
        if (backend, absorbed) != (self.backend, self.absorbed):
            raise ValueError(
                f"out runs backend {self.backend!r} (absorbed={self.absorbed}), this step {backend!r} (absorbed={absorbed})"
            )

    def _refill(self, new: StepPlan) -> StepPlan:
        for name in ("positions", "slots", "block_table", "seqlens", "num_new", "cos", "sin"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(new, name), non_blocking=True)
        for name in ("schedule", "masks"):
            if getattr(self, name) is not None:
                for mine, theirs in zip(getattr(self, name), getattr(new, name)):
                    mine.copy_(theirs, non_blocking=True)
        self.seq_ids, self.max_seqlen = new.seq_ids, new.max_seqlen
        return self

