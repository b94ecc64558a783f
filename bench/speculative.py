"""Section 4: speculative decoding on the shipped small model (`bench.model`): plain decoding
against each drafter (n-gram, draft model, MTP, the block drafter with and without adaptive
verify) at temperature 0 and 1.

The prompts are byte strings of Python source from files the model was not trained on, one
prompt at a time (b = 1, the latency-bound case speculative decoding is for). Plain decoding
runs the same model on the same cache adapter (`mla.speculative.MLACausalLM`) one token per
forward; both sides are timed over the whole call, prefill included, as
`mla.speculative.generate` reports it.
"""

from __future__ import annotations

import os
import random
import sysconfig
import time

import torch

from mla.speculative import (
    BlockDrafter,
    Drafter,
    DraftModelDrafter,
    MLACausalLM,
    MTPDrafter,
    NgramDrafter,
    expected_calibration_error,
    generate,
    measure_cost_profile,
)
from mla.speculative.sampling import probabilities, sample

from .common import format_table, synchronize

# Standard-library files the prompts come from, when bench.model does not name its held-out files.
DEFAULT_PROMPT_FILES = ("textwrap.py", "fractions.py", "shlex.py", "graphlib.py", "statistics.py", "heapq.py")
# (drafter, draft tokens per step) in report order. One MTP depth predicts one token ahead from
# the target's own hidden state; chained further it drafts from its own outputs and its
# acceptance drops (89% -> 36% per token on the shipped model), so it drafts one token, as
# DeepSeek-V3 does. The others' k were the best of a few on the shipped model on 2 CPU cores.
# The block drafter (one trained model, block size 8): k = W drafts per step, every row
# verifying all k ("block"), or each row the length its confidence and the measured cost
# profile make best, up to k ("block adaptive").
BLOCK_ROWS = tuple((name, w) for name in ("block", "block adaptive") for w in (4, 6, 8))
DRAFTERS = (("ngram", 6), ("draft model", 3), ("mtp", 1)) + BLOCK_ROWS
# --full on the CPU: a small sweep of k per drafter.
DRAFTER_SWEEP = (("ngram", 4), ("ngram", 6), ("ngram", 8), ("draft model", 2), ("draft model", 3),
                 ("draft model", 4), ("mtp", 1), ("mtp", 2)) + BLOCK_ROWS  # fmt: skip


def load_shipped(device: torch.device):
    """(target, draft, block, note): the shipped models from `bench.model` in eval mode on
    `device`, or None for those that are not there (not trained yet) and why in note."""
    try:
        from bench import model as shipped
    except ImportError as e:
        return None, None, None, f"bench.model is not available ({e})"
    try:
        target, draft = shipped.load_target(device=device), shipped.load_draft(device=device)
    except FileNotFoundError as e:
        return None, None, None, f"no shipped weights: {e}"
    except ImportError as e:  # safetensors, needed to read the weights
        return None, None, None, f"cannot load the shipped weights ({e})"
    try:
        return target, draft, shipped.load_block_drafter(target, device=device), ""
    except FileNotFoundError as e:
        return target, draft, None, f"no block drafter rows: {e}"


def prompt_files() -> list[str]:
    """Paths of the held-out source files: `bench.model.HELDOUT_FILES` (files the shipped model
    was not trained on), else `DEFAULT_PROMPT_FILES`, from this interpreter's standard library."""
    try:
        from bench import model as shipped

        names = getattr(shipped, "HELDOUT_FILES", None)
    except ImportError:
        names = None
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = [name if os.path.isabs(name) else os.path.join(stdlib, name) for name in (names or DEFAULT_PROMPT_FILES)]
    return [p for p in paths if os.path.isfile(p)]


def make_prompts(count: int, length: int, seed: int = 0, files: list[str] | None = None) -> list[torch.Tensor]:
    """`count` byte-level prompts of `length` bytes: source snippets starting at a line start,
    from a seeded choice of the held-out files at least 4 * length bytes long (each used once
    while there are enough). int64 1-D tensors of byte values."""
    files = [p for p in (files if files is not None else prompt_files()) if os.path.getsize(p) >= 4 * length]
    if not files:
        raise FileNotFoundError(f"no held-out source file of at least {4 * length} bytes for the speculative prompts")
    rng = random.Random(seed)
    chosen = rng.sample(sorted(files), min(count, len(files)))
    prompts = []
    for i in range(count):
        with open(chosen[i % len(chosen)], "rb") as f:
            data = f.read()
        starts = [0] + [j + 1 for j in range(len(data) - length - 1) if data[j] == ord("\n")]
        start = rng.choice(starts)
        prompts.append(torch.tensor(list(data[start : start + length]), dtype=torch.long))
    return prompts


