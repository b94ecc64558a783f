"""Paged latent cache: the compressed KV cache of MLA, in the layout the decode kernel reads.

Per layer and token MLA only needs the normalized latent c_kv [kv_lora_rank] and the roped
shared key k_pe [rope_dim] (576 values for DeepSeek-V3). They live in fixed-size pages,
`pages[layer]` of shape [num_pages, page_size, 1, row_width], shared by all sequences through
a free list; each sequence owns an ordered list of pages (its block table row) and a length.
Token t of a sequence sits at row t % page_size of its page t // page_size. How a row is laid
out (plain bf16/fp16/fp32, or the 656-byte FP8 row) belongs to the cache's `format`
(`mla.formats`). A DeepSeek-V3.2 cache (`index_head_dim` given) also holds each token's
lightning-indexer key, `index_pages[layer]`, at the same slot: one block table, so a reservation,
truncation or free covers latents and index keys together.

Bookkeeping (sequences, their pages, the free list, all-or-nothing reservations) is
`mla.pages.PagedSequences`, shared with DeepSeek-V4's cache, on the host; `plan` turns it into
the device tables of one forward step (`mla.plan.StepPlan`), validating the sequence ids once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from mla import ops
from mla.backend import check_backend, resolve_backend
from mla.formats import cache_format, index_key_format
from mla.pages import CacheFullError, PagedSequences, as_int, positive
from mla.plan import StepPlan
from mla.reference.cache import check_write_args

__all__ = ["CacheFullError", "LatentCache"]


class LatentCache(PagedSequences):
    """Paged cache of MLA latents for `num_layers` layers and many sequences.

    Args:
        num_layers: layers stored (one page tensor each).
        num_pages: pages in the pool, shared by all sequences and all layers (a page id
            names the same slot range in every layer).
        page_size: tokens per page (the kernel's page_block_size).
        kv_lora_rank: latent channels r (512 for DeepSeek-V3).
        rope_dim: roped key channels dr (64 for DeepSeek-V3).
        dtype: torch.bfloat16, torch.float16 or torch.float32 (rows stored as they are), or
            "fp8" / torch.float8_e4m3fn: FlashMLA's FP8 row (`mla.formats.Fp8Format`: needs
            kv_lora_rank < 128 or a multiple of 128, kv_lora_rank % 4 == 0, an even rope_dim).
        device: where the pages and the step tables live.
        backend: "triton" (the write kernels; CUDA or TRITON_INTERPRET=1), "reference"
            (PyTorch indexing) or None: the rule of `mla.backend`. Plans of this cache use it
            unless the model names its own.
        index_head_dim: None, or the width of DeepSeek-V3.2's indexer key (128): the cache then
            also stores one key per token per layer, in `index_format`
            (`mla.formats.index_key_format`: the dtype's plain row, or 132-byte FP8 with an FP8
            cache).

    Attributes:
        pages: tuple of num_layers tensors [num_pages, page_size, 1, row_width], the `k_cache`
            argument of `flash_mla_with_kvcache` (first kv_lora_rank channels are V). FP8:
            uint8 [num_pages, page_size, 1, bytes_per_token], passed with is_fp8_kvcache=True.
        format: the row format (`mla.formats`): bytes per token, offsets, pack / unpack.
        dtype: the dtype given; torch.float8_e4m3fn for an FP8 cache.
        is_fp8: whether rows are FP8 (`flash_mla_with_kvcache(..., is_fp8_kvcache=cache.is_fp8)`).
        index_pages: with index_head_dim, num_layers tensors [num_pages, page_size, 1,
            index_format.row_width] of indexer keys; else ().
        index_format: the indexer key row format, or None.

    A forward step: `reserve(ids, s)`, then `plan(ids, s, config)` (slots, block table, lengths,
    positions, rotary tables, kernel schedule, backend: what every layer reads), then per layer
    `plan.write(layer, latent, k_pe)` and `plan.attend(layer, q, scale)`. By hand: `slot_mapping`,
    `write`, `block_table`, `seqlens`.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        backend: str | None = None,
        index_head_dim: int | None = None,
    ):
        super().__init__(num_pages, page_size)
        self.num_layers = positive("num_layers", num_layers)
        self.kv_lora_rank = positive("kv_lora_rank", kv_lora_rank)
        self.rope_dim = positive("rope_dim", rope_dim)
        self.backend = check_backend(backend)
        self.format = cache_format(dtype, self.kv_lora_rank, self.rope_dim)
        self.dtype = self.format.dtype
        self.device = torch.device(device)
        self.pages = tuple(self.format.allocate(self.num_pages, self.page_size, self.device) for _ in range(num_layers))
        self.index_head_dim = None if index_head_dim is None else positive("index_head_dim", index_head_dim)
        self.index_format = None if index_head_dim is None else index_key_format(dtype, self.index_head_dim)
        self.index_pages = tuple(
            self.index_format.allocate(self.num_pages, self.page_size, self.device) for _ in range(num_layers)
        ) if self.index_format else ()  # fmt: skip
        # Block-table rows kept up to date on the host as pages come and go, so a step's table
        # is one gather, not a loop over every page of every sequence. Entries past a
        # sequence's pages are 0.
        self._rows: dict[int, int] = {}
        self._free_rows: list[int] = []
        self._table = torch.zeros(0, self.num_pages, dtype=torch.int32)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies in one layer, latent row plus indexer key (DeepSeek-V3: 576 * 2
        = 1152 in bf16, 656 in FP8; DeepSeek-V3.2: 1152 + 256 and 656 + 132)."""
        return self.format.bytes_per_token + (self.index_format.bytes_per_token if self.index_format else 0)

    @property
    def is_fp8(self) -> bool:
        """Whether the pages hold FP8 rows (quantized on write, `is_fp8_kvcache=True` to attend)."""
        return self.format.is_fp8

    def bytes_used(self) -> int:
        """Bytes of the pages owned by sequences, over all layers (whole pages, not tokens)."""
        owned = self.num_pages - len(self._free)
        return owned * self.page_size * self.bytes_per_token * self.num_layers

    def _added(self, sid: int) -> None:
        if not self._free_rows:
            grown = max(4, 2 * self._table.shape[0])
            self._free_rows = list(range(grown - 1, self._table.shape[0] - 1, -1))
            self._table = torch.cat([self._table, self._table.new_zeros(grown - self._table.shape[0], self.num_pages)])
        self._rows[sid] = self._free_rows.pop()

    def _taken(self, sid: int, first: int, pages: list[int]) -> None:
        self._table[self._rows[sid], first : first + len(pages)] = torch.tensor(pages, dtype=torch.int32)

    def _released(self, sid: int, keep: int, count: int) -> None:
        self._table[self._rows[sid], keep:count] = 0

    def _dropped(self, sid: int) -> None:
        self._free_rows.append(self._rows.pop(sid))

    def plan(
        self,
        seq_ids: Iterable[int],
        num_new_tokens: int | Sequence[int],
        config,
        rotary=None,
        backend: str | None = None,
        table_width: int = 1,
        out: StepPlan | None = None,
    ) -> StepPlan:
        """The tables of one forward step that adds `num_new_tokens` (already reserved) to each sequence.

        Args:
            seq_ids: b distinct sequence ids, each holding at least its new tokens.
            num_new_tokens: s, the new tokens of every sequence (the last s of each); or one count
                per sequence (ragged: n_i >= 0, some > 0): the step has s = max n_i columns, row
                i's new tokens are its first n_i columns and the rest is padding, written nowhere
                and seen by no one.
            config: the `mla.MLAConfig` of the layers that read the plan.
            rotary: the layers' `mla.rope.RotaryEmbedding` (made from config when None).
            backend: "triton", "reference" or None (this cache's backend, else the rule of `mla.backend`).
            table_width: the block table has at least this many columns (a plan that later steps
                refill needs room for the pages they will own).
            out: a plan to refill in place (same batch and s, its block table wide enough), so
                that tensors captured in a CUDA graph see this step's values.

        Returns:
            `mla.plan.StepPlan`. The ids are validated here and nowhere after.
        """
        ids = self._check_ids(seq_ids, distinct=True)
        counts = self._counts(num_new_tokens, ids, "num_new_tokens")
        lengths = [self._lengths[s] for s in ids]
        short = [(sid, length) for sid, length, n in zip(ids, lengths, counts) if length < n]
        if not any(counts) or short:
            raise ValueError(
                f"a step adds num_new_tokens >= 1 tokens that are already reserved; got {num_new_tokens}, and "
                f"sequences (id, length) {short} hold fewer: call cache.reserve(seq_ids, num_new_tokens) first"
            )
        table = self._host_table(ids)  # [b, width]
        table = F.pad(table, (0, max(0, as_int("table_width", table_width) - table.shape[1])))
        # positions and slots in plain Python: a step has few new tokens, and a torch op per
        # table costs more than the loop
        s, page_size = max(counts), self.page_size
        positions, slots = [], []
        for sid, length, n in zip(ids, lengths, counts):
            pages = self._seq_pages[sid]
            for p in range(length - n, length - n + s):  # padding columns past each n_i
                positions.append(p)
                slots.append(pages[p // page_size] * page_size + p % page_size if p < length else -1)
        backend = resolve_backend(backend if backend is not None else self.backend, self.device)
        num_new = None if len(set(counts)) <= 1 else counts
        return StepPlan.build(self, ids, positions, slots, table, lengths, num_new, config, rotary, backend, out)

    def slot_mapping(self, seq_ids: Iterable[int], positions) -> torch.Tensor:
        """Flat slots (page * page_size + offset) of token positions, in the order given.

        Args:
            seq_ids: b sequence ids.
            positions: integer [b, n] tensor or list of b lists of n token positions; each
                must be in [0, length) of its sequence, i.e. already reserved.

        Returns:
            int64 [b * n] on the cache's device, row-major over (sequence, position).
        """
        ids = self._check_ids(seq_ids)
        if isinstance(positions, torch.Tensor):
            if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
                raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
            pos = positions.detach().to("cpu", torch.int64)
        else:
            try:
                pos = torch.tensor(positions, dtype=torch.int64)
            except (TypeError, ValueError) as e:
                raise ValueError(f"positions must be a rectangular list of lists of ints: {e}") from None
        if pos.numel() == 0 and pos.dim() == 1:
            pos = pos.view(len(ids), 0)
        if pos.dim() != 2 or pos.shape[0] != len(ids):
            raise ValueError(f"positions must be [b={len(ids)}, n], got shape {tuple(pos.shape)}")
        lengths = torch.tensor([self._lengths[s] for s in ids], dtype=torch.int64)
        bad = (pos < 0) | (pos >= lengths[:, None])
        if bad.any():
            i, j = (x.item() for x in torch.nonzero(bad)[0])
            raise ValueError(
                f"position {pos[i, j].item()} of sequence {ids[i]} is outside its reservation [0, {lengths[i].item()})"
            )
        table = self._host_table(ids).long()
        slots = table.gather(1, pos // self.page_size) * self.page_size + pos % self.page_size
        return slots.flatten().to(self.device)

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
              index_keys: torch.Tensor | None = None) -> None:  # fmt: skip
        """Store one layer's rows for n tokens.

        Args:
            layer: index in [0, num_layers).
            slots: int64 [n] on the cache's device, from `slot_mapping` (which checks the
                reservation); distinct.
            latent: [n, kv_lora_rank] normalized latent, in the cache dtype; for an FP8 cache
                bfloat16, float16 or float32, quantized on the way in.
            k_pe: [n, rope_dim] roped key, like latent (FP8: stored as bfloat16).
            index_keys: [n, index_head_dim] indexer keys, any float dtype: required exactly when
                the cache has index keys (so a row's latent and key are always written together).
        """
        layer = self._check_layer(layer)
        # The writers infer the split from the inputs; only the cache knows the real one.
        for name, t, channels in (("latent", latent, self.kv_lora_rank), ("k_pe", k_pe, self.rope_dim)):
            if t.dim() != 2 or t.shape[1] != channels:
                raise ValueError(f"{name} must be [n, {channels}], got shape {tuple(t.shape)}")
        if (index_keys is None) != (self.index_format is None):
            raise ValueError(
                f"index_keys must be given exactly when the cache holds indexer keys (index_head_dim="
                f"{self.index_head_dim}), got {'none' if index_keys is None else tuple(index_keys.shape)}"
            )
        check_write_args(self.pages[layer], slots, latent, k_pe, fp8=self.is_fp8)
        if index_keys is not None:
            if not isinstance(index_keys, torch.Tensor) or not index_keys.is_floating_point():
                raise TypeError(f"index_keys must be a float tensor, got {index_keys!r}")
            if tuple(index_keys.shape) != (slots.shape[0], self.index_head_dim):
                raise ValueError(
                    f"index_keys must be [n={slots.shape[0]}, {self.index_head_dim}], got {tuple(index_keys.shape)}"
                )
        ops.write(self.format, self.pages[layer], slots, latent, k_pe, resolve_backend(self.backend, self.device))
        if index_keys is not None:
            ops.write_index(self.index_format, self.index_pages[layer], slots, index_keys.to(self.device))

    def read(self, layer: int, sid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All `length(sid)` rows of one layer: (latent [L, kv_lora_rank], k_pe [L, rope_dim]).

        In the cache dtype; an FP8 cache returns float32, which holds the dequantized latent
        (code * power-of-two scale) and the bfloat16 k_pe exactly.
        """
        layer = self._check_layer(layer)
        sid = self._check_id(sid)
        slots = self.slot_mapping([sid], torch.arange(self._lengths[sid])[None])
        pages = self.pages[layer]
        return self.format.unpack(pages[slots // self.page_size, slots % self.page_size, 0])

    def read_index(self, layer: int, sid: int) -> torch.Tensor:
        """All `length(sid)` indexer keys of one layer: [L, index_head_dim] in the cache dtype
        (an FP8 cache: float32, the dequantized keys exactly)."""
        if self.index_format is None:
            raise ValueError("this cache holds no indexer keys (index_head_dim=None)")
        layer = self._check_layer(layer)
        sid = self._check_id(sid)
        slots = self.slot_mapping([sid], torch.arange(self._lengths[sid])[None])
        rows = self.index_pages[layer][slots // self.page_size, slots % self.page_size, 0]
        return self.index_format.unpack(rows)[0]

    def block_table(self, seq_ids: Iterable[int]) -> torch.Tensor:
        """int32 [b, max pages owned by these sequences] page ids, padded with 0.

        At least one column, so a batch of empty sequences still gives kernels a valid table.
        """
        return self._host_table(self._check_ids(seq_ids)).to(self.device)

    def seqlens(self, seq_ids: Iterable[int]) -> torch.Tensor:
        """int32 [b] lengths of the sequences, on the cache's device."""
        ids = self._check_ids(seq_ids)
        return torch.tensor([self._lengths[s] for s in ids], dtype=torch.int32, device=self.device)

    def __repr__(self) -> str:
        return (
            f"LatentCache(num_layers={self.num_layers}, num_pages={self.num_pages}, page_size={self.page_size}, "
            f"kv_lora_rank={self.kv_lora_rank}, rope_dim={self.rope_dim}, dtype={self.dtype}, device={self.device}, "
            f"index_head_dim={self.index_head_dim}, "
            f"sequences={len(self._lengths)}, free_pages={len(self._free)})"
        )

    def _host_table(self, ids: list[int]) -> torch.Tensor:
        """int32 [b, max(1, max pages)] on the CPU."""
        width = max([1] + [len(self._seq_pages[s]) for s in ids])
        return self._table[[self._rows[s] for s in ids], :width]

    def _check_layer(self, layer) -> int:
        layer = as_int("layer", layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for a cache of {self.num_layers} layers")
        return layer
