"""Compiled-code report: what Triton makes of our kernels for sm_80, sm_89 and sm_90, no GPU needed.

Triton compiles for a named target without a device: a stub driver reports
`GPUTarget("cuda", arch, 32)` and `JITFunction.warmup` compiles without launching. The
arguments are the launchers' own: each configuration calls the real launcher
(`flash_mla_with_kvcache`, `write_latent`, `write_latent_fp8`) on fake CUDA tensors
(`torch._subclasses.fake_tensor`: shapes, strides and dtypes, no data) while every
`@triton.jit` function in the `mla.kernels` modules is replaced by a recorder, so the
constexprs, ints, strides, dtypes, num_warps and num_stages are whatever the launcher
computes with its GPU settings. Every tensor is taken as allocated by the CUDA caching
allocator (base pointer 256-byte aligned) plus its storage offset, which is what Triton's
16-byte alignment specialization sees on a real launch.

What this needs from a launcher: it launches `kernel[grid](...)` through the module-level
name of a `mla.kernels` JITFunction, and on CUDA tensors it reads no values (`.item()`,
`.tolist()`, `.cpu()`) and, for CPU-only torch builds, neither indexes with `[...]` nor
copies (`.contiguous()` of a strided tensor): those need a CUDA device guard. `torch.empty`,
`.stride()`, `.view(dtype)`, `view`, `narrow`, `select`, `split`, `permute` and `.to(dtype)`
work. A launcher that breaks this gives rows with the error, not a crash.

Per compiled kernel and arch, a row:
    registers     per thread, from `ptxas -v` (the Triton wheel's ptxas, Triton's flags)
    spill_bytes   spill stores + spill loads bytes, from the same ptxas log
    shared_bytes  shared memory per CTA (`compiled.metadata.shared`)
    mma           the weakest tensor-core instruction among the kernel's dots (from the
                  ttgir): "wgmma" (all `warp_group_dot`, sm_90), "mma" (mma.sync v2 on at
                  least one dot), "none" (a dot on FMA units, or no dot at all)
    kv_stages     buffers in the shared-memory ring of the KV stream, the largest tile
                  loaded inside a loop (`scf.for` in the ttgir). N when it arrives by async
                  copies (cp.async or TMA) into a `local_alloc` of N buffers; 0 when it is a
                  plain load into registers. 1: the copy of tile i+1 is issued only after
                  tile i has been consumed, so it overlaps no math; >= 2: the copy of tile
                  i+1 overlaps the math on tile i (software pipelining).
    ctas_per_sm   CTAs resident per SM, the least of the register, shared-memory, thread
                  and CTA limits of the arch (SM_LIMITS), 0 when the CTA cannot launch
    bytes, flops  the roofline of a decode configuration (None for the other kernels), by
                  bench.decode's formulas: bytes that must cross HBM once (cache rows read,
                  q, out, lse, key lists) and 2 FLOPs per multiply-add of QK^T and PV; their
                  ratio against a GPU's bandwidth and bf16 rate says which bound a shape hits
    error         None, or why the configuration did not compile (then the numbers are None)

    python -m bench.compiled [--archs 80 89 90] [--configs NAME ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import unittest.mock
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.compiler import make_backend
from triton.runtime.autotuner import Heuristics
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .common import REPO, format_table

ARCHS = (80, 89, 90)
FIELDS = ("kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "mma", "kv_stages",
          "ctas_per_sm", "bytes", "flops", "error")  # fmt: skip

# The SMs a decode step is planned for (H100 / H200 SXM), which sets the split count.
NUM_SMS = 132
DEEPSEEK_V3 = {"d": 576, "dv": 512}
SMALL_HEAD = {"d": 80, "dv": 64}
# One decode step: 8 sequences of 4,096 cached tokens in 64-token pages. On 132 SMs the
# launcher splits these steps, so the decode kernel runs with SPLIT=True and the combine
# kernel runs after it, as on a real small-batch step; a LARGE_BATCH step fills the GPU
# unsplit (SPLIT=False: the kernel writes the output, applies the sink, in q's dtype).
DECODE_BATCH, DECODE_SEQLEN, PAGE_SIZE = 8, 4096, 64
LARGE_BATCH = 256
# Sparse decode (DeepSeek-V3.2's top-k attention): each query token attends SPARSE_TOPK slots
# of the cache; with an extra cache (DeepSeek-V4's window + compressed entries) also
# EXTRA_TOPK slots of a second cache in the same softmax.
SPARSE_TOPK, EXTRA_TOPK = 2048, 512
# DeepSeek-V4 decode over MODEL1 FP8 pages (K = V, d = dv = 512): the sliding window's
# V4_WINDOW tokens as indices into k_cache, EXTRA_TOPK compressed entries as the extra cache.
V4_WINDOW = 128
# Sparse prefill (flash_mla_sparse_fwd): query tokens of one chunk.
PREFILL_TOKENS = 64
# One cache write: a decode step of 64 sequences, DeepSeek-V3 rows (512 latent + 64 rope).
WRITE_TOKENS = 64
# DeepSeek-V3.2's lightning indexer: 64 heads of 128 channels per query token, keys in bf16
# or FP8 (132-byte rows), the decode step's sequences; its top-k feeds sparse decode.
INDEX_HEADS, INDEX_DIM = 64, 128


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of an arch (CUDA C++ Programming Guide, "Technical Specifications per
    Compute Capability", and the Ampere / Ada / Hopper tuning guides)."""

    max_threads: int
    max_ctas: int
    shared_per_sm: int  # bytes
    shared_per_cta: int  # bytes, the opt-in maximum for one CTA