@torch.no_grad()
def plain_generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float, generator=None):
    """One token per forward: (new tokens [max_new_tokens], seconds incl. prefill)."""
    device = model.lm_head.weight.device
    lm = MLACausalLM(model)
    synchronize(device)
    start = time.perf_counter()
    try:
        logits, _ = lm.prefill([prompt.to(device)], max_new_tokens)
        tokens = []
        for i in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                token = sample(probabilities(logits, temperature), generator)
            tokens.append(token)
            if i < max_new_tokens - 1:
                logits = lm.forward(token[:, None])[0][:, -1]
        out = torch.cat(tokens).cpu()
    finally:
        lm.release()
    synchronize(device)
    return out, time.perf_counter() - start


class TimedDrafter(Drafter):
    """A drafter whose propose and accept calls are timed (the device synchronised around
    them): `seconds` of drafting over `steps` calls to propose."""

    def __init__(self, inner: Drafter, device: torch.device):
        self.inner, self.device, self.needs_hidden = inner, device, inner.needs_hidden
        self.seconds, self.steps = 0.0, 0

    def _timed(self, fn, *args):
        synchronize(self.device)
        start = time.perf_counter()
        out = fn(*args)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out

    def start(self, *args):
        self.inner.start(*args)

    def propose(self, pending, k):
        self.steps += 1
        return self._timed(self.inner.propose, pending, k)

    def accept(self, verified):
        self._timed(self.inner.accept, verified)

    def retain(self, rows):
        self.inner.retain(rows)

    def release(self):
        self.inner.release()


def _drafter(name: str, target, draft, block=None, profile=None):
    if name == "ngram":
        return NgramDrafter()
    if name == "draft model":
        return DraftModelDrafter(draft)
    if name == "mtp":
        return MTPDrafter(target)
    if name in ("block", "block adaptive"):
        return BlockDrafter(block, adaptive=profile if name == "block adaptive" else None, record=True)
    raise ValueError(f"unknown drafter {name!r}")


def cost_profiles(target, block, temperatures, prompt_bytes: int, repeats: int = 15) -> dict:
    """{temperature: CostProfile} of the block drafter's steps, measured now (b = 1, a context of
    prompt_bytes, `mla.speculative.measure_cost_profile` with `repeats` timings per verify length:
    on a shared CPU its default 7 left the profile noisy enough to move the chosen lengths)."""
    return {t: measure_cost_profile(target, block, temperature=t, prompt_length=prompt_bytes, repeats=repeats)
            for t in temperatures}  # fmt: skip


