"""The whole report: what each section runs at which size, the targets, the JSON and the figure.

`run(settings, device)` measures and returns the report dict; `save` writes it. Sizes live in
`Settings` (quick, full, or tiny for the tests), so every size the report uses is in one place.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from mla import MLAConfig

from . import decode, generation, layer, memory, sparse, speculative
from .common import REPO, Target, device_label, metadata

SECTIONS = ("memory", "decode", "generation", "speculative", "compiled", "mxfp4")
# The compiled-code configurations of a quick report: one of each kernel and cache format; --full
# compiles every configuration of bench.compiled (a few minutes on two cores).
QUICK_COMPILED = ("v3-bf16-h128-sq1", "v3-fp8-h128-sq1", "small-bf16-h16-sq1", "combine-v3-h128-sq1", "write-bf16",
                  "write-fp8", "index-fp8-h64-d128-sq1", "index-topk2048")  # fmt: skip
# Kernel rows count toward the GPU targets only when their cache exceeds any L2 and a launch
# is small next to the transfer.
TARGET_MIN_CACHE_BYTES = 256 << 20
# The one-layer decode step may take at most this multiple of the time to stream its bytes
# (weights + cached latents) at the copy bandwidth measured in the same run, at these contexts.
STREAM_TARGET = 1.15
STREAM_TARGET_CONTEXTS = (1024, 4096)
# Where runs are written unless --json says otherwise: ignored by git, so a run never
# overwrites a committed report (those live in bench/results/, published on purpose).
LOCAL_RESULTS = os.path.join(REPO, "bench", "results", "local")


@dataclass
class Settings:
    """Every size the report runs at.

    kernel_sweep: {"b", "s_k", "h_q", "s_q"} lists for the GPU kernel sweep (GPU only).
    ceiling_copy_bytes, ceiling_matmul_n: sizes of the two roofline measurements (the copy
        buffer also times the layer rows' copy bandwidth, on every device).
    layer_config, layer_contexts: the attention layer timed three ways, at these s_k.
    sparse_layer_config, sparse_layer_contexts: the DeepSeek-V3.2 layer timed against its dense
        twin (`bench.sparse`) at these s_k; at least one <= index_topk, where the two must agree.
    generation_config, generation_contexts, generation_tokens: the transformers model, the
        tokens in its cache before decoding and the greedy tokens timed per run
        {"unpatched": n, "patched": n}.
    prompts, prompt_bytes, spec_new_tokens, drafters: section 4's workload; prompt + new tokens
        (+ a draft's overshoot) must fit the shipped model's max_position_embeddings.
    profile_repeats: timings per verify length of the block drafter's cost profiles.
    compiled_configs: the configurations of section 5 (`bench.compiled.CONFIGS` names; None: all).
    mxfp4_prompts: random prompts of section 6 (`bench.mxfp4`; 0: skipped, the quick run's
        choice: 40 prompts take about 90 s on a CPU core).
    """

    kernel_sweep: dict = field(default_factory=lambda: dict(decode.QUICK_SWEEP))
    ceiling_copy_bytes: int = 1 << 30
    ceiling_matmul_n: int = 8192
    layer_config: MLAConfig = field(default_factory=MLAConfig.deepseek_v3)
    layer_model: str = "DeepSeek-V3"
    layer_contexts: tuple = (1024, 4096)
    sparse_layer_config: MLAConfig = field(default_factory=MLAConfig.deepseek_v32)
    sparse_layer_model: str = "DeepSeek-V3.2"
    sparse_layer_contexts: tuple = (2048, 4096, 16384, 65536)
    generation_config: MLAConfig = generation.SMALL_DEEPSEEK
    generation_contexts: tuple = (1024, 4096)
    generation_tokens: dict = field(default_factory=lambda: {"unpatched": 4, "patched": 16})
    prompts: int = 6
    prompt_bytes: int = 256
    spec_new_tokens: int = 128
    drafters: tuple = speculative.DRAFTERS
    profile_repeats: int = 15
    compiled_configs: tuple | None = QUICK_COMPILED
    mxfp4_prompts: int = 0

    @classmethod
    def quick(cls, device: torch.device) -> Settings:
        if device.type == "cuda":
            return cls(generation_tokens={"unpatched": 32, "patched": 64})
        return cls()

    @classmethod
    def full(cls, device: torch.device) -> Settings:
        if device.type == "cuda":
            return cls(
                kernel_sweep=dict(decode.FULL_SWEEP), layer_contexts=(1024, 4096, 16384),
                generation_tokens={"unpatched": 64, "patched": 128}, prompts=12, spec_new_tokens=192,
                compiled_configs=None, mxfp4_prompts=40,
            )  # fmt: skip
        return cls(layer_contexts=(1024, 4096, 8192), generation_tokens={"unpatched": 8, "patched": 64},
                   prompts=12, spec_new_tokens=192, drafters=speculative.DRAFTER_SWEEP,
                   compiled_configs=None, mxfp4_prompts=40)  # fmt: skip

    def as_dict(self) -> dict:
        return asdict(self)


def _bar(desc: str):
    """A tqdm progress bar over a loop's items, or None (no bar) where tqdm is not installed."""
    if importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, unit="run", dynamic_ncols=True, leave=False)


def _missing(*packages: str) -> str:
    """'' when every package imports, else a note naming the missing ones. A GPU machine may
    hold torch and triton only: the sections that need more are skipped there, not fatal."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return f"not installed: {', '.join(missing)}" if missing else ""


def _median(values):
    return statistics.median(values) if values else None


def targets(report: dict, device: torch.device) -> list[Target]:
    """The issue's targets, each with the number this run measured (None where not measured)."""
    decode_rows = report.get("decode", [])
    out = []
    model = report.get("settings", {}).get("layer_model", "")
    layer_name = f"one {model} attention layer" if model else "one attention layer"
    for s_k in STREAM_TARGET_CONTEXTS:
        row = [r for r in decode_rows if r["impl"] == "absorbed" and r["s_k"] == s_k and "stream_multiple" in r]
        out.append(Target(
            f"absorbed decode step of {layer_name} at s_k={s_k}, x the time to stream its bytes "
            "at the copy bandwidth", STREAM_TARGET, "x", row[0]["stream_multiple"] if row else None,
            f"{device.type}, weights + cache {row[0]['bytes'] / 1e6:.0f} MB" if row else f"s_k={s_k} not in this run",
            op="<=",
        ))  # fmt: skip
    out += _sparse_targets(decode_rows, report.get("settings", {}).get("sparse_layer_model", ""), device)
    gen = [r for r in report.get("generation", []) if r["impl"] == "patched" and r["context"] == 4096]
    out.append(Target("mla.hf.patch generation vs unpatched at context 4096", 5, "x",
                      gen[0]["speedup"] if gen else None, "" if gen else "context 4096 not in this run"))
    greedy = [r for r in report.get("speculative", []) if r["temperature"] == 0]
    best = max(greedy, key=lambda r: r["speedup"]) if greedy else None
    why_not = report.get("notes", {}).get("speculative", "not run")
    out.append(Target(
        "speculative decoding, best drafter at temperature 0, vs plain greedy", 1.6, "x",
        best["speedup"] if best else None, f"{best['drafter']}, k={best['num_draft_tokens']}" if best else why_not,
    ))  # fmt: skip
    out += _block_targets(report.get("speculative", []), report.get("notes", {}).get("block") or why_not)
    big = [r for r in decode_rows if r["impl"] == "triton" and "copy_fraction" in r
           and r["b"] * r["s_k"] * decode.D * 2 >= TARGET_MIN_CACHE_BYTES]  # fmt: skip
    mem = [r["copy_fraction"] for r in big if r["h_q"] == 16]
    comp = [r["matmul_fraction"] for r in big if r["h_q"] == 128 and r["s_q"] == 2]
    no_gpu = "needs a GPU" if device.type != "cuda" else "no kernel row with a cache >= 256 MiB"
    out.append(Target("kernel, h_q=16 (memory-bound): median fraction of copy bandwidth", 0.8, "",
                      _median(mem), f"median of {len(mem)} shapes" if mem else no_gpu))
    out.append(Target("kernel, h_q=128 s_q=2 (compute-bound): median fraction of bf16 matmul rate", 0.5, "",
                      _median(comp), f"median of {len(comp)} shapes" if comp else no_gpu))
    out += _compiled_targets(report.get("compiled", []))
    out += _context_targets(report.get("memory_context", []))
    return out


def _context_targets(rows: list[dict]) -> list[Target]:
    """DeepSeek's V4 claim in our accounting: its FP8 cache at 1M tokens, as a share of V3.2's."""
    ratio = {r["model"]: r["ratio_vs_v32_at_1m"] for r in rows if r["kv_dtype"] == "fp8"}
    return [
        Target(f"{model} FP8 cache per token at 1M tokens, % of DeepSeek-V3.2's FP8", goal, "%",
               100 * ratio[model] if model in ratio else None, "" if model in ratio else "memory not in this run",
               op="<=")  # fmt: skip
        for model, goal in (("DeepSeek-V4-Pro", 10.5), ("DeepSeek-V4-Flash", 7.5))
    ]


def _sparse_targets(decode_rows: list[dict], model: str, device: torch.device) -> list[Target]:
    """The DeepSeek-V3.2 layer's goals: its sparse attention part stays flat in s_k above
    index_topk (it attends index_topk rows at any context), and its whole step beats the dense
    V3 step at the longest context."""
    name = f"one {model} attention layer" if model else "one sparse attention layer"
    rows = sorted((r for r in decode_rows if r["impl"] == sparse.SPARSE), key=lambda r: r["s_k"])
    above = [r for r in rows if r["s_k"] > r["topk"]]
    flat = above[-1]["attention_ms"] / above[0]["attention_ms"] if len(above) > 1 else None
    longest = rows[-1] if rows else None
    return [
        Target(f"{name}: sparse attention part at the longest context vs at the shortest above index_topk", 1.5,
               "x", flat, f"{device.type}, s_k={above[-1]['s_k']} vs {above[0]['s_k']}" if flat is not None
               else "needs two contexts above index_topk" if rows else "not in this run", op="<="),
        Target(f"{name}: whole sparse step vs the dense V3 step at the longest context", 1.0, "x",
               longest["speedup_vs_dense"] if longest else None,
               f"{device.type}, s_k={longest['s_k']}" if longest else "not in this run"),
    ]  # fmt: skip


def _block_targets(rows: list[dict], why_not: str) -> list[Target]:
    """The block drafter's goals (issue 13): speed at T=0 and T=1, accepted length at W=6, and
    adaptive verify against the best fixed verify length, per temperature."""
    block = [r for r in rows if r["drafter"].startswith("block")]

    def best(temperature, adaptive=None):
        pick = [r for r in block if r["temperature"] == temperature
                and (adaptive is None or (r["drafter"] == "block adaptive") == adaptive)]  # fmt: skip
        return max(pick, key=lambda r: r["tokens_per_second"]) if pick else None

    def where(row):
        return f"{row['drafter']}, W={row['num_draft_tokens']}" if row else why_not or "no block drafter row"

    greedy, sampled = best(0.0), best(1.0)
    w6 = [r for r in block if r["drafter"] == "block" and r["num_draft_tokens"] == 6 and r["temperature"] == 0]
    out = [
        Target("block drafter at temperature 0, best row, vs plain greedy", 1.8, "x",
               greedy["speedup"] if greedy else None, where(greedy)),
        Target("block drafter at temperature 0, best row, vs MTP-1", 1.5, "x",
               greedy["speedup_vs_mtp"] if greedy else None, where(greedy)),
        Target("block drafter at temperature 1, best row, vs plain sampling", 1.4, "x",
               sampled["speedup"] if sampled else None, where(sampled)),
        Target("block drafter mean accepted length at W=6, temperature 0, every draft verified", 3.5, "",
               w6[0]["mean_accepted_length"] if w6 else None, "" if w6 else why_not or "no W=6 row"),
    ]  # fmt: skip
    for temperature in (0.0, 1.0):
        adaptive, fixed = best(temperature, True), best(temperature, False)
        ratio = adaptive["tokens_per_second"] / fixed["tokens_per_second"] if adaptive and fixed else None
        note = f"adaptive W={adaptive['num_draft_tokens']} vs fixed W={fixed['num_draft_tokens']}" if ratio else why_not
        out.append(Target(f"block drafter at temperature {temperature:g}: adaptive verify vs the best fixed verify "
                          "length, tokens/s", 1.0, "x", ratio, note or "no adaptive and fixed rows"))  # fmt: skip
    return out


def _compiled_targets(rows: list[dict]) -> list[Target]:
    """Section 5's goals, over every compiled configuration and arch of the run."""
    why = "" if rows else "section 5 not in this run"
    built = [r for r in rows if r["error"] is None]
    decode_rows = [r for r in built if r["kernel"] == "_mla_decode_kernel"]

    def measured(values):
        return values if rows else None

    return [
        Target("compiled: configurations that fail to compile (FP8 on sm_80 included)", 0, "",
               measured(len(rows) - len(built)), why, op="<="),
        Target("compiled: configurations that spill registers", 0, "",
               measured(sum(r["spill_bytes"] > 0 for r in built)), why, op="<="),
        Target("compiled: fewest KV tiles in flight in a decode configuration", 2, "",
               min((r["kv_stages"] for r in decode_rows), default=None) if rows else None, why),
        Target("compiled: fewest CTAs per SM of any configuration", 1, "",
               min((r["ctas_per_sm"] for r in built), default=None) if rows else None, why),
    ]  # fmt: skip


def run(settings: Settings, device: torch.device, sections=SECTIONS, models=None, log=print, checkpoint=None) -> dict:
    """Measure the report's sections and return the report dict.

    Args:
        settings: sizes (`Settings.quick(device)`, `.full(device)`, or custom).
        device: where to run; the kernel sweep runs only on CUDA.
        sections: a subset of SECTIONS.
        models: (target, draft) or (target, draft, block drafter) for section 4 instead of the
            shipped `bench.model` weights.
        log: called with each printed block (tables, targets).
        checkpoint: called with the report so far after each section (e.g. to save it, so a
            run cut short by a time limit still leaves its finished sections).
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    start = time.perf_counter()
    report = {**metadata(device), "settings": settings.as_dict(), "sections": list(sections), "notes": {},
              "memory": [], "memory_context": [], "decode": [], "generation": [], "speculative": [], "compiled": []}  # fmt: skip
    target = draft = block = None
    note = ""
    if models is not None:
        target, draft, block = (*models, None)[:3]
    elif "speculative" in sections or "memory" in sections:
        target, draft, block, note = speculative.load_shipped(device)
    if note:
        report["notes"]["speculative" if target is None else "block"] = note
    if "speculative" in sections and target is not None:
        # checked before any section runs, not after minutes of them
        longest = settings.prompt_bytes + settings.spec_new_tokens + max(k for _, k in settings.drafters) + 1
        if longest > target.config.max_position_embeddings:
            raise ValueError(
                f"prompt_bytes + spec_new_tokens + draft overshoot = {longest} positions exceeds the shipped "
                f"model's max_position_embeddings {target.config.max_position_embeddings}"
            )

    if "memory" in sections:
        rows = memory.memory_rows(memory.presets(target.config if target is not None else None))
        report["memory"] = rows
        report["memory_context"] = memory.context_rows()
        skipped = f"\n(no row for the shipped small model: {note})" if target is None else ""
        log(f"\n== 1. KV cache bytes per token (latent vs full multi-head K/V) ==\n"
            f"{memory.format_table(rows)}{skipped}\n\n"
            "KV cache bytes per token of context, all layers: V4 keeps a 128-token window per layer plus one "
            "compressed entry per 4 (CSA) or 128 (HCA) tokens and CSA indexer keys: one sequence of a compact "
            "mla.v4_cache.V4Cache (built on the meta device) after a decode step; FP8: FlashMLA's MODEL1 rows "
            "(584 B) and MXFP4 indexer keys\n"
            f"{memory.format_context_table(report['memory_context'])}")
        _checkpoint(checkpoint, report, start)

    if "decode" in sections:
        if device.type == "cuda":
            ceilings = decode.measure_ceilings(device, settings.ceiling_copy_bytes, settings.ceiling_matmul_n)
            report["ceilings"] = ceilings
            shapes = decode.sweep_shapes(settings.kernel_sweep)
            rows = decode.kernel_rows(shapes, device, ceilings, progress=_bar("2. kernel sweep"))
            report["decode"].extend(rows)
            log(f"\n== 2. decode kernel vs reference on {report['device']} (copy {ceilings['copy_gbps']:.0f} GB/s, "
                f"bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s measured now) ==\n"
                f"{decode.format_kernel_table(rows)}\n"
                f"(reference skipped where b*s_k*h_q > {decode.REFERENCE_MAX_WORK})")
            _checkpoint(checkpoint, report, start)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        n = torch.get_num_threads()
        threads = f", {n} thread{'s' if n > 1 else ''}" if device.type == "cpu" else ""
        why = _missing("transformers")
        if why:
            report["notes"]["layer"] = why
            log(f"\n== 2. attention layer decode: skipped ({why}) ==")
        else:
            rows = layer.layer_rows(settings.layer_config, settings.layer_contexts, device, dtype,
                                    _bar("2. layer decode"), settings.layer_model,
                                    settings.ceiling_copy_bytes)  # fmt: skip
            report["decode"].extend(rows)
            log(f"\n== 2. one {settings.layer_model} attention layer, one decode step, b=1, {dtype} ==\n"
                "absorbed: mla.MLAttention on a LatentCache; naive: same projections + mla.reference.mla_naive "
                "(decompresses every cached latent to per-head K/V); transformers: DeepseekV3Attention, eager, "
                f"DynamicCache. copy GB/s: a {settings.ceiling_copy_bytes >> 20} MiB copy timed in turn with the "
                f"row's calls (read + write bytes{threads}); stream ms: the layer's weights + the cached latents read "
                "once at that rate; x stream time: ms over stream ms (lower is better)\n"
                f"{layer.format_layer_table(rows)}")
        cfg = settings.sparse_layer_config
        rows = sparse.sparse_rows(cfg, settings.sparse_layer_contexts, device, dtype, _bar("2. sparse layer decode"),
                                  settings.sparse_layer_model)  # fmt: skip
        report["decode"].extend(rows)
        log(f"\n== 2. one {settings.sparse_layer_model} sparse attention layer (index_topk {cfg.index_topk}) vs the "
            f"dense V3 layer (the same weights without the indexer) over the same cache, one decode step, b=1, "
            f"{dtype}{threads} ==\n"
            "ms: the whole step (MLAttention.forward); indexer ms: indexer projections + write_index + select "
            "(scores of every cached key + exact top-k); attention ms: the decode attention call alone "
            "(StepPlan.attend over the `attended` slots: the chosen index_topk, or all s_k for dense; projections "
            "and W_UK/W_UV absorption excluded); eff. GB/s: weights + attended latent rows (+ every indexer key) over "
            "ms; max |diff|: sparse vs dense output where every position is chosen (s_k <= index_topk)\n"
            f"{sparse.format_sparse_table(rows)}")
        _checkpoint(checkpoint, report, start)

    why = _missing("transformers")
    if "generation" in sections and why:
        report["notes"]["generation"] = why
        log(f"\n== 3. generation: skipped ({why}) ==")
    elif "generation" in sections:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rows = generation.generation_rows(settings.generation_contexts, settings.generation_tokens, device, dtype,
                                          settings.generation_config, _bar("3. generation"))  # fmt: skip
        report["generation"] = rows
        log(f"\n== 3. greedy decoding, transformers {rows[0]['model']} (random weights, sdpa, {dtype}): "
            "unpatched vs mla.hf.patch; the DynamicCache holds `context` random latents per layer, only decode "
            f"is timed ==\n{generation.format_generation_table(rows)}")
        _checkpoint(checkpoint, report, start)

    if "speculative" in sections:
        if target is None:
            log(f"\n== 4. speculative decoding: skipped ({note}) ==")
        else:
            prompts = speculative.make_prompts(settings.prompts, settings.prompt_bytes)
            profiles = None
            if block is not None:
                profiles = speculative.cost_profiles(target, block, (0.0, 1.0), settings.prompt_bytes,
                                                      settings.profile_repeats)
                report["cost_profiles"] = {f"{t:g}": asdict(p) for t, p in profiles.items()}
            rows = speculative.speculative_rows(target, draft, prompts, settings.spec_new_tokens,
                                                drafters=settings.drafters, progress=_bar("4. speculative"),
                                                block=block, profiles=profiles)  # fmt: skip
            report["speculative"] = rows
            measured = "".join(
                f"\nblock step cost by verify length 0..{len(p.step) - 1} at T={t:g}, measured now (x a step "
                f"verifying nothing): {' '.join(f'{v / p.step[0]:.2f}' for v in p.step)}"
                for t, p in (profiles or {}).items()
            )  # fmt: skip
            skipped = f"\n({report['notes']['block']})" if "block" in report["notes"] else ""
            log(f"\n== 4. speculative decoding on the shipped model, {len(prompts)} held-out source prompts of "
                f"{settings.prompt_bytes} bytes, {settings.spec_new_tokens} new tokens each, b=1; tokens/s over "
                "whole calls (prefill included); plain = one token per forward on the same cache; k: drafts per "
                "step (block: W); x MTP-1: tokens/s over the MTP row's; mean verify length: drafts put up per step; "
                "draft cost: drafting time per step over plain decoding's time per token; ECE: calibration error "
                "of the block drafter's survival estimates ==\n"
                f"{speculative.format_speculative_table(rows)}{measured}{skipped}")
        _checkpoint(checkpoint, report, start)

    if "compiled" in sections:
        from . import compiled

        rows = compiled.compiled_rows(settings.compiled_configs)
        report["compiled"] = rows
        log(f"\n== 5. compiled code of the Triton kernels, no GPU needed (triton {compiled.triton.__version__}): "
            "registers and spill bytes from ptxas -v, shared memory, MMA kind, KV tiles in flight (kv stages), "
            f"CTAs per SM ==\n{compiled.format_compiled_table(rows)}")

    if "mxfp4" in sections:
        why = _missing("transformers") or ("" if settings.mxfp4_prompts else "--full only (about 90 s)")
        if why:
            report["notes"]["mxfp4"] = why
            log(f"\n== 6. MXFP4 entries: skipped ({why}) ==")
        else:
            from . import mxfp4

            result = mxfp4.mxfp4_report(settings.mxfp4_prompts, progress=_bar("6. mxfp4"))
            report["mxfp4"] = result
            log(f"\n== 6. MXFP4 entries (SGLang's 368 B row) simulated on tiny random DeepSeek-V4 models (head_dim "
                f"512, rope 64; {result['settings']['models']} seeds, reference backend, float32, CPU): greedy "
                "tokens with each cache against the float32 cache's; fp8-rounded: the simulation with MODEL1 "
                f"entries, which must match fp8 ==\n{mxfp4.format_mxfp4(result)}")
        _checkpoint(checkpoint, report, start)

    goals = targets(report, device)
    report["targets"] = [t.as_dict() for t in goals]
    log("\n== targets ==\n" + "\n".join(t.line() for t in goals))
    report["wall_s"] = time.perf_counter() - start
    return report


def _checkpoint(checkpoint, report: dict, start: float) -> None:
    if checkpoint is not None:
        report["wall_s"] = time.perf_counter() - start
        checkpoint(report)


def default_path(report: dict) -> str:
    """bench/results/local/<device>-<date>.json in the repository, wherever the run started."""
    label = "cpu" if report["device"] == "cpu" else device_label(torch.device("cuda"))
    return os.path.join(LOCAL_RESULTS, f"{label}-{report['date']}.json")


def save(report: dict, path: str, figure: bool = True) -> str | None:
    """Write the JSON to `path` and (with `figure`, where matplotlib is installed) the figure
    beside it (same name, .png); returns the PNG's path, or None when none was written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    if not figure or importlib.util.find_spec("matplotlib") is None:
        return None
    from .plot import plot_report

    png = os.path.splitext(path)[0] + ".png"
    plot_report(report, png)
    return png