SM_LIMITS = {
    80: SMLimits(max_threads=2048, max_ctas=32, shared_per_sm=164 * 1024, shared_per_cta=163 * 1024),  # A100
    89: SMLimits(max_threads=1536, max_ctas=24, shared_per_sm=100 * 1024, shared_per_cta=99 * 1024),  # L4, L40S
    90: SMLimits(max_threads=2048, max_ctas=32, shared_per_sm=228 * 1024, shared_per_cta=227 * 1024),  # H100, H200
}
REGISTERS_PER_SM = 65536
# Registers are allocated per warp in units of 256; the runtime reserves 1 KB of shared
# memory per resident CTA.
REGISTER_UNIT = 256
RESERVED_SHARED_PER_CTA = 1024


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int:
    """CTAs of one kernel resident on one SM: the tightest of registers, shared memory, threads
    and the CTA cap; 0 when a single CTA needs more shared memory than the arch allows."""
    limits = SM_LIMITS[arch]
    if shared_bytes > limits.shared_per_cta:
        return 0
    registers_per_warp = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
    return min(
        REGISTERS_PER_SM // (registers_per_warp * num_warps),
        limits.shared_per_sm // (shared_bytes + RESERVED_SHARED_PER_CTA),
        limits.max_threads // (32 * num_warps),
        limits.max_ctas,
    )


@dataclass(frozen=True)
class Config:
    """One launcher call; the launches of `kernel` it makes become the rows."""

    name: str
    kernel: str
    call: Callable[[], None]
    work: tuple[int, int] | None = None  # (bytes, flops) of a decode configuration