@torch.no_grad()
def speculative_rows(target, draft, prompts, max_new_tokens: int, temperatures=(0.0, 1.0), drafters=DRAFTERS,
                     progress=None, seed: int = 0, block=None, profiles=None) -> list[dict]:  # fmt: skip
    """Plain decoding vs each drafter over the prompts, per temperature.

    Args:
        target: `mla.MLAForCausalLM` carrying an MTP module (`target.mtp`) for the "mtp" drafter.
        draft: the draft `mla.MLAForCausalLM` (same vocabulary) for "draft model".
        prompts: 1-D int64 prompts, each generated alone.
        drafters: (name, num_draft_tokens) pairs; names "ngram", "draft model", "mtp", "block",
            "block adaptive" (rows whose model is missing are left out).
        block: the `mla.speculative.BlockDraftModel` attached to target, for "block" rows.
        profiles: {temperature: CostProfile} for "block adaptive" (default: `cost_profiles`).

    Returns:
        rows {"drafter", "temperature", "num_draft_tokens", "tokens_per_second",
        "baseline_tokens_per_second", "speedup", "speedup_vs_mtp", "mean_accepted_length",
        "acceptance_rate", "mean_verify_length", "draft_cost", "calibration_error", "new_tokens",
        "matches_baseline"}; tokens/s is all new tokens over all the calls' time.
        speedup_vs_mtp: over the MTP row with k = 1 at the same temperature (None without one).
        mean_verify_length: drafts put up per row and step. draft_cost: the drafter's time per
        step (propose and accept) over plain decoding's time per token. calibration_error: ECE
        of the block drafter's survival estimates against the verified positions' outcomes.
        matches_baseline (greedy only): the drafted run produced plain greedy's tokens.
    """
    device = target.lm_head.weight.device
    available = {"mtp": getattr(target, "mtp", None) is not None, "block": block is not None,
                 "block adaptive": block is not None}  # fmt: skip
    drafters = [(name, k) for name, k in drafters if available.get(name, True)]
    if block is not None and profiles is None:
        profiles = cost_profiles(target, block, temperatures, len(prompts[0]))
    # One untimed warm-up of each path, so no row pays for first-call allocations.
    warm = prompts[0][:16]
    plain_generate(target, warm, 4, 0.0)
    for name, k in drafters:
        profile = None if profiles is None else profiles[temperatures[0]]
        generate(target, warm[None], _drafter(name, target, draft, block, profile), max_new_tokens=4,
                 num_draft_tokens=k)  # fmt: skip
    # Prompt by prompt, every configuration in turn: a change of machine load mid-run then
    # weighs on plain decoding and on the drafters alike.
    configs = [(t, None, 0) for t in temperatures] + [(t, name, k) for t in temperatures for name, k in drafters]
    gens = {c: torch.Generator(device).manual_seed(seed) for c in configs}
    totals = {c: {"tokens": 0, "seconds": 0.0, "accepted": 0, "drafted": 0, "row_steps": 0, "outputs": [],
                  "draft_seconds": 0.0, "draft_steps": 0, "pairs": []} for c in configs}  # fmt: skip
    for prompt in progress(prompts) if progress else prompts:
        for config in configs:
            temperature, name, k = config
            total = totals[config]
            if name is None:
                out, seconds = plain_generate(target, prompt, max_new_tokens, temperature, gens[config])
                total["tokens"] += len(out)
                total["seconds"] += seconds
            else:
                profile = None if profiles is None else profiles[temperature]
                drafter = TimedDrafter(_drafter(name, target, draft, block, profile), device)
                res = generate(target, prompt[None].to(device), drafter, max_new_tokens=max_new_tokens,
                               num_draft_tokens=k, temperature=temperature, generator=gens[config])  # fmt: skip
                out = res.sequences[0, len(prompt) : res.lengths[0]].cpu()
                for key, value in (("tokens", res.stats.new_tokens), ("seconds", res.stats.seconds),
                                   ("accepted", res.stats.accepted), ("drafted", res.stats.drafted),
                                   ("row_steps", res.stats.row_steps), ("draft_seconds", drafter.seconds),
                                   ("draft_steps", drafter.steps)):  # fmt: skip
                    total[key] += value
                total["pairs"] += getattr(drafter.inner, "calibration_pairs", [])
            total["outputs"].append(out)
    rows = []
    for (temperature, name, k), total in totals.items():
        if name is None:
            continue
        base = totals[(temperature, None, 0)]
        mtp = totals.get((temperature, "mtp", 1))
        tps, base_tps = total["tokens"] / total["seconds"], base["tokens"] / base["seconds"]
        same = all(torch.equal(a, b) for a, b in zip(total["outputs"], base["outputs"]))
        pairs = total["pairs"]
        rows.append({
            "drafter": name, "temperature": temperature, "num_draft_tokens": k, "tokens_per_second": tps,
            "baseline_tokens_per_second": base_tps, "speedup": tps / base_tps,
            "speedup_vs_mtp": tps * mtp["seconds"] / mtp["tokens"] if mtp else None,
            "mean_accepted_length": 1 + total["accepted"] / total["row_steps"] if total["row_steps"] else 0.0,
            "acceptance_rate": total["accepted"] / total["drafted"] if total["drafted"] else 0.0,
            "mean_verify_length": total["drafted"] / total["row_steps"] if total["row_steps"] else 0.0,
            "draft_cost": (total["draft_seconds"] / total["draft_steps"]) / (base["seconds"] / base["tokens"])
            if total["draft_steps"] else None,
            "calibration_error": expected_calibration_error(*zip(*pairs)) if pairs else None,
            "new_tokens": total["tokens"], "matches_baseline": same if temperature == 0 else None,
        })  # fmt: skip
    return rows


def format_speculative_table(rows: list[dict]) -> str:
    columns = [
        ("drafter", "drafter", ""), ("T", "temperature", "g"), ("k", "num_draft_tokens", "d"),
        ("tokens/s", "tokens_per_second", ".1f"), ("plain tokens/s", "baseline_tokens_per_second", ".1f"),
        ("speedup", "speedup", ".2f"), ("x MTP-1", "speedup_vs_mtp", ".2f"),
        ("mean accepted length", "mean_accepted_length", ".2f"), ("acceptance rate", "acceptance_rate", ".0%"),
        ("mean verify length", "mean_verify_length", ".2f"), ("draft cost", "draft_cost", ".2f"),
        ("ECE", "calibration_error", ".3f"), ("same tokens as plain greedy", "matches_baseline", ""),
    ]  # fmt: skip
    return format_table(columns, rows)
