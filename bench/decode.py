"""Section 2 (GPU): the Triton decode kernel against the PyTorch reference.

ms, GB/s and TFLOP/s of `mla.kernels.flash_mla_with_kvcache` and of
`mla.reference.flash_mla_with_kvcache` on the same inputs; bytes and FLOPs come from the
formulas below, and each row also gives its fraction of two ceilings measured in the same
run: the copy bandwidth (torch copy of a large buffer) and the bf16 matmul rate (a large
torch.matmul).

    python -m bench.decode --out DIR [--b 64] [--s-k 4096] [--h-q 16 128] [--s-q 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os

import torch

from mla.backend import interpreting
from mla.formats import CacheFormat, PlainFormat

from .common import copy_fn, format_table, synchronize, time_ms

D, DV = 576, 512  # DeepSeek-V3's latent row (512 latent + 64 rope) and V width
PAGE = 64
# The reference gathers each sequence and repeats it per head in float32 (b * s_k * h_q * D * 4
# bytes of traffic per call): beyond this many (b * s_k * h_q) it takes seconds per call and is
# skipped in sweeps.
REFERENCE_MAX_WORK = 16 * 4096 * 128
FULL_SWEEP = {"b": (1, 16, 64, 128), "s_k": (1024, 4096, 16384, 65536), "h_q": (16, 128), "s_q": (1, 2, 4)}
QUICK_SWEEP = {"b": (1, 64), "s_k": (4096, 16384), "h_q": (16, 128), "s_q": (1, 2)}


def decode_bytes(b: int, s_q: int, h_q: int, s_k: int, fmt: CacheFormat, q_itemsize: int, h_kv: int = 1) -> int:
    """Bytes that must cross HBM at least once: the cache rows (`fmt.bytes_per_token` each, 1152
    for DeepSeek-V3 in bf16, 656 in FP8), q, out (+ lse, block table)."""
    cache = b * s_k * h_kv * fmt.bytes_per_token
    q_out = b * s_q * h_q * (fmt.head_dim + fmt.head_dim_v) * q_itemsize
    return cache + q_out + b * s_q * h_q * 4 + b * math.ceil(s_k / PAGE) * 4


def decode_flops(b: int, s_q: int, h_q: int, s_k: int, d: int, dv: int) -> int:
    """QK^T over d channels and PV over dv channels: 2 FLOPs per multiply-add."""
    return 2 * b * s_q * h_q * s_k * (d + dv)


def make_cache(b, s_k, d=D, h_kv=1, page=PAGE, dtype=torch.bfloat16, device="cuda"):
    """A fully used paged cache with a shuffled block table: (k_cache, block_table, cache_seqlens)."""
    pages = math.ceil(s_k / page)
    k_cache = torch.randn(b * pages, page, h_kv, d, dtype=dtype, device=device)
    block_table = torch.randperm(b * pages, device=device).view(b, pages).int()
    cache_seqlens = torch.full((b,), s_k, dtype=torch.int32, device=device)
    return k_cache, block_table, cache_seqlens


def make_decode_inputs(b, s_q, h_q, s_k, d=D, h_kv=1, page=PAGE, dtype=torch.bfloat16, device="cuda"):
    """Random q and a fully used paged cache with a shuffled block table."""
    k_cache, block_table, cache_seqlens = make_cache(b, s_k, d, h_kv, page, dtype, device)
    q = torch.randn(b, s_q, h_q, d, dtype=dtype, device=device)
    return q, k_cache, block_table, cache_seqlens


def measure_ceilings(device: torch.device, copy_bytes: int = 1 << 30, matmul_n: int = 8192) -> dict:
    """The two rooflines, measured now: copy GB/s (read + write of a copy_bytes buffer) and
    bf16 matmul TFLOP/s (n x n x n)."""
    copy, moved = copy_fn(device, copy_bytes)
    copy_ms = time_ms(copy, device)
    del copy
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    matmul_ms = time_ms(lambda: torch.matmul(a, b), device)
    return {
        "copy_bytes": copy_bytes,
        "copy_gbps": moved / copy_ms / 1e6,
        "matmul_n": matmul_n,
        "matmul_tflops": 2 * matmul_n**3 / matmul_ms / 1e9,
    }


def sweep_shapes(sweep: dict) -> list[tuple[int, int, int, int]]:
    """(b, s_k, h_q, s_q) of a sweep dict, grouped by (b, s_k) so each cache is made once."""
    return list(itertools.product(sweep["b"], sweep["s_k"], sweep["h_q"], sweep["s_q"]))


def kernel_rows(shapes, device: torch.device, ceilings: dict | None = None, reference_max_work=REFERENCE_MAX_WORK,
                progress=None, dtype=torch.bfloat16) -> list[dict]:
    """Time the kernel (and the reference where it is affordable) on each (b, s_k, h_q, s_q).

    Args:
        shapes: iterable of (b, s_k, h_q, s_q); the cache is a fully used bf16 latent cache of
            D = 576 channels in pages of 64, with a shuffled block table; causal when s_q > 1.
        ceilings: `measure_ceilings` output; adds copy_fraction and matmul_fraction per row.
        reference_max_work: the reference runs where b * s_k * h_q is at most this.
        progress: a tqdm-like callable wrapping the shape list (advanced with `update`), or None.

    Returns:
        rows {"impl": "triton" | "reference", b, s_k, h_q, s_q, ms, gbps, tflops,
        copy_fraction, matmul_fraction}.
    """
    shapes = list(shapes)
    rows = []
    bar = progress(shapes) if progress else None
    # One cache per (b, s_k), made and freed inside `_time_group`, so two never coexist.
    for (b, s_k), group in itertools.groupby(shapes, key=lambda shape: shape[:2]):
        group = list(group)
        rows += _time_group(b, s_k, [(h_q, s_q) for _, _, h_q, s_q in group], device, ceilings, reference_max_work,
                            dtype)  # fmt: skip
        if bar is not None:
            bar.update(len(group))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    return rows


def _time_group(b, s_k, heads, device, ceilings, reference_max_work, dtype) -> list[dict]:
    from mla.kernels import flash_mla_with_kvcache, get_mla_metadata

    from mla import reference as ref

    k_cache, block_table, lens = make_cache(b, s_k, dtype=dtype, device=device)
    rows = []
    for h_q, s_q in heads:
        q = torch.randn(b, s_q, h_q, D, dtype=dtype, device=device)
        meta, splits = get_mla_metadata(lens, s_q * h_q, 1)
        causal = s_q > 1
        impls = {
            "triton": lambda: flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, meta, splits, causal=causal)
        }
        if b * s_k * h_q <= reference_max_work:
            impls["reference"] = lambda: ref.flash_mla_with_kvcache(q, k_cache, block_table, lens, DV, causal=causal)
        nbytes = decode_bytes(b, s_q, h_q, s_k, PlainFormat(DV, D - DV, dtype), q.element_size())
        flops = decode_flops(b, s_q, h_q, s_k, D, DV)
        for impl, fn in impls.items():
            ms = time_ms(fn, device)
            row = {"impl": impl, "b": b, "s_k": s_k, "h_q": h_q, "s_q": s_q, "ms": ms,
                   "gbps": nbytes / ms / 1e6, "tflops": flops / ms / 1e9}  # fmt: skip
            if ceilings:
                row["copy_fraction"] = row["gbps"] / ceilings["copy_gbps"]
                row["matmul_fraction"] = row["tflops"] / ceilings["matmul_tflops"]
            rows.append(row)
    synchronize(device)
    return rows


def format_kernel_table(rows: list[dict]) -> str:
    columns = [
        ("impl", "impl", ""), ("b", "b", "d"), ("s_k", "s_k", "d"), ("h_q", "h_q", "d"), ("s_q", "s_q", "d"),
        ("ms", "ms", ".4f"), ("GB/s", "gbps", ".0f"), ("TFLOP/s", "tflops", ".1f"),
        ("of copy BW", "copy_fraction", ".0%"), ("of bf16 matmul", "matmul_fraction", ".0%"),
    ]  # fmt: skip
    return format_table(columns, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for decode.json")
    parser.add_argument("--b", type=int, nargs="+", default=[64])
    parser.add_argument("--s-k", type=int, nargs="+", default=[4096])
    parser.add_argument("--h-q", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--s-q", type=int, nargs="+", default=[1])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not interpreting():
        raise SystemExit("bench.decode times the Triton kernel: it needs a GPU (or TRITON_INTERPRET=1 for a smoke run)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceilings = measure_ceilings(device) if device.type == "cuda" else None
    shapes = sweep_shapes({"b": args.b, "s_k": args.s_k, "h_q": args.h_q, "s_q": args.s_q})
    rows = kernel_rows(shapes, device, ceilings)
    if ceilings:
        print(f"copy bandwidth {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s")
    print(format_kernel_table(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        with open(os.path.join(args.out, "decode.json"), "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "ceilings": ceilings, "decode": rows}, f, indent=1)


if __name__ == "__main__":
    main()
