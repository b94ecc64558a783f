"""The decode contract: what `flash_mla_with_kvcache` and `flash_mla_sparse_fwd` accept.

Checked here, once, for both implementations: the Triton launchers (`mla.kernels.decode`)
and their PyTorch twins (`mla.reference.decode`) call the same functions first, so the two
raise the same error (type and message) for the same bad input. Errors name the argument
and the bad value: TypeError for a wrong type or dtype, ValueError for a wrong rank, shape,
device or value.

Two kinds of checks:
- structural (types, dtypes, ranks, shapes, devices, the cache format): always; they read
  only metadata, so they cost no device work and trace under torch.compile;
- value checks (lengths, page ids, indices read on the host): on CPU tensors always (the
  Triton interpreter dies on an out-of-bounds access), on CUDA only with MLA_DEBUG=1 (each
  would synchronise the device), and never while torch.compile traces (data-dependent).
  Without them the kernel still reads nothing outside the cache: slots outside it are
  skipped like -1 entries.

The cache format (`mla.formats`) owns the row layout; the contract only asks it, and asks
`mla.formats.decode_format` which format a call reads (plain, V3's FP8 row, or V4's MODEL1
pages for FP8 with d = head_dim_v = 512 over 584-byte tokens), so kernel and twin agree.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from mla.formats import PLAIN_DTYPES, CacheFormat, PlainFormat, decode_format


Q_DTYPES = PLAIN_DTYPES
"""dtypes of q the kernels compute in (with a plain cache, the cache has q's dtype)."""

REFERENCE_Q_DTYPES = (*PLAIN_DTYPES, torch.float64)
"""The reference also takes a float64 q (over an FP8 cache, which it dequantizes exactly), so a
float64 model can use it as exact ground truth; every other input is checked as for the kernels."""


@dataclasses.dataclass
class FlashMLASchedMeta:
    """A decode schedule planned on its first use (FlashMLA's current `get_mla_metadata()` form).

    `get_mla_metadata()` returns an empty one; the first `flash_mla_with_kvcache` call that
    receives it records the call's configuration and (Triton) plans the split-KV schedule from
    that call's lengths. Later calls must have the same configuration (ValueError naming the
    field otherwise) and, as in FlashMLA, the same cache_seqlens / topk_length /
    extra_topk_length values: the schedule is reused as planned, e.g. by every layer of a step.

    Attributes:
        num_sm: processors the schedule fills (None: the device's; CPU cores under the interpreter).
        have_initialized: whether a call has recorded `config`.
        config: the recorded configuration.
        tile_scheduler_metadata: int32 [b, splits + 1] split boundaries (Triton only).
        num_splits: int32 [b + 1] prefix sums of non-empty splits (Triton only).
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: int | None
        extra_page_block_size: int | None
        extra_topk: int | None

    num_sm: int | None = None
    have_initialized: bool = False
    config: Config | None = None
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class DecodeCall:
    """Facts of a validated `flash_mla_with_kvcache` call.

    fmt is the format both caches are read in; page_size / num_slots of k_cache (num_slots =
    num_blocks * page_size, the range of a slot); the extra_* fields are None without an
    extra cache. `per_token`: every query token has its own key list (indices or an extra
    cache), so the kernel tiles query rows one token at a time.
    """

    fmt: CacheFormat
    b: int
    s_q: int
    h_q: int
    h_kv: int
    dv: int
    page_size: int
    num_slots: int
    scale: float
    causal: bool
    topk: int | None
    extra_page_size: int | None
    extra_num_slots: int | None
    extra_topk: int | None

    @property
    def sparse(self) -> bool:
        return self.topk is not None

    @property
    def has_extra(self) -> bool:
        return self.extra_topk is not None

    @property
    def per_token(self) -> bool:
        return self.sparse or self.has_extra

    def config(self) -> FlashMLASchedMeta.Config:
        """What a FlashMLASchedMeta records of this call."""
        return FlashMLASchedMeta.Config(
            b=self.b, s_q=self.s_q, h_q=self.h_q, page_block_size=self.page_size, h_k=self.h_kv, causal=self.causal,
            is_fp8_kvcache=self.fmt.is_fp8, topk=self.topk, extra_page_block_size=self.extra_page_size,
            extra_topk=self.extra_topk,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PrefillCall:
    """Facts of a validated `flash_mla_sparse_fwd` call."""

    s_q: int
    s_kv: int
    h_kv: int
    topk: int
    scale: float


def reads_values(device: torch.device) -> bool:
    """Whether value checks run for tensors on `device` (module docstring)."""
    if torch.compiler.is_compiling():
        return False
    return torch.device(device).type == "cpu" or os.environ.get("MLA_DEBUG", "0") == "1"


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}" if isinstance(x, (int, float, bool)) else type(x).__name__


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(t)}")
    return t


def _int32(name: str, t, shape: str, rank: int) -> torch.Tensor:
    """An int32 tensor of the given rank (shape is the docstring's, for the message)."""
    _tensor(name, t)
    if t.dtype != torch.int32 or t.dim() != rank:
        raise TypeError(f"{name} must be an int32 tensor {shape}, got {describe(t)}")
    return t


def _same_device(q: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _scale(softmax_scale, d: int, name: str = "softmax_scale") -> float:
    if softmax_scale is None:
        return d**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {describe(softmax_scale)}")
    return float(softmax_scale)


def _check_sink(attn_sink, h_q: int) -> None:
    if attn_sink is None:
        return
    _tensor("attn_sink", attn_sink)
    if attn_sink.dtype != torch.float32 or attn_sink.dim() != 1:
        raise TypeError(f"attn_sink must be a float32 tensor [h_q], got {describe(attn_sink)}")
    if attn_sink.shape[0] != h_q:
        raise ValueError(f"attn_sink must have one value per query head (h_q = {h_q}), got {attn_sink.shape[0]}")


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.nonzero(bad)[0].tolist())


class Float64Rows(PlainFormat):
    """Plain float64 rows: a cache only the reference reads (`mla.v4_cache.V4Cache` in float64,
    for tests that compare paths exactly); no kernel takes them."""

    dtypes = (torch.float64,)


def _cache_format(k_cache, head_dim_v, d: int, is_fp8: bool, q_dtypes) -> CacheFormat:
    """The format k_cache is read in; ValueError naming head_dim_v when the format cannot hold it."""
    try:
        if not is_fp8 and k_cache.dtype == torch.float64 and torch.float64 in q_dtypes:
            return Float64Rows(head_dim_v, d - head_dim_v, torch.float64)
        return decode_format(k_cache, head_dim_v, d, is_fp8)
    except ValueError as e:
        kind = "FP8 " if is_fp8 else ""
        raise ValueError(f"head_dim_v={head_dim_v} with d={d} is not a valid {kind}cache row: {e}") from None


def _check_pages(fmt: CacheFormat, pages: torch.Tensor, name: str, h_kv: int | None) -> None:
    """pages [num_blocks, page_block_size, h_kv, row] of `fmt` (h_kv: the one k_cache has, if known)."""
    if pages.dim() != 4:
        raise ValueError(
            f"{name} must be [num_blocks, page_block_size, h_kv, {fmt.row_width}], got shape {tuple(pages.shape)}"
        )
    storage = fmt.check_pages(pages, name)
    if pages.shape[1] < 1 or pages.shape[2] < 1:
        raise ValueError(f"{name} needs page_block_size >= 1 and h_kv >= 1, got shape {tuple(pages.shape)}")
    if h_kv is not None and pages.shape[2] != h_kv:
        raise ValueError(f"{name} has h_kv = {pages.shape[2]} but k_cache has {h_kv}")
    if fmt.is_fp8 and (storage.stride(-1) != 1 or any(st % 4 for st in storage.stride()[:-1])):
        # readers load the scales and k_pe through float32 / bfloat16 views of the same bytes
        raise ValueError(
            f"FP8 {name} needs a contiguous last dim and other strides that are multiples of 4 bytes, "
            f"got strides {storage.stride()}"
        )


def _check_indices(name: str, indices, b: int, s_q: int) -> int:
    """int32 [b, s_q, topk] -> topk."""
    _int32(name, indices, "[b, s_q, topk]", 3)
    if tuple(indices.shape[:2]) != (b, s_q):
        raise ValueError(f"{name} must be [b={b}, s_q={s_q}, topk], got shape {tuple(indices.shape)}")
    return indices.shape[2]


def _check_topk_length(name: str, topk_length, indices_name: str, indices, b: int) -> None:
    if topk_length is None:
        return
    if indices is None:
        raise ValueError(f"{name} is given without {indices_name}")
    _int32(name, topk_length, "[b]", 1)
    if topk_length.shape[0] != b:
        raise ValueError(f"{name} must be [b={b}], got shape {tuple(topk_length.shape)}")


def check_decode(
    q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache,
    indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length, seqlens_q,
    q_dtypes=Q_DTYPES,
) -> DecodeCall:  # fmt: skip
    """Validate a `flash_mla_with_kvcache` call (arguments as documented there); see the module
    docstring for which checks run when. q_dtypes: the dtypes q may have (the reference adds
    float64)."""
    _tensor("q", q)
    _tensor("k_cache", k_cache)
    if q.dim() != 4:
        hint = "; packed [total_q, h_q, d] queries are not accepted: pad to [b, max_s_q, h_q, d] and pass seqlens_q"
        raise ValueError(f"q must be [b, s_q, h_q, d], got shape {tuple(q.shape)}{hint if q.dim() == 3 else ''}")
    if q.dtype not in q_dtypes:
        # one message for both implementations, whichever rejected q
        raise TypeError(f"q must be bfloat16, float16 or float32 (the reference also takes float64), got {q.dtype}")
    if not isinstance(causal, bool) or not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"causal and is_fp8_kvcache must be bools, got {causal!r}, {is_fp8_kvcache!r}")
    b, s_q, h_q, d = q.shape
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or not 1 <= head_dim_v <= d:
        raise ValueError(f"head_dim_v must be an int with 1 <= head_dim_v <= d ({d}), got {head_dim_v!r}")
    if not is_fp8_kvcache:
        if k_cache.dtype in (torch.uint8, torch.float8_e4m3fn):
            raise TypeError(f"k_cache is {k_cache.dtype} but is_fp8_kvcache=False: FP8 caches need is_fp8_kvcache=True")
        if k_cache.dtype != q.dtype:
            raise TypeError(
                f"k_cache dtype {k_cache.dtype} must match q dtype {q.dtype} (FP8 caches need is_fp8_kvcache=True)"
            )
    fmt = _cache_format(k_cache, head_dim_v, d, is_fp8_kvcache, q_dtypes)
    _check_pages(fmt, k_cache, "k_cache", None)
    num_blocks, page_size, h_kv = k_cache.shape[:3]
    if h_q % h_kv:
        raise ValueError(f"h_q ({h_q}) must be a multiple of the cache's h_kv ({h_kv})")
    if s_q < 1:
        raise ValueError(f"q needs s_q >= 1, got shape {tuple(q.shape)}")
    scale = _scale(softmax_scale, d)

    sparse = indices is not None
    if sparse:
        if causal:
            raise ValueError("causal must be False with indices: sparse attention attends exactly the listed slots")
        topk = _check_indices("indices", indices, b, s_q)
    else:
        topk = None
        _int32("block_table", block_table, "[b, max_blocks]", 2)
        _int32("cache_seqlens", cache_seqlens, "[b]", 1)
        if block_table.shape[0] != b or cache_seqlens.shape[0] != b:
            raise ValueError(
                f"batch mismatch: q has {b}, block_table {block_table.shape[0]}, cache_seqlens {cache_seqlens.shape[0]}"
            )
    _check_topk_length("topk_length", topk_length, "indices", indices, b)

    if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
        raise ValueError("extra_k_cache and extra_indices_in_kvcache come together: pass both or neither")
    extra_page_size = extra_num_slots = extra_topk = None
    if extra_k_cache is not None:
        _tensor("extra_k_cache", extra_k_cache)
        _check_pages(fmt, extra_k_cache, "extra_k_cache", h_kv)
        extra_page_size = extra_k_cache.shape[1]
        extra_num_slots = extra_k_cache.shape[0] * extra_page_size
        extra_topk = _check_indices("extra_indices_in_kvcache", extra_indices_in_kvcache, b, s_q)
    _check_topk_length("extra_topk_length", extra_topk_length, "extra_indices_in_kvcache", extra_indices_in_kvcache, b)
    _check_sink(attn_sink, h_q)
    if seqlens_q is not None:
        _int32("seqlens_q", seqlens_q, "[b]", 1)
        if seqlens_q.shape[0] != b:
            raise ValueError(
                f"seqlens_q must be [b={b}]: each row's number of query tokens (not cumulative offsets "
                f"as in cu_seqlens_q), got shape {tuple(seqlens_q.shape)}"
            )
    tables = dict(block_table=block_table, cache_seqlens=cache_seqlens) if not sparse else {}
    _same_device(
        q, k_cache=k_cache, **tables, indices=indices, topk_length=topk_length, extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices_in_kvcache, extra_topk_length=extra_topk_length, attn_sink=attn_sink,
        seqlens_q=seqlens_q,
    )  # fmt: skip

    if reads_values(q.device):
        n_q = seqlens_q.cpu().long() if seqlens_q is not None else torch.full((b,), s_q, dtype=torch.long)
        if seqlens_q is not None and ((n_q < 0) | (n_q > s_q)).any():
            i = _first((n_q < 0) | (n_q > s_q))[0]
            raise ValueError(f"seqlens_q[{i}] = {n_q[i].item()} is outside [0, s_q = {s_q}]")
        if sparse:
            _check_index_values("indices", indices, "topk_length", topk_length, n_q, num_blocks * page_size)
        else:
            _check_table_values(block_table, cache_seqlens, num_blocks, page_size)
        if extra_k_cache is not None:
            _check_index_values(
                "extra_indices_in_kvcache", extra_indices_in_kvcache, "extra_topk_length", extra_topk_length, n_q,
                extra_num_slots,
            )  # fmt: skip
    return DecodeCall(
        fmt=fmt, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, dv=head_dim_v, page_size=page_size,
        num_slots=num_blocks * page_size, scale=scale, causal=causal, topk=topk, extra_page_size=extra_page_size,
        extra_num_slots=extra_num_slots, extra_topk=extra_topk,
    )  # fmt: skip


def _check_table_values(block_table, cache_seqlens, num_blocks: int, page_size: int) -> None:
    lengths = cache_seqlens.cpu().long()
    if (lengths < 0).any():
        raise ValueError(f"cache_seqlens must be >= 0, got {lengths.tolist()}")
    pages_needed = (lengths + page_size - 1) // page_size
    if pages_needed.numel() and pages_needed.max().item() > block_table.shape[1]:
        raise ValueError(
            f"block_table has {block_table.shape[1]} columns but the longest sequence "
            f"({lengths.max().item()} tokens, page size {page_size}) needs {pages_needed.max().item()}"
        )
    table = block_table.cpu()
    used = torch.arange(table.shape[1])[None, :] < pages_needed[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    if bad.any():
        i, j = _first(bad)
        raise ValueError(f"block_table[{i}, {j}] = {table[i, j].item()} is outside [0, {num_blocks})")


def _check_index_values(name, indices, length_name, topk_length, n_q: torch.Tensor, num_slots: int) -> None:
    """Entries a call reads (query tokens below seqlens_q, positions below topk_length) must be
    -1 or a slot of the cache; topk_length must lie in [0, topk]."""
    b, s_q, topk = indices.shape
    limit = torch.full((b,), topk, dtype=torch.long)
    if topk_length is not None:
        limit = topk_length.cpu().long()
        bad = (limit < 0) | (limit > topk)
        if bad.any():
            i = _first(bad)[0]
            raise ValueError(f"{length_name}[{i}] = {limit[i].item()} is outside [0, topk = {topk}]")
    table = indices.cpu()
    is_query = torch.arange(s_q)[None, :, None] < n_q[:, None, None]
    read = is_query & (torch.arange(topk)[None, None, :] < limit[:, None, None])
    bad = read & ((table < -1) | (table >= num_slots))
    if bad.any():
        i, j, k = _first(bad)
        raise ValueError(
            f"{name}[{i}, {j}, {k}] = {table[i, j, k].item()} is outside [0, {num_slots}) "
            "(num_blocks * page_block_size; -1 skips an entry)"
        )


def check_schedule(call: DecodeCall, device: torch.device, tile_scheduler_metadata, num_splits) -> None:
    """Validate the schedule argument of a decode call: None, a `FlashMLASchedMeta` (whose
    configuration the first call records and later calls must match), or the old form's two
    int32 tensors from `get_mla_metadata(cache_seqlens, ...)` (dense calls only)."""
    meta = tile_scheduler_metadata
    if isinstance(meta, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError("num_splits must be None with a FlashMLASchedMeta schedule (get_mla_metadata())")
        config = call.config()
        if not meta.have_initialized:
            meta.config, meta.have_initialized = config, True
            return
        for field in dataclasses.fields(config):
            was, now = getattr(meta.config, field.name), getattr(config, field.name)
            if was != now:
                raise ValueError(
                    f"tile_scheduler_metadata was planned for {field.name}={was!r} but this call has "
                    f"{field.name}={now!r}: a schedule is reused only by calls of the same configuration"
                )
        return
    if meta is None:
        if num_splits is not None:
            raise ValueError("pass both tile_scheduler_metadata and num_splits from get_mla_metadata, or neither")
        return
    if not isinstance(meta, torch.Tensor):
        raise TypeError(
            "tile_scheduler_metadata must be a FlashMLASchedMeta, the tensor from "
            f"get_mla_metadata(cache_seqlens, ...) or None, got {describe(meta)}"
        )
    if num_splits is None:
        raise ValueError("pass both tile_scheduler_metadata and num_splits from get_mla_metadata, or neither")
    if call.per_token:
        raise ValueError(
            "tile_scheduler_metadata from get_mla_metadata(cache_seqlens, ...) plans dense calls only; "
            "with indices or an extra cache pass get_mla_metadata() (a FlashMLASchedMeta) or None"
        )
    b = call.b
    if meta.dtype != torch.int32 or meta.dim() != 2 or meta.shape[0] != b or meta.shape[1] < 2 or meta.device != device:
        raise ValueError(f"tile_scheduler_metadata must be int32 [b={b}, splits + 1] on {device}, got {describe(meta)}")
    splits_ok = isinstance(num_splits, torch.Tensor) and num_splits.dtype == torch.int32
    if not splits_ok or tuple(num_splits.shape) != (b + 1,) or num_splits.device != device:
        raise ValueError(f"num_splits must be int32 [b + 1 = {b + 1}] on {device}, got {describe(num_splits)}")


def check_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length) -> PrefillCall:
    """Validate a `flash_mla_sparse_fwd` call (arguments as documented there). Index values are
    not checked: entries below 0 or >= s_kv are skipped by definition."""
    _tensor("q", q)
    _tensor("kv", kv)
    if q.dim() != 3:
        raise ValueError(f"q must be [s_q, h_q, d], got shape {tuple(q.shape)}")
    if kv.dim() != 3:
        raise ValueError(f"kv must be [s_kv, h_kv, d], got shape {tuple(kv.shape)}")
    if q.dtype not in PLAIN_DTYPES:
        raise TypeError(f"q must be bfloat16, float16 or float32, got {q.dtype}")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv dtype {kv.dtype} must match q dtype {q.dtype}")
    s_q, h_q, d = q.shape
    s_kv, h_kv, d_k = kv.shape
    if d_k != d:
        raise ValueError(f"kv head dim {d_k} must equal q head dim {d}")
    if h_kv < 1 or h_q % h_kv:
        raise ValueError(f"h_q ({h_q}) must be a multiple of kv's h_kv ({h_kv})")
    if isinstance(d_v, bool) or not isinstance(d_v, int) or not 1 <= d_v <= d:
        raise ValueError(f"d_v must be an int with 1 <= d_v <= d ({d}), got {d_v!r}")
    _int32("indices", indices, "[s_q, h_kv, topk]", 3)
    if tuple(indices.shape[:2]) != (s_q, h_kv):
        raise ValueError(f"indices must be [s_q={s_q}, h_kv={h_kv}, topk], got shape {tuple(indices.shape)}")
    topk = indices.shape[2]
    if sm_scale is None:
        raise TypeError("sm_scale must be a float, got None")
    scale = _scale(sm_scale, d, "sm_scale")
    _check_sink(attn_sink, h_q)
    if topk_length is not None:
        _int32("topk_length", topk_length, "[s_q]", 1)
        if topk_length.shape[0] != s_q:
            raise ValueError(f"topk_length must be [s_q={s_q}], got shape {tuple(topk_length.shape)}")
    _same_device(q, kv=kv, indices=indices, attn_sink=attn_sink, topk_length=topk_length)
    if topk_length is not None and reads_values(q.device):
        limit = topk_length.cpu()
        bad = (limit < 0) | (limit > topk)
        if bad.any():
            i = _first(bad)[0]
            raise ValueError(f"topk_length[{i}] = {limit[i].item()} is outside [0, topk = {topk}]")
    return PrefillCall(s_q=s_q, s_kv=s_kv, h_kv=h_kv, topk=topk, scale=scale)
