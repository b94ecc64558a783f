"""Paged latent cache: the compressed KV cache of MLA, in the layout the decode kernel reads.

Per layer and token MLA only needs the normalized latent c_kv [kv_lora_rank] and the roped
shared key k_pe [rope_dim] (576 values for DeepSeek-V3). They live in fixed-size pages,
`pages[layer]` of shape [num_pages, page_size, 1, kv_lora_rank + rope_dim], shared by all
sequences through a free list; each sequence owns an ordered list of pages (its block table
row) and a length. Token t of a sequence sits at row t % page_size of its page t // page_size.

With dtype="fp8" a row is instead the FP8 format of `mla.reference.quant` (float8_e4m3fn
latent codes, one float32 scale per 128-value tile, bfloat16 k_pe: 656 bytes for DeepSeek-V3
instead of 1,152 in bf16), quantized on write and read by the decode kernel with
`is_fp8_kvcache=True`.

Bookkeeping is plain Python on the host; only `write` and `read` touch the page tensors.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence

import torch

from mla.reference.cache import write_latent as write_latent_reference
from mla.reference.quant import dequantize_latent_fp8, fp8_bytes_per_token
from mla.reference.quant import write_latent_fp8 as write_latent_fp8_reference

_BACKENDS = ("triton", "reference")
FP8_NAMES = ("fp8", "float8", "float8_e4m3fn")
"""Strings that select the FP8 cache (any case); torch.float8_e4m3fn does too."""


# The Triton writers are imported on first use: `import mla` does not load Triton, which a
# CPU without the interpreter (reference backend) never runs.
def write_latent_triton(pages, slots, latent, k_pe):
    """`mla.kernels.cache.write_latent`, imported when first called."""
    from mla.kernels.cache import write_latent

    return write_latent(pages, slots, latent, k_pe)


def write_latent_fp8_triton(pages, slots, kv, k_pe):
    """`mla.kernels.quant.write_latent_fp8`, imported when first called."""
    from mla.kernels.quant import write_latent_fp8

    return write_latent_fp8(pages, slots, kv, k_pe)


def is_fp8_dtype(dtype) -> bool:
    """Whether `dtype` names the FP8 cache: torch.float8_e4m3fn or one of FP8_NAMES."""
    if isinstance(dtype, str):
        return dtype.lower() in FP8_NAMES
    return dtype == torch.float8_e4m3fn


class CacheFullError(RuntimeError):
    """Not enough free pages for a reservation. The cache is left exactly as it was."""


class _PlainLayout:
    """Rows stored as they are, `[latent | k_pe]` in one floating dtype.

    A layout owns how a layer's pages are allocated, written and read back; `_Fp8Layout`
    (FP8 rows with scales) plugs in with the same members.
    """

    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    is_fp8 = False

    def __init__(self, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype):
        self.kv_lora_rank, self.rope_dim, self.dtype = kv_lora_rank, rope_dim, dtype
        self.bytes_per_token = (kv_lora_rank + rope_dim) * dtype.itemsize

    def allocate(self, num_pages: int, page_size: int, device: torch.device) -> torch.Tensor:
        # Zeros, not empty: a padded block-table entry points at page 0, and kernels that
        # load a whole page before masking must not pick up NaN from never-written memory.
        return torch.zeros(num_pages, page_size, 1, self.kv_lora_rank + self.rope_dim, dtype=self.dtype, device=device)

    def write(self, pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, backend: str):
        (write_latent_triton if backend == "triton" else write_latent_reference)(pages, slots, latent, k_pe)

    def read(self, pages: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = pages[slots // pages.shape[1], slots % pages.shape[1], 0]  # [n, r + dr]
        return rows[:, : self.kv_lora_rank], rows[:, self.kv_lora_rank :]


class _Fp8Layout:
    """Rows in the FP8 format of `mla.reference.quant`: uint8 [fp8_bytes_per_token(r, dr)] per token.

    Bytes [0, r) are float8_e4m3fn codes of the latent, then one float32 scale per tile of
    min(128, r) latent values, then k_pe as bfloat16 (not quantized). Writes quantize
    bfloat16 / float16 / float32 input; reads dequantize exactly (code * power-of-two scale).
    """

    dtype = torch.float8_e4m3fn
    is_fp8 = True

    def __init__(self, kv_lora_rank: int, rope_dim: int):
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        # raises ValueError for a kv_lora_rank that is not a whole number of scale tiles
        self.bytes_per_token = fp8_bytes_per_token(kv_lora_rank, rope_dim)

    def allocate(self, num_pages: int, page_size: int, device: torch.device) -> torch.Tensor:
        # All-zero bytes are codes 0 with scale 0.0 and k_pe 0: a never-written row reads as zeros.
        return torch.zeros(num_pages, page_size, 1, self.bytes_per_token, dtype=torch.uint8, device=device)

    def write(self, pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, backend: str):
        (write_latent_fp8_triton if backend == "triton" else write_latent_fp8_reference)(pages, slots, latent, k_pe)

    def read(self, pages: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = pages[slots // pages.shape[1], slots % pages.shape[1], 0]  # [n, bytes]
        latent, k_pe = dequantize_latent_fp8(rows, self.kv_lora_rank, self.rope_dim)
        return latent, k_pe.float()


def _make_layout(dtype, kv_lora_rank: int, rope_dim: int) -> _PlainLayout | _Fp8Layout:
    if is_fp8_dtype(dtype):
        return _Fp8Layout(kv_lora_rank, rope_dim)
    if not isinstance(dtype, str) and dtype in _PlainLayout.dtypes:
        return _PlainLayout(kv_lora_rank, rope_dim, dtype)
    raise ValueError(
        f"dtype must be one of {_PlainLayout.dtypes}, torch.float8_e4m3fn or one of the strings {FP8_NAMES} "
        f"(FP8 cache), got {dtype!r}"
    )


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _positive(name: str, value) -> int:
    value = _as_int(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class LatentCache:
    """Paged cache of MLA latents for `num_layers` layers and many sequences.

    Args:
        num_layers: layers stored (one page tensor each).
        num_pages: pages in the pool, shared by all sequences and all layers (a page id
            names the same slot range in every layer).
        page_size: tokens per page (the kernel's page_block_size).
        kv_lora_rank: latent channels r (512 for DeepSeek-V3).
        rope_dim: roped key channels dr (64 for DeepSeek-V3).
        dtype: torch.bfloat16, torch.float16 or torch.float32 (rows stored as they are), or
            "fp8" / torch.float8_e4m3fn: the FP8 cache of `mla.reference.quant`, which needs
            kv_lora_rank < 128 or a multiple of 128 (one float32 scale per tile of 128).
        device: where the pages, block tables and lengths live.
        backend: "triton" (the write kernel; CUDA or TRITON_INTERPRET=1), "reference"
            (PyTorch indexing) or None: Triton on CUDA or under the interpreter, else reference.

    Attributes:
        pages: tuple of num_layers tensors [num_pages, page_size, 1, kv_lora_rank + rope_dim],
            the `k_cache` argument of `flash_mla_with_kvcache` (first kv_lora_rank channels are V).
            FP8: uint8 [num_pages, page_size, 1, bytes_per_token], passed with is_fp8_kvcache=True.
        dtype: the dtype given; torch.float8_e4m3fn for an FP8 cache.
        is_fp8: whether rows are FP8 (`flash_mla_with_kvcache(..., is_fp8_kvcache=cache.is_fp8)`).

    A decode step: `reserve(ids, 1)`, `slots = slot_mapping(ids, positions)`, then for each
    layer `write(layer, slots, latent, k_pe)` and attend with `block_table(ids)` and `seqlens(ids)`.
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
    ):
        self.num_layers = _positive("num_layers", num_layers)
        self.num_pages = _positive("num_pages", num_pages)
        self.page_size = _positive("page_size", page_size)
        self.kv_lora_rank = _positive("kv_lora_rank", kv_lora_rank)
        self.rope_dim = _positive("rope_dim", rope_dim)
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
        self._layout = _make_layout(dtype, self.kv_lora_rank, self.rope_dim)
        self.dtype = self._layout.dtype
        self.device = torch.device(device)
        self.backend = backend
        self.pages = tuple(
            self._layout.allocate(self.num_pages, self.page_size, self.device) for _ in range(num_layers)
        )
        # A stack: pop() hands out page 0 first and reuses the most recently freed page.
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))
        self._seq_pages: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies in one layer (DeepSeek-V3: 576 * 2 = 1152 in bf16, 656 in FP8)."""
        return self._layout.bytes_per_token

    @property
    def is_fp8(self) -> bool:
        """Whether the pages hold FP8 rows (quantized on write, `is_fp8_kvcache=True` to attend)."""
        return self._layout.is_fp8

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def bytes_used(self) -> int:
        """Bytes of the pages owned by sequences, over all layers (whole pages, not tokens)."""
        owned = self.num_pages - len(self._free)
        return owned * self.page_size * self.bytes_per_token * self.num_layers

    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id (ids are never reused)."""
        sid = self._next_id
        self._next_id += 1
        self._seq_pages[sid] = []
        self._lengths[sid] = 0
        return sid

    def length(self, sid: int) -> int:
        """Tokens reserved for sequence `sid` (written or about to be)."""
        return self._lengths[self._check_id(sid)]

    def reserve(self, seq_ids: Iterable[int], n: int | Sequence[int]) -> None:
        """Grow each sequence by n tokens (one int for all, or one per sequence), taking pages as needed.

        All or nothing: raises CacheFullError, with every sequence unchanged, if the pool
        cannot cover the whole request.
        """
        ids = self._check_ids(seq_ids, distinct=True)
        if isinstance(n, torch.Tensor) and n.dim() == 1:
            n = n.tolist()
        if isinstance(n, Sequence):
            if len(n) != len(ids):
                raise ValueError(f"n has {len(n)} counts for {len(ids)} sequences")
            counts = [_as_int("n", c) for c in n]
        else:
            counts = [_as_int("n", n)] * len(ids)
        for sid, count in zip(ids, counts):
            if count < 0:
                raise ValueError(f"n must be >= 0, got {count} for sequence {sid}")
        new_pages = [self._pages_for(self._lengths[s] + c) - len(self._seq_pages[s]) for s, c in zip(ids, counts)]
        if sum(new_pages) > len(self._free):
            raise CacheFullError(
                f"reserving {counts} tokens for sequences {ids} needs {sum(new_pages)} new pages, "
                f"only {len(self._free)} of {self.num_pages} are free; free or truncate sequences first"
            )
        for sid, count, k in zip(ids, counts, new_pages):
            self._seq_pages[sid].extend(self._free.pop() for _ in range(k))
            self._lengths[sid] += count

    def truncate(self, sid: int, new_length: int) -> None:
        """Shorten sequence `sid` to `new_length` tokens; pages no longer used go back to the pool."""
        self._check_id(sid)
        new_length = _as_int("new_length", new_length)
        if not 0 <= new_length <= self._lengths[sid]:
            raise ValueError(f"cannot truncate sequence {sid} of length {self._lengths[sid]} to {new_length}")
        pages = self._seq_pages[sid]
        keep = self._pages_for(new_length)
        self._free.extend(reversed(pages[keep:]))
        del pages[keep:]
        self._lengths[sid] = new_length

    def free(self, sid: int) -> None:
        """Drop sequence `sid` and return all its pages to the pool."""
        self._check_id(sid)
        self._free.extend(reversed(self._seq_pages.pop(sid)))
        del self._lengths[sid]

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
        table = self._table(ids)
        slots = table.gather(1, pos // self.page_size) * self.page_size + pos % self.page_size
        return slots.flatten().to(self.device)

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store one layer's rows for n tokens.

        Args:
            layer: index in [0, num_layers).
            slots: int64 [n] on the cache's device, from `slot_mapping` (which checks the
                reservation); distinct.
            latent: [n, kv_lora_rank] normalized latent, in the cache dtype; for an FP8 cache
                bfloat16, float16 or float32, quantized on the way in.
            k_pe: [n, rope_dim] roped key, like latent (FP8: stored as bfloat16).
        """
        layer = self._check_layer(layer)
        # The kernel infers the split from the inputs; only the cache knows the real one.
        for name, t, channels in (("latent", latent, self.kv_lora_rank), ("k_pe", k_pe, self.rope_dim)):
            if t.dim() != 2 or t.shape[1] != channels:
                raise ValueError(f"{name} must be [n, {channels}], got shape {tuple(t.shape)}")
        backend = self.backend or ("triton" if self._triton_auto() else "reference")
        self._layout.write(self.pages[layer], slots, latent, k_pe, backend)

    def read(self, layer: int, sid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All `length(sid)` rows of one layer: (latent [L, kv_lora_rank], k_pe [L, rope_dim]).

        In the cache dtype; an FP8 cache returns float32, which holds the dequantized latent
        (code * power-of-two scale) and the bfloat16 k_pe exactly.
        """
        layer = self._check_layer(layer)
        sid = self._check_id(sid)
        slots = self.slot_mapping([sid], torch.arange(self._lengths[sid])[None])
        return self._layout.read(self.pages[layer], slots)

    def block_table(self, seq_ids: Iterable[int]) -> torch.Tensor:
        """int32 [b, max pages owned by these sequences] page ids, padded with 0.

        At least one column, so a batch of empty sequences still gives kernels a valid table.
        """
        return self._table(self._check_ids(seq_ids)).to(self.device, torch.int32)

    def seqlens(self, seq_ids: Iterable[int]) -> torch.Tensor:
        """int32 [b] lengths of the sequences, on the cache's device."""
        ids = self._check_ids(seq_ids)
        return torch.tensor([self._lengths[s] for s in ids], dtype=torch.int32, device=self.device)

    def __repr__(self) -> str:
        return (
            f"LatentCache(num_layers={self.num_layers}, num_pages={self.num_pages}, page_size={self.page_size}, "
            f"kv_lora_rank={self.kv_lora_rank}, rope_dim={self.rope_dim}, dtype={self.dtype}, device={self.device}, "
            f"sequences={len(self._lengths)}, free_pages={len(self._free)})"
        )

    def _table(self, ids: list[int]) -> torch.Tensor:
        """int64 [b, max(1, max pages)] on the CPU."""
        width = max([1] + [len(self._seq_pages[s]) for s in ids])
        table = torch.zeros(len(ids), width, dtype=torch.int64)
        for row, sid in enumerate(ids):
            pages = self._seq_pages[sid]
            table[row, : len(pages)] = torch.tensor(pages, dtype=torch.int64)
        return table

    def _pages_for(self, length: int) -> int:
        return -(-length // self.page_size)

    def _triton_auto(self) -> bool:
        return self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

    def _check_layer(self, layer) -> int:
        layer = _as_int("layer", layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for a cache of {self.num_layers} layers")
        return layer

    def _check_id(self, sid) -> int:
        sid = _as_int("sequence id", sid)
        if sid not in self._lengths:
            if 0 <= sid < self._next_id:
                raise ValueError(f"sequence {sid} was already freed")
            raise ValueError(f"unknown sequence id {sid}")
        return sid

    def _check_ids(self, seq_ids: Iterable[int], distinct: bool = False) -> list[int]:
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        if not isinstance(seq_ids, Iterable) or isinstance(seq_ids, (str, bytes)):
            raise TypeError(f"seq_ids must be a sequence of ints, got {seq_ids!r}")
        ids = [self._check_id(s) for s in seq_ids]
        if distinct and len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids {ids} lists a sequence more than once")
        return ids
