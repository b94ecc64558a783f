"""What every section of the report shares: timing, the run's metadata, tables, targets."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, min_time_s: float = 0.3, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median milliseconds of one fn() call (`time_ms_alternating` with one function)."""
    return time_ms_alternating([fn], device, min_time_s, min_reps, max_reps)[0]


def time_ms_alternating(fns, device: torch.device, min_time_s: float = 0.3, min_reps: int = 3,
                        max_reps: int = 50) -> list[float]:  # fmt: skip
    """Median milliseconds of one call of each function in fns, called in turn.

    GPU: CUDA events through triton's do_bench (which flushes L2 between calls), one function
    after the other. CPU: one warm-up call of each, then rounds of one timed call of each until
    min_reps rounds and min_time_s of the first function's time have passed (at most max_reps).
    A first function slower than a second gets two rounds only: the run's budget matters more
    than the spread of a multi-second figure. Taking turns is what a ratio of two timings needs
    on a shared machine: both see the same load, instead of each its own moment of it.
    """
    if device.type == "cuda":
        import triton.testing

        return [triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") for fn in fns]
    start = time.perf_counter()
    fns[0]()
    if time.perf_counter() - start > 1.0:
        min_reps, min_time_s = 2, 0.0
    for fn in fns[1:]:
        fn()
    times = [[] for _ in fns]
    while len(times[0]) < max_reps and (len(times[0]) < min_reps or sum(times[0]) < min_time_s):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [1e3 * statistics.median(fn_times) for fn_times in times]


def copy_fn(device: torch.device, nbytes: int):
    """(fn, moved): fn copies one nbytes buffer into another, both made now; moved = 2 * nbytes,
    the bytes read and written, as STREAM's Copy counts them, for a copy bandwidth of
    moved / time. nbytes should be several times the last-level cache, or the figure measures
    the cache instead of memory."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def device_label(device: torch.device) -> str:
    """'cpu', or the GPU's name as a file-name slug ('nvidia-h200')."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _git_commit() -> str | None:
    """HEAD (with -dirty for uncommitted changes to tracked files); BENCH_COMMIT where the tree
    is a copy without .git (bench/gpu.sh on a GPU machine). In a git worktree .git is a file."""
    if not os.path.exists(os.path.join(REPO, ".git")):
        return os.environ.get("BENCH_COMMIT")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("BENCH_COMMIT")
    return commit + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(device: torch.device) -> dict:
    """Where and with what the numbers were measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    machine = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine["gpu"] = props.name
        machine["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        machine["cuda"] = torch.version.cuda
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
        "machine": machine,
    }


def format_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> str:
    """A fixed-width text table. columns: (header, key, format spec); None prints as '-'."""
    cells = [
        [("-" if r.get(key) is None else format(r[key], spec)) for _, key, spec in columns] for r in rows
    ]
    widths = [max([len(head)] + [len(c[i]) for c in cells]) for i, (head, _, _) in enumerate(columns)]
    head = "  ".join(h.rjust(w) if i else h.ljust(w) for i, ((h, _, _), w) in enumerate(zip(columns, widths)))
    lines = [head, "-" * len(head)]
    for c in cells:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


@dataclass
class Target:
    """One goal of the report: measured >= threshold (op ">=", higher is better) or measured <=
    threshold (op "<=", lower is better). measured None: not measured here (why in note)."""

    name: str
    threshold: float
    unit: str
    measured: float | None = None
    note: str = ""
    op: str = ">="

    def __post_init__(self):
        if self.op not in (">=", "<="):
            raise ValueError(f"Target op must be '>=' or '<=', got {self.op!r}")

    @property
    def status(self) -> str:
        if self.measured is None:
            return "SKIP"
        met = self.measured >= self.threshold if self.op == ">=" else self.measured <= self.threshold
        return "PASS" if met else "MISS"

    def line(self) -> str:
        got = "not measured" if self.measured is None else f"{self.measured:.2f}{self.unit}"
        note = f"  ({self.note})" if self.note else ""
        return f"[{self.status}] {self.name}: {got} (target {self.op} {self.threshold:g}{self.unit}){note}"

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status}