def _decode_work(b: int, s_q: int, h_q: int, keys: int, d: int, dv: int, fp8: bool, rows: int | None = None):
    """(bytes, flops) of a decode call whose b x s_q query tokens each attend `keys` cache rows
    (`rows` distinct rows read from HBM, default b x keys: shared by a row's tokens, dense)."""
    from mla.formats import cache_format

    from .decode import decode_bytes, decode_flops

    fmt = cache_format(torch.float8_e4m3fn if fp8 else torch.bfloat16, dv, d - dv)
    nbytes = decode_bytes(b, s_q, h_q, keys if rows is None else rows // b, fmt, torch.bfloat16.itemsize)
    return nbytes, decode_flops(b, s_q, h_q, keys, d, dv)


def _fake_cuda(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cuda")


def _cache_row(d: int, dv: int, fp8: bool) -> tuple[int, torch.dtype]:
    """(elements, dtype) of one cached token's row."""
    from mla.reference.quant import fp8_bytes_per_token

    return (fp8_bytes_per_token(dv, d - dv), torch.uint8) if fp8 else (d, torch.bfloat16)


def _decode_call(h_q: int, s_q: int, d: int, dv: int, fp8: bool, ragged: bool = False, b: int = DECODE_BATCH) -> None:
    """flash_mla_with_kvcache as `mla.MLAttention` calls it: a contiguous absorbed q, the
    cache's pages, causal; the schedule planned by the launcher for NUM_SMS processors.
    ragged: with per-row query counts (seqlens_q, as a speculative verify step; s_q is the most)."""
    from mla.kernels import flash_mla_with_kvcache, get_mla_metadata

    pages_per_seq = DECODE_SEQLEN // PAGE_SIZE
    meta, _ = get_mla_metadata(num_sm=NUM_SMS)
    row = _cache_row(d, dv, fp8)
    flash_mla_with_kvcache(
        _fake_cuda((b, s_q, h_q, d), torch.bfloat16),
        _fake_cuda((b * pages_per_seq, PAGE_SIZE, 1, row[0]), row[1]),
        _fake_cuda((b, pages_per_seq), torch.int32),
        _fake_cuda((b,), torch.int32),
        dv,
        meta,
        causal=True,
        is_fp8_kvcache=fp8,
        seqlens_q=_fake_cuda((b,), torch.int32) if ragged else None,
    )


def _sparse_call(h_q: int, fp8: bool, extra: bool, sink: bool) -> None:
    """One sparse decode step (s_q = 1) over DECODE_BATCH sequences' pages, DeepSeek-V3 rows:
    SPARSE_TOPK slots per token with per-row lengths; extra: EXTRA_TOPK slots of a second
    cache with its own lengths; sink: an attention sink per head."""
    from mla.kernels import flash_mla_with_kvcache, get_mla_metadata

    b, num_pages = DECODE_BATCH, DECODE_BATCH * DECODE_SEQLEN // PAGE_SIZE
    d, dv = DEEPSEEK_V3["d"], DEEPSEEK_V3["dv"]
    row = _cache_row(d, dv, fp8)
    meta, _ = get_mla_metadata(num_sm=NUM_SMS)
    kw = {}
    if extra:
        kw = dict(extra_k_cache=_fake_cuda((num_pages, PAGE_SIZE, 1, row[0]), row[1]),
                  extra_indices_in_kvcache=_fake_cuda((b, 1, EXTRA_TOPK), torch.int32),
                  extra_topk_length=_fake_cuda((b,), torch.int32))  # fmt: skip
    flash_mla_with_kvcache(
        _fake_cuda((b, 1, h_q, d), torch.bfloat16),
        _fake_cuda((num_pages, PAGE_SIZE, 1, row[0]), row[1]),
        None,
        None,
        dv,
        meta,
        is_fp8_kvcache=fp8,
        indices=_fake_cuda((b, 1, SPARSE_TOPK), torch.int32),
        topk_length=_fake_cuda((b,), torch.int32),
        attn_sink=_fake_cuda((h_q,), torch.float32) if sink else None,
        **kw,
    )


def _v4_format(fp8: bool):
    """DeepSeek-V4's cache row: MODEL1 pages, or plain bf16 rows of 512 channels (K = V, no rope split)."""
    from mla.formats import Model1Format, PlainFormat

    return Model1Format() if fp8 else PlainFormat(512, 0, torch.bfloat16)


def _v4_call(h_q: int, fp8: bool) -> None:
    """One DeepSeek-V4 decode step (s_q = 1) over DECODE_BATCH sequences, as FlashMLA's V4 path
    calls it and `mla.v4_attention` does: the window as V4_WINDOW indices into k_cache,
    EXTRA_TOPK compressed entries of the extra cache, per-row lengths, a sink; MODEL1 pages
    (`Model1Format.kvcache_view`) or bf16 rows."""
    from mla.kernels import flash_mla_with_kvcache, get_mla_metadata

    fmt, b = _v4_format(fp8), DECODE_BATCH
    num_pages = b * DECODE_SEQLEN // PAGE_SIZE

    def cache():
        if fp8:
            return fmt.kvcache_view(_fake_cuda((num_pages, fmt.page_bytes(PAGE_SIZE)), torch.uint8), PAGE_SIZE)
        return _fake_cuda((num_pages, PAGE_SIZE, 1, fmt.head_dim), torch.bfloat16)

    meta, _ = get_mla_metadata(num_sm=NUM_SMS)
    flash_mla_with_kvcache(
        _fake_cuda((b, 1, h_q, fmt.head_dim), torch.bfloat16), cache(), None, None, fmt.head_dim_v, meta,
        is_fp8_kvcache=fp8, indices=_fake_cuda((b, 1, V4_WINDOW), torch.int32),
        topk_length=_fake_cuda((b,), torch.int32), attn_sink=_fake_cuda((h_q,), torch.float32),
        extra_k_cache=cache(), extra_indices_in_kvcache=_fake_cuda((b, 1, EXTRA_TOPK), torch.int32),
        extra_topk_length=_fake_cuda((b,), torch.int32),
    )  # fmt: skip


def _v4_work(h_q: int, fp8: bool) -> tuple[int, int]:
    from .decode import decode_bytes, decode_flops

    fmt, keys = _v4_format(fp8), V4_WINDOW + EXTRA_TOPK
    return (decode_bytes(DECODE_BATCH, 1, h_q, keys, fmt, torch.bfloat16.itemsize),
            decode_flops(DECODE_BATCH, 1, h_q, keys, fmt.head_dim, fmt.head_dim_v))  # fmt: skip


def _prefill_call(h_q: int) -> None:
    """flash_mla_sparse_fwd over one chunk of PREFILL_TOKENS bf16 query tokens, SPARSE_TOPK
    rows of a DECODE_SEQLEN-token KV array each, with an attention sink."""
    from mla.kernels import flash_mla_sparse_fwd

    d, dv = DEEPSEEK_V3["d"], DEEPSEEK_V3["dv"]
    flash_mla_sparse_fwd(
        _fake_cuda((PREFILL_TOKENS, h_q, d), torch.bfloat16),
        _fake_cuda((DECODE_SEQLEN, 1, d), torch.bfloat16),
        _fake_cuda((PREFILL_TOKENS, 1, SPARSE_TOPK), torch.int32),
        d**-0.5,
        dv,
        attn_sink=_fake_cuda((h_q,), torch.float32),
        topk_length=_fake_cuda((PREFILL_TOKENS,), torch.int32),
    )


def _write_call(fp8: bool) -> None:
    """One layer's cache write of WRITE_TOKENS contiguous bf16 rows, as `LatentCache.write`."""
    from mla.kernels import write_latent, write_latent_fp8
    from mla.reference.quant import fp8_bytes_per_token

    r, dr = DEEPSEEK_V3["dv"], DEEPSEEK_V3["d"] - DEEPSEEK_V3["dv"]
    num_pages = WRITE_TOKENS * 4 // PAGE_SIZE
    slots = _fake_cuda((WRITE_TOKENS,), torch.int64)
    latent, k_pe = _fake_cuda((WRITE_TOKENS, r), torch.bfloat16), _fake_cuda((WRITE_TOKENS, dr), torch.bfloat16)
    if fp8:
        write_latent_fp8(_fake_cuda((num_pages, PAGE_SIZE, 1, fp8_bytes_per_token(r, dr)), torch.uint8),
                         slots, latent, k_pe)  # fmt: skip
    else:
        write_latent(_fake_cuda((num_pages, PAGE_SIZE, 1, r + dr), torch.bfloat16), slots, latent, k_pe)


def _index_call(fp8: bool, s_q: int) -> None:
    """index_scores over DECODE_BATCH sequences of DECODE_SEQLEN cached tokens for s_q query
    tokens each (s_q > 1: a speculative step, with per-row query counts)."""
    from mla.formats import index_key_format
    from mla.kernels import index_scores

    b, pages_per_seq = DECODE_BATCH, DECODE_SEQLEN // PAGE_SIZE
    fmt = index_key_format("fp8" if fp8 else torch.bfloat16, INDEX_DIM)
    index_scores(
        _fake_cuda((b, s_q, INDEX_HEADS, INDEX_DIM), torch.bfloat16),
        _fake_cuda((b, s_q, INDEX_HEADS), torch.float32),
        _fake_cuda((b * pages_per_seq, PAGE_SIZE, 1, fmt.row_width), fmt.storage_dtype),
        _fake_cuda((b, pages_per_seq), torch.int32),
        _fake_cuda((b,), torch.int32),
        DECODE_SEQLEN,
        seqlens_q=_fake_cuda((b,), torch.int32) if s_q > 1 else None,
        is_fp8=fp8,
    )


def _index_work(fp8: bool, s_q: int) -> tuple[int, int]:
    """(bytes, flops) of `_index_call`: key rows once, q, weights and the float32 scores; a
    multiply-add per head, channel, query token and key."""
    from mla.formats import index_key_format

    fmt = index_key_format("fp8" if fp8 else torch.bfloat16, INDEX_DIM)
    tokens = DECODE_BATCH * s_q
    nbytes = (DECODE_BATCH * DECODE_SEQLEN * fmt.bytes_per_token + tokens * INDEX_HEADS * (2 * INDEX_DIM + 4)
              + tokens * DECODE_SEQLEN * 4)  # fmt: skip
    return nbytes, 2 * tokens * INDEX_HEADS * INDEX_DIM * DECODE_SEQLEN


def _topk_call() -> None:
    """index_topk of one decode step's scores: SPARSE_TOPK of DECODE_SEQLEN positions per
    sequence, as slots through the block table."""
    from mla.kernels import index_topk

    b, pages_per_seq = DECODE_BATCH, DECODE_SEQLEN // PAGE_SIZE
    index_topk(_fake_cuda((b, 1, DECODE_SEQLEN), torch.float32), SPARSE_TOPK,
               _fake_cuda((b, pages_per_seq), torch.int32), PAGE_SIZE)  # fmt: skip


def _compress_call(rate: int, overlap: bool, dim: int, fp8: bool) -> None:
    """write_compressed of DECODE_SEQLEN tokens' entries (DeepSeek-V4: head_dim 512 with rope 64,
    or the CSA indexer's 128-channel keys), plain bf16 pages or FlashMLA's MODEL1 FP8 pages."""
    from mla.formats import Model1Format
    from mla.kernels import write_compressed

    n, width, rope = DECODE_SEQLEN // rate, dim * (2 if overlap else 1), 64
    pages = -(-n // PAGE_SIZE)
    cache = (_fake_cuda((pages, Model1Format().page_bytes(PAGE_SIZE)), torch.uint8) if fp8
             else _fake_cuda((pages, PAGE_SIZE, 1, dim), torch.bfloat16))  # fmt: skip
    write_compressed(cache, PAGE_SIZE, _fake_cuda((n,), torch.int64), _fake_cuda((n, rate, width), torch.bfloat16),
                     _fake_cuda((n, rate, width), torch.bfloat16), _fake_cuda((rate, width), torch.float32),
                     _fake_cuda((dim,), torch.float32), _fake_cuda((n, rope // 2), torch.float32),
                     _fake_cuda((n, rope // 2), torch.float32),
                     *((_fake_cuda((rate, dim), torch.bfloat16),) * 2 if overlap else ()))  # fmt: skip


def _configs() -> dict[str, Config]:
    configs = {}

    def add(name: str, kernel: str, call: Callable[[], None], work: tuple[int, int] | None = None) -> None:
        configs[name] = Config(name, kernel, call, work)

    def dense(h_q, s_q, fp8, b=DECODE_BATCH, ragged=False, shape=DEEPSEEK_V3):
        """A dense decode configuration, its call and its roofline (ragged: at most s_q queries)."""
        call = functools.partial(_decode_call, h_q, s_q, fp8=fp8, ragged=ragged, b=b, **shape)
        return "_mla_decode_kernel", call, _decode_work(b, s_q, h_q, DECODE_SEQLEN, fp8=fp8, **shape)

    def sparse(h_q, fp8, extra, sink):
        keys = SPARSE_TOPK + (EXTRA_TOPK if extra else 0)
        work = _decode_work(DECODE_BATCH, 1, h_q, keys, fp8=fp8, **DEEPSEEK_V3)
        return "_mla_decode_kernel", functools.partial(_sparse_call, h_q, fp8, extra, sink), work

    for fp8 in (False, True):
        for h_q in (16, 64, 128):
            for s_q in (1, 2, 4):
                add(f"v3-{'fp8' if fp8 else 'bf16'}-h{h_q}-sq{s_q}", *dense(h_q, s_q, fp8))
    add("small-bf16-h16-sq1", *dense(16, 1, False, shape=SMALL_HEAD))
    for fp8 in (False, True):
        add(f"v3-{'fp8' if fp8 else 'bf16'}-h128-sq1-b{LARGE_BATCH}", *dense(128, 1, fp8, b=LARGE_BATCH))
    add("ragged-bf16-h128-sq4", *dense(128, 4, False, ragged=True))
    add("ragged-fp8-h64-sq4", *dense(64, 4, True, ragged=True))
    add("sparse-fp8-h128-topk2048", *sparse(128, True, False, False))
    add("sparse-bf16-h64-topk2048", *sparse(64, False, False, False))
    add("sparse-fp8-h64-extra-sink", *sparse(64, True, True, True))
    add("sparse-bf16-h128-extra-sink", *sparse(128, False, True, True))
    for h_q in (64, 128):
        for fp8 in (True, False):
            add(f"v4-{'model1' if fp8 else 'bf16'}-h{h_q}-extra-sink", "_mla_decode_kernel",
                functools.partial(_v4_call, h_q, fp8), _v4_work(h_q, fp8))  # fmt: skip
    # the chunk's tokens share one KV array: each of its rows crosses HBM once
    add("prefill-sparse-bf16-h128", "_mla_decode_kernel", functools.partial(_prefill_call, 128),
        _decode_work(1, PREFILL_TOKENS, 128, SPARSE_TOPK, fp8=False, rows=DECODE_SEQLEN, **DEEPSEEK_V3))  # fmt: skip
    add("combine-v3-h128-sq1", "_mla_combine_kernel", functools.partial(_decode_call, 128, 1, fp8=False, **DEEPSEEK_V3))
    add("combine-sparse-sink-h64", "_mla_combine_kernel", functools.partial(_sparse_call, 64, True, True, True))
    add("write-bf16", "_write_latent_kernel", functools.partial(_write_call, False))
    add("write-fp8", "_write_latent_fp8_kernel", functools.partial(_write_call, True))
    for fp8, s_q in ((False, 1), (True, 1), (True, 2)):
        add(f"index-{'fp8' if fp8 else 'bf16'}-h{INDEX_HEADS}-d{INDEX_DIM}-sq{s_q}", "_index_scores_kernel",
            functools.partial(_index_call, fp8, s_q), _index_work(fp8, s_q))  # fmt: skip

    def index_fp4() -> None:
        """`_index_call` (s_q 1) over DeepSeek-V4's MXFP4 keys (68-byte rows for 128 channels)."""
        from mla.kernels import index_scores

        b, pages = DECODE_BATCH, DECODE_SEQLEN // PAGE_SIZE
        index_scores(_fake_cuda((b, 1, INDEX_HEADS, INDEX_DIM), torch.bfloat16),
                     _fake_cuda((b, 1, INDEX_HEADS), torch.float32),
                     _fake_cuda((b * pages, PAGE_SIZE, 1, fp4.row_width), torch.uint8),
                     _fake_cuda((b, pages), torch.int32), _fake_cuda((b,), torch.int32), DECODE_SEQLEN,
                     is_fp4=True)  # fmt: skip

    from mla.formats import Mxfp4KeyFormat, index_key_format

    fp4, fp8_bytes, flops = Mxfp4KeyFormat(INDEX_DIM), *_index_work(True, 1)  # FP8's work, smaller rows
    fp4_bytes = fp8_bytes - DECODE_BATCH * DECODE_SEQLEN * (index_key_format("fp8", INDEX_DIM).bytes_per_token
                                                            - fp4.bytes_per_token)  # fmt: skip
    add(f"index-fp4-h{INDEX_HEADS}-d{INDEX_DIM}-sq1", "_index_scores_kernel", index_fp4, (fp4_bytes, flops))
    add(f"index-topk{SPARSE_TOPK}", "_index_topk_kernel", _topk_call)
    # DeepSeek-V4's compressor: HCA (128 tokens per entry), CSA (4, overlapping), the CSA indexer's keys
    for name, rate, overlap, dim, fp8 in (("hca-fp8", 128, False, 512, True), ("csa-fp8", 4, True, 512, True),
                                          ("csa-bf16", 4, True, 512, False), ("index-bf16", 4, True, 128, False)):
        add(f"compress-{name}", "_compress_kernel", functools.partial(_compress_call, rate, overlap, dim, fp8))
    return configs


CONFIGS = _configs()


@dataclass
class Launch:
    """One kernel launch as the launcher made it."""

    kernel: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JITFunction, or a `triton.heuristics` wrapper of one: `kernel[grid](*args,
    **kwargs)` records the JITFunction's launch (the heuristics' values added, as Heuristics.run
    adds them) instead of launching."""

    def __init__(self, kernel: JITFunction | Heuristics, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self._launch(grid, args, kwargs))

    def _launch(self, grid, args, kwargs) -> Launch:
        if not isinstance(self.kernel, Heuristics):
            return Launch(self.kernel, grid, args, kwargs)
        named = dict(zip(self.kernel.arg_names, args))
        values = {name: rule({**named, **kwargs}) for name, rule in self.kernel.values.items()}
        return Launch(self.kernel.fn, grid, args, {**kwargs, **values})


def capture_launches(call: Callable[[], None]) -> list[Launch]:
    """Run call() on fake CUDA tensors with every JITFunction of the mla.kernels modules
    recording its launches; returns them in launch order."""
    import mla.kernels  # noqa: F401 - loads every kernel module, so all of them are patched

    modules = [m for name, m in list(sys.modules.items()) if name.startswith("mla.kernels.")]
    launches: list[Launch] = []
    with contextlib.ExitStack() as stack:
        for module in modules:
            jitted = {
                name: _Recorder(v, launches)
                for name, v in vars(module).items()
                if isinstance(v, (JITFunction, Heuristics))
            }
            if jitted:
                stack.enter_context(unittest.mock.patch.multiple(module, **jitted))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        call()
    return launches


class _Pointer:
    """A tensor argument as Triton's specialization sees it: a dtype and a data pointer whose
    alignment is that of a fresh CUDA allocation (256 bytes) plus the tensor's storage offset."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._ptr = 256 + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._ptr


class _TargetDriver(DriverBase):
    """A driver that reports a CUDA target and never touches a device. The device id is the
    arch, so Triton's per-device kernel caches keep one entry per arch."""

    def __init__(self, arch: int):
        self.arch = arch

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("compile-only driver")

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda")

    def get_benchmarker(self):
        raise NotImplementedError("compile-only driver")

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def _target(arch: int):
    """Make Triton compile for sm_<arch>; the previous driver (none on a CPU-only machine,
    the real one on a GPU machine) is restored after. `driver._active` is read directly:
    `driver.active` would create the default driver, which fails without a GPU."""
    previous = driver._active
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def compile_launch(launch: Launch, arch: int):
    """The CompiledKernel of a recorded launch for sm_<arch> (Triton caches it per arch and
    signature, so a repeated launch is compiled once)."""
    args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    with _target(arch):
        return launch.kernel.warmup(*args, grid=launch.grid, **launch.kwargs)


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, arch: int, metadata) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) from `ptxas -v`, run by Triton's own
    cubin stage with TRITON_DUMP_PTXAS_LOG on, so the ptxas binary and flags are the
    compile's (the flags differ between Triton versions). The largest over the PTX's
    functions."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    options = backend.parse_options(metadata._asdict())
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        backend.make_cubin(ptx, {}, options, arch)
    text = log.getvalue()
    registers = [int(m) for m in _PTXAS_REGISTERS.findall(text)]
    spills = [int(s) + int(lo) for s, lo in _PTXAS_SPILLS.findall(text)]
    if not registers or not spills:
        raise RuntimeError(f"no register or spill counts in the ptxas log:\n{text}")
    return max(registers), max(spills)


_MMA_ALIAS = re.compile(r"^(#[\w]+) = #ttg\.nvidia_mma<\{versionMajor = (\d+)", re.MULTILINE)
_DOT = re.compile(r"= tt\.dot .*-> tensor<[^,>]+, (#[\w]+)>")


def mma_kind(ttgir: str) -> str:
    """The weakest matrix instruction among the ttgir's dots: "wgmma" when every dot is a
    warp-group dot (Hopper), "mma" when some dot is an mma.sync (version 2 layout), "none"
    when some dot runs on FMA units (a blocked layout) or there is no dot."""
    versions = {alias: int(major) for alias, major in _MMA_ALIAS.findall(ttgir)}
    kinds = ["wgmma"] * ttgir.count("ttng.warp_group_dot ")
    for layout in _DOT.findall(ttgir):
        kinds.append({2: "mma", 3: "wgmma"}.get(versions.get(layout), "none"))
    if not kinds:
        return "none"
    return min(kinds, key=("none", "mma", "wgmma").index)


_ALLOC = re.compile(r"(%[\w#]+) = ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<([\dx]+)x(\w+),")
_VIEW = re.compile(r"(%[\w#]+) = ttg\.(?:memdesc_index|memdesc_subview)\s+(%[\w#]+)")
_ASYNC_COPY = re.compile(r"ttg\.async_copy_global_to_local\s+%[\w#]+,\s*(%[\w#]+)")
_TMA_COPY = re.compile(r"ttng\.async_tma_copy_global_to_local\s+%[\w#]+\[[^\]]*\]\s+(%[\w#]+)")
_LOAD = re.compile(r"= tt\.load .*: tensor<([\dx]+)x!tt\.ptr<(\w+)>")
_DESCRIPTOR_LOAD = re.compile(r"= tt\.descriptor_load .*-> tensor<([\dx]+)x(\w+),")
_FOR = re.compile(r"(?:^|= )scf\.for ")


def _tile_bytes(dims: str, element: str) -> int:
    """Bytes of a [dims] tile of element ("bf16", "f8E4M3FN", "i1", ...)."""
    bits = int(re.search(r"\d+", element).group())
    return math.prod(int(n) for n in dims.split("x")) * max(8, bits) // 8


def _loop_body_lines(ttgir: str) -> list[str]:
    """The lines inside scf.for bodies (the printer indents a body below its `scf.for` line
    and closes it with `}` at the loop's own indentation)."""
    body, loop_indent = [], None
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        if loop_indent is not None and indent <= loop_indent:
            loop_indent = None
        if loop_indent is not None:
            body.append(line)
        elif _FOR.search(line.strip()):
            loop_indent = indent
    return body


def kv_stages(ttgir: str) -> int:
    """Buffers in the shared-memory ring of the KV stream (module docstring). The KV stream is
    the largest tile a loop loads: through async copies (cp.async or TMA) into a local_alloc
    of N buffers, N stages; through plain loads into registers, 0. Equal tiles: the fewest."""
    allocs = {name: (dims, element) for name, dims, element in _ALLOC.findall(ttgir)}
    views = dict(_VIEW.findall(ttgir))  # buffer i of a ring -> the ring

    def ring(name: str) -> tuple[int, int] | None:
        """(buffers, bytes per buffer) of the allocation a copy writes: a ring [N, *tile]
        when the copy goes through a view of one buffer, else a single buffer."""
        indexed = name in views
        while name in views:
            name = views[name]
        if name not in allocs:
            return None
        dims, element = allocs[name]
        buffers, _, tile = dims.partition("x")
        return (int(buffers), _tile_bytes(tile, element)) if indexed else (1, _tile_bytes(dims, element))

    streams = []  # (bytes per tile, stages)
    for line in _loop_body_lines(ttgir):
        copy = _ASYNC_COPY.search(line) or _TMA_COPY.search(line)
        load = _LOAD.search(line) or _DESCRIPTOR_LOAD.search(line)
        if copy and (target := ring(copy.group(1))):
            streams.append((target[1], target[0]))
        elif load:
            streams.append((_tile_bytes(*load.groups()), 0))
    return max(streams, key=lambda s: (s[0], -s[1]))[1] if streams else 0


# CompiledKernel.hash (which covers the target) -> its analysis: one ptxas run per kernel.
_ANALYSES: dict[str, dict] = {}


def analyze(compiled, arch: int) -> dict:
    """registers, spill_bytes, shared_bytes, mma, kv_stages, ctas_per_sm of a CompiledKernel."""
    if compiled.hash not in _ANALYSES:
        _ANALYSES[compiled.hash] = _analyze(compiled, arch)
    return dict(_ANALYSES[compiled.hash])


def _analyze(compiled, arch: int) -> dict:
    registers, spill_bytes = ptxas_usage(compiled.asm["ptx"], arch, compiled.metadata)
    shared = compiled.metadata.shared
    ttgir = compiled.asm["ttgir"]
    return {
        "registers": registers,
        "spill_bytes": spill_bytes,
        "shared_bytes": shared,
        "mma": mma_kind(ttgir),
        "kv_stages": kv_stages(ttgir),
        "ctas_per_sm": ctas_per_sm(registers, shared, compiled.metadata.num_warps, arch),
    }


def _error_message(error: Exception) -> str:
    """One line: Triton's compile errors carry the kernel source first and the reason last."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _row(config: Config, arch: int, **fields) -> dict:
    row = dict.fromkeys(FIELDS)
    nbytes, flops = config.work or (None, None)
    row.update(kernel=config.kernel, config=config.name, arch=arch, bytes=nbytes, flops=flops, **fields)
    return row


def compiled_rows(configs=None, archs=ARCHS) -> list[dict]:
    """One row per (configuration, arch, launch of the configuration's kernel), fields FIELDS.

    configs: names from CONFIGS (default: all). archs: compute capabilities, keys of SM_LIMITS.
    In a process where Triton interprets (TRITON_INTERPRET=1, as in the CPU test suite) the
    report is made in a child process without it (run_compiling).
    """
    names = list(CONFIGS) if configs is None else list(configs)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
    bad_archs = [a for a in archs if a not in SM_LIMITS]
    if bad_archs:
        raise ValueError(f"archs {bad_archs} have no SM_LIMITS entry; known: {list(SM_LIMITS)}")
    if knobs.runtime.interpret:
        return run_compiling("bench.compiled:compiled_rows", names, list(archs))
    rows = []
    for name in names:
        config = CONFIGS[name]
        for arch in archs:
            try:
                # captured per arch: the launcher picks its tiles for the target it reports
                with _target(arch):
                    launches = [launch for launch in capture_launches(config.call)
                                if launch.kernel.fn.__name__ == config.kernel]  # fmt: skip
            except Exception as error:  # noqa: BLE001 - a launcher that cannot be captured is a row, not a crash
                rows.append(_row(config, arch, error=_error_message(error)))
                continue
            if not launches:
                rows.append(_row(config, arch, error="the launcher did not launch this kernel"))
            for launch in launches:
                try:
                    rows.append(_row(config, arch, **analyze(compile_launch(launch, arch), arch)))
                except Exception as error:  # noqa: BLE001 - a compile error is recorded in the row
                    rows.append(_row(config, arch, error=_error_message(error)))
    return rows


# The child of run_compiling: import module:function, call it with the JSON arguments, write
# its JSON result to the path given.
_CHILD = """
import importlib, json, sys
module, function = sys.argv[1].split(":")
result = getattr(importlib.import_module(module), function)(*json.loads(sys.argv[2]))
with open(sys.argv[3], "w") as f:
    json.dump(result, f)
"""


def run_compiling(target: str, *args):
    """target(*args) ("module:function", JSON-able arguments and result) in a process that
    compiles @triton.jit: this one, or a child of the repository's Python without
    TRITON_INTERPRET when this one interprets. Under the interpreter, Triton's own @jit
    helpers (tl.sum, tl.max, ...) are interpreted functions that cannot be compiled, and
    calling one leaves triton.language patched for the interpreter."""
    if not knobs.runtime.interpret:
        module, function = target.split(":")
        return getattr(importlib.import_module(module), function)(*args)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        subprocess.run([sys.executable, "-c", _CHILD, target, json.dumps(args), path], cwd=REPO, env=env, check=True)
        with open(path) as f:
            return json.load(f)


def format_compiled_table(rows: list[dict]) -> str:
    columns = [
        ("kernel", "kernel", ""), ("config", "config", ""), ("arch", "arch", "d"), ("registers", "registers", "d"),
        ("spill B", "spill_bytes", "d"), ("shared B", "shared_bytes", "d"), ("mma", "mma", ""),
        ("kv stages", "kv_stages", "d"), ("CTAs/SM", "ctas_per_sm", "d"), ("MB", "mbytes", ".1f"),
        ("GFLOP", "gflop", ".2f"), ("FLOP/B", "intensity", ".0f"), ("error", "error", ".80"),
    ]  # fmt: skip

    def roofline(row):
        if row["bytes"] is None:
            return {}
        return {"mbytes": row["bytes"] / 1e6, "gflop": row["flops"] / 1e9, "intensity": row["flops"] / row["bytes"]}

    return format_table(columns, [{**row, **roofline(row)} for row in rows])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.compiled", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), choices=sorted(SM_LIMITS))
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS), metavar="NAME",
                        help="configurations to compile (default: all): " + ", ".join(CONFIGS))  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also save the rows here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = compiled_rows(args.configs, args.archs)
    seconds = time.perf_counter() - start
    print(format_compiled_table(rows))
    print(f"{len(rows)} rows in {seconds:.1f} s (triton {triton.__version__}, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "seconds": seconds, "rows": rows}, f,
                      indent=1)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
