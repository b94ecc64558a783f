"""The report's figure: one PNG with a panel per measurement (matplotlib, Agg backend), each
axis saying which direction is better, and the targets' PASS / MISS / SKIP lines under them."""

from __future__ import annotations

import dataclasses

import matplotlib

from .common import Target

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STATUS_COLORS = {"PASS": "tab:green", "MISS": "tab:red", "SKIP": "gray"}
TARGET_LINE_INCHES = 0.2


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, transform=ax.transAxes, fontsize=9)
    ax.set_axis_off()


def _bars(ax, groups: list[str], series: dict[str, list[float]], log: bool = False) -> None:
    """Grouped bars: one group per label, one bar per series."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    if len(groups) > 4:
        ax.set_xticks(range(len(groups)), groups, fontsize=7, rotation=30, ha="right")
    else:
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def _memory(ax, rows):
    mla = [r for r in rows if r["mha_bytes_per_token_per_layer"]]
    models = list(dict.fromkeys(r["model"] for r in mla))
    per = {(r["model"], r["kv_dtype"]): r["bytes_per_token_per_layer"] for r in mla}
    mha = {r["model"]: r["mha_bytes_per_token_per_layer"] for r in mla}
    series = {
        # DeepSeek-V3.2's cache also holds the indexer key beside the latent
        "MLA cache bf16": [per[(m, "bf16")] for m in models],
        "MLA cache fp8": [per[(m, "fp8")] for m in models],
        "full MHA K/V bf16": [mha[m] for m in models],
    }
    _bars(ax, [m.replace("DeepSeek-", "DS-") for m in models], series, log=True)
    gqa = next((r for r in rows if not r["mha_bytes_per_token_per_layer"]), None)
    if gqa:
        ax.axhline(gqa["bytes_per_token_per_layer"], color="gray", ls="--", lw=1, label=gqa["model"])
        ax.legend(fontsize=7)
    ax.set_ylabel("KV bytes / token / layer (lower is better)")
    ax.set_title("1. KV cache per token per layer")


def _kernel(ax, rows, key: str, h_q: int, s_q: int, title: str, ylabel: str):
    """One line per (impl, b) over s_k: the rows of one (h_q, s_q), as the GPU targets read them."""
    rows = [r for r in rows if r.get("impl") in ("triton", "reference") and (r["h_q"], r["s_q"]) == (h_q, s_q)
            and key in r]  # fmt: skip
    if not rows:
        _empty(ax, title, "no GPU in this run:\nthe kernel sweep runs on a GPU")
        return
    for impl, marker in (("triton", "o"), ("reference", "x")):
        for b in sorted({r["b"] for r in rows}):
            pts = sorted((r["s_k"], r[key]) for r in rows if (r["impl"], r["b"]) == (impl, b))
            if pts:
                ax.plot(*zip(*pts), marker=marker, lw=1, label=f"{impl} b={b}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("s_k")
    ax.set_ylabel(f"{ylabel} (higher is better)")
    ax.set_ylim(0, max(1.05, 1.05 * max(r[key] for r in rows)))
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)


def _layer(ax, rows):
    rows = [r for r in rows if r.get("impl") in ("absorbed", "naive", "transformers")]
    if not rows:
        _empty(ax, "2. decode step of one attention layer", "not run")
        return
    contexts = sorted({r["s_k"] for r in rows})
    series = {
        impl: [next(r["ms"] for r in rows if (r["impl"], r["s_k"]) == (impl, s)) for s in contexts]
        for impl in ("absorbed", "naive", "transformers")
    }
    if all("stream_ms" in r for r in rows):
        # the same for every impl at one s_k: the step's bytes read once at the measured copy rate
        series["stream bytes at copy GB/s"] = [next(r["stream_ms"] for r in rows if r["s_k"] == s) for s in contexts]
    _bars(ax, [f"s_k={s}" for s in contexts], series, log=True)
    ax.set_ylabel("ms per decode step (lower is better)")
    ax.set_title(f"2. one {rows[0].get('model', '')} attention layer, decode")


def _generation(ax, rows):
    if not rows:
        _empty(ax, "3. generation", "not run")
        return
    contexts = sorted({r["context"] for r in rows})
    series = {
        impl: [next(r["tokens_per_second"] for r in rows if (r["impl"], r["context"]) == (impl, c)) for c in contexts]
        for impl in ("unpatched", "patched")
    }
    _bars(ax, [f"context {c}" for c in contexts], series, log=True)
    ax.set_ylabel("decode tokens / s (higher is better)")
    ax.set_title("3. transformers DeepseekV3, mla.hf.patch")


def _speculative(ax, rows, note: str):
    if not rows:
        _empty(ax, "4. speculative decoding", note or "not run")
        return
    drafters = list(dict.fromkeys((r["drafter"], r["num_draft_tokens"]) for r in rows))
    temps = sorted({r["temperature"] for r in rows})
    speedup = {(r["drafter"], r["num_draft_tokens"], r["temperature"]): r["speedup"] for r in rows}
    series = {f"T={t:g}": [speedup.get((d, k, t), 0.0) for d, k in drafters] for t in temps}
    _bars(ax, [f"{d} k={k}" for d, k in drafters], series)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_ylabel("tokens/s over plain decoding (higher is better)")
    ax.set_title("4. speculative decoding, shipped model")


def _targets(fig, targets: list[dict]) -> None:
    """One line per target (its report line: status, measured, threshold) along the bottom of the
    figure, coloured by status; the panels leave (len(targets) + 0.5) lines free there."""
    line = TARGET_LINE_INCHES / fig.get_figheight()
    names = {f.name for f in dataclasses.fields(Target)}
    for i, fields in enumerate(targets):
        target = Target(**{k: v for k, v in fields.items() if k in names})
        fig.text(0.01, (len(targets) - i) * line, target.line(), fontsize=8, va="center",
                 color=STATUS_COLORS[target.status])  # fmt: skip


def plot_report(report: dict, path: str) -> None:
    """Write the report's figure to `path` (PNG)."""
    decode = report.get("decode", [])
    kernel = any(r["impl"] in ("triton", "reference") for r in decode)
    targets = report.get("targets", [])
    footer_inches = (len(targets) + 0.5) * TARGET_LINE_INCHES if targets else 0.0
    # the kernel panels only when a GPU run has kernel rows
    fig, axes = plt.subplots(2, 3 if kernel else 2, figsize=(17 if kernel else 13, 9.5 + footer_inches))
    panels = iter(axes.flat)
    _memory(next(panels), report.get("memory", []))
    if kernel:
        _kernel(next(panels), decode, "copy_fraction", 16, 1, "2. kernel, h_q=16 s_q=1: fraction of copy bandwidth",
                "fraction of copy bandwidth")  # fmt: skip
        _kernel(next(panels), decode, "matmul_fraction", 128, 2,
                "2. kernel, h_q=128 s_q=2: fraction of bf16 matmul rate", "fraction of bf16 matmul rate")  # fmt: skip
    _layer(next(panels), decode)
    _generation(next(panels), report.get("generation", []))
    _speculative(next(panels), report.get("speculative", []), report.get("notes", {}).get("speculative", ""))
    meta = report.get("machine", {})
    fig.suptitle(
        f"mla-latent benchmark: {report.get('device')} ({meta.get('cpu', '')}), {report.get('date')}, "
        f"commit {str(report.get('commit'))[:12]}",
        fontsize=11,
    )
    _targets(fig, targets)
    fig.tight_layout(rect=(0, footer_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
