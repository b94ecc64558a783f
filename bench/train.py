"""Train the shipped small model: a byte-level MLA LM with one MTP module, a draft model, and
its block drafter.

    python -m bench.train [--minutes 20] [--block-minutes 25] [--stages models block] [--steps N]
                          [--out bench/weights] [--seed 0]

Data: the *.py files of this interpreter's standard library (no download), in sorted order;
files whose name hashes into 2 of 100 buckets are held out (`bench.model.stdlib_sources`).
Training samples random windows of the concatenated training files; the held-out bits per
byte are measured on evenly spaced windows of the concatenated held-out files.

The target trains jointly with one DeepSeek-V3 MTP depth: besides the next-byte loss, the MTP
module reads the target's final hidden state h_i and the embedding of t_{i+1} and predicts
t_{i+2}; its cross entropy is added with weight `MTP_WEIGHT` and its gradient reaches the
target through h_i and the shared embedding and head. The draft model trains afterwards on
its own. Both use AdamW with a linear warmup and a cosine decay over the run's progress,
which is the larger of steps done / --steps and time spent / the time left for that model,
so a run stops on time on a slow or shared machine.

The block stage (`train_block_stage`) keeps the target frozen: the target writes greedy and
sampled continuations of training windows, the block drafter learns to draft them from the
target's hidden states (self-distillation), and its confidence head is Platt-calibrated on
held-out continuations, whose calibration error (ECE) metadata.json reports.

Weights are saved as float16 safetensors (bench/model.py documents the folder), and the
held-out figures in metadata.json are those of the saved (float16-rounded) weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mla import MLAConfig, MLAForCausalLM
from mla.speculative import MLACausalLM, probabilities
from mla.speculative.adapters import capture_hidden
from mla.speculative.block import (
    GREEDY,
    SAMPLED,
    BlockDrafterConfig,
    BlockDraftModel,
    calibrate,
    expected_calibration_error,
)
from mla.speculative.mtp import MultiTokenPredictor, attach_mtp
from mla.speculative.sampling import sample

from . import model as shipped

MTP_WEIGHT = 0.3  # DeepSeek-V3 weights its MTP loss 0.3 early in training
STAGES = ("models", "block")
SAVE_DTYPE = torch.float16  # 10 mantissa bits, and no weight here comes near float16's range limit


@dataclasses.dataclass(frozen=True)
class BlockPreset:
    """The block drafter's stage: its shape, its data and its training.

    layers, target_layers, block_size, markov_rank: `mla.speculative.BlockDrafterConfig`.
    prompt_len, new_tokens: each training sequence is prompt_len bytes of source, then
        new_tokens the frozen target writes after it (its own continuation).
    sequences, heldout_sequences: continuations per temperature (0 and 1) from training
        windows and from held-out windows (half of those fit the calibration, half measure it).
    generate_batch: rows generated at once.
    batch_size, anchors: sequences per optimizer step, blocks per sequence.
    position_decay: block position j weighs position_decay ** j in the drafting loss.
    """

    layers: MLAConfig
    target_layers: tuple[int, ...]
    block_size: int
    markov_rank: int
    prompt_len: int
    new_tokens: int
    sequences: int
    heldout_sequences: int
    generate_batch: int
    batch_size: int
    anchors: int
    lr: float
    position_decay: float = 0.8
    warmup_steps: int = 30
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model sizes and training hyper-parameters of one run."""

    target: MLAConfig
    draft: MLAConfig
    seq_len: int
    batch_size: int
    target_lr: float
    draft_lr: float
    draft_share: float  # fraction of the time budget given to the draft model
    eval_windows: int
    block: BlockPreset
    warmup_steps: int = 30
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1


def _config(hidden, layers, heads, kv_lora, nope, rope, v, intermediate, max_positions) -> MLAConfig:
    return MLAConfig(
        hidden_size=hidden, num_heads=heads, q_lora_rank=None, kv_lora_rank=kv_lora, qk_nope_head_dim=nope,
        qk_rope_head_dim=rope, v_head_dim=v, rope_theta=10000.0, rope_interleave=False, rms_norm_eps=1e-5,
        vocab_size=256, num_hidden_layers=layers, intermediate_size=intermediate,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
    )  # fmt: skip


PRESETS = {
    # 2.2 M parameters for the target (1.7 M without its MTP module), 0.45 M for the draft.
    # Twenty minutes on two cores is a few million bytes seen, so the time goes to the target
    # (a 3.5 M target, hidden 256, saw too few bytes and was worse per minute) and the draft,
    # which learns several times faster per second, gets a tenth of it.
    "small": Preset(
        target=_config(192, 4, 4, 64, 32, 16, 48, 512, 512),
        draft=_config(128, 2, 4, 32, 16, 16, 32, 384, 512),
        seq_len=512, batch_size=4, target_lr=3e-3, draft_lr=4e-3, draft_share=0.1, eval_windows=96,
        block=BlockPreset(
            layers=_config(192, 1, 4, 64, 32, 16, 48, 512, 512), target_layers=(2, 4), block_size=8, markov_rank=32,
            prompt_len=256, new_tokens=96, sequences=128, heldout_sequences=24, generate_batch=128, batch_size=8,
            anchors=32, lr=2e-3,
        ),
    ),
    # For tests: trains in a fraction of a second per step.
    "tiny": Preset(
        target=_config(32, 1, 2, 16, 8, 8, 8, 64, 64),
        draft=_config(16, 1, 2, 8, 8, 8, 8, 32, 64),
        seq_len=32, batch_size=2, target_lr=1e-3, draft_lr=1e-3, draft_share=0.3, eval_windows=2, warmup_steps=1,
        block=BlockPreset(
            layers=_config(32, 1, 2, 16, 8, 8, 8, 64, 64), target_layers=(0, 1), block_size=4, markov_rank=8,
            prompt_len=8, new_tokens=12, sequences=4, heldout_sequences=4, generate_batch=4, batch_size=2, anchors=3,
            lr=1e-3, warmup_steps=1,
        ),
    ),
}


def load_corpus(root: str | Path | None = None) -> dict:
    """The standard library's source as two uint8 streams: {"train", "heldout"} tensors, and
    {"train_files", "heldout_files"} counts."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, heldout = shipped.stdlib_sources(root)
    streams = {}
    for name, paths in (("train", train), ("heldout", heldout)):
        data = b"".join((root / p).read_bytes() for p in paths)
        streams[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return {**streams, "train_files": len(train), "heldout_files": len(heldout)}


def sample_windows(stream: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size random windows of `length` bytes: int64 [batch_size, length]."""
    starts = torch.randint(0, stream.numel() - length + 1, (batch_size, 1), generator=generator)
    return stream[starts + torch.arange(length)].long()


def eval_windows(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """`count` evenly spaced windows of `length` bytes: int64 [count, length]."""
    if stream.numel() < length:
        raise ValueError(f"the held-out stream has {stream.numel()} bytes, fewer than one window of {length}")
    starts = torch.linspace(0, stream.numel() - length, count).long()[:, None]
    return stream[starts + torch.arange(length)].long()


def mtp_logits(model: MLAForCausalLM, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
    """The MTP module of `model` on whole sequences, without a cache (the training forward).

    Args:
        hidden: [b, n, hidden_size], the target's final hidden states h_0 ... h_{n-1}.
        next_tokens: int64 [b, n], t_1 ... t_n.

    Returns:
        [b, n, vocab] logits for t_2 ... t_{n+1}.
    """
    return model.mtp(hidden, next_tokens)[0]


def heads(model: MLAForCausalLM, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """On windows t_0 ... t_{T+1} (int64 [b, T + 2]) the model reads t_0 ... t_{T-1}: logits
    [b, T, vocab] for t_1 ... t_T and, when it has an MTP module (else None), MTP logits
    [b, T, vocab] for t_2 ... t_{T+1} from the pairs (h_i, t_{i+1})."""
    inputs = windows[:, :-2]
    logits, hidden = model(inputs, return_hidden=True)
    if not hasattr(model, "mtp"):
        return logits, None
    return logits, mtp_logits(model, hidden, windows[:, 1:-1])


def losses(model: MLAForCausalLM, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean cross entropies (nats per byte) on windows [b, T + 2]: "main" (next byte) and, with
    an MTP module, "mtp" (the byte after next)."""
    logits, logits_2 = heads(model, windows)
    out = {"main": F.cross_entropy(logits.flatten(0, 1), windows[:, 1:-1].flatten())}
    if logits_2 is not None:
        out["mtp"] = F.cross_entropy(logits_2.flatten(0, 1), windows[:, 2:].flatten())
    return out


def init_weights(model: MLAForCausalLM) -> None:
    """GPT-2 style: N(0, 0.02) for linear and embedding weights, the projections that write
    into the residual stream (o_proj, down_proj) scaled by 1/sqrt(2 * layers); norms at 1."""
    layers = model.config.num_hidden_layers + (1 if hasattr(model, "mtp") else 0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        with torch.no_grad():
            p.normal_(0.0, std)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not norms, not the embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def _progress(step: int, clock: float, deadline: float, max_steps: int | None) -> float:
    """The schedule's fraction done: of the time from `clock` (the end of the first step, which
    includes compiling) to `deadline`, or of max_steps, whichever is further."""
    progress = (time.time() - clock) / max(deadline - clock, 1e-9) if step > 0 else 0.0
    return progress if max_steps is None else max(progress, step / max_steps)


def lr_at(step: int, progress: float, peak: float, preset: Preset) -> float:
    """Linear warmup over the first warmup_steps, then cosine from peak to min_lr_ratio * peak over progress."""
    warm = min(1.0, (step + 1) / preset.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak * warm * (preset.min_lr_ratio + (1 - preset.min_lr_ratio) * cosine)


def train_model(model, corpus, preset: Preset, lr: float, deadline: float, max_steps: int | None, seed: int,
                compile_model: bool, desc: str) -> dict:
    """Train until `deadline` (a time.time() value) or `max_steps`, whichever comes first; returns
    {"steps", "tokens_seen", "wall_seconds", "final_train_bpb" (smoothed), "compiled"}."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, lr, preset.weight_decay)

    def loss_fn(windows):
        parts = losses(model, windows)
        return parts["main"] + MTP_WEIGHT * parts.get("mtp", 0.0), parts["main"]

    step_fn = torch.compile(loss_fn) if compile_model else loss_fn
    start = time.time()
    clock = start  # the schedule's clock starts after the first step, which includes compiling
    step, tokens, smoothed = 0, 0, None
    bar = tqdm(total=100, desc=desc, unit="%", dynamic_ncols=True, file=sys.stderr)
    model.train()
    while True:
        progress = _progress(step, clock, deadline, max_steps)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, lr, preset)
        windows = sample_windows(corpus["train"], preset.batch_size, preset.seq_len + 2, generator)
        try:
            total, main = step_fn(windows)
        except Exception as err:  # inductor needs a working C++ toolchain; eager runs everywhere
            if step_fn is loss_fn or step > 0:
                raise
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); training without it", stacklevel=1)
            step_fn, compile_model = loss_fn, False
            total, main = step_fn(windows)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += preset.batch_size * preset.seq_len
        if step == 1:
            clock = time.time()
        bpb = main.item() / math.log(2)
        smoothed = bpb if smoothed is None else 0.95 * smoothed + 0.05 * bpb
        bar.n = min(100, int(100 * progress))
        bar.set_postfix(step=step, train_bpb=f"{smoothed:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                        tok_s=f"{tokens / max(time.time() - start, 1e-9):.0f}", refresh=True)
    bar.n = 100
    bar.close()
    model.eval()
    return {"steps": step, "tokens_seen": tokens, "wall_seconds": round(time.time() - start, 1),
            "final_train_bpb": round(smoothed, 4) if smoothed is not None else None, "compiled": compile_model}


def round_trip(model: torch.nn.Module) -> None:
    """Round the weights through SAVE_DTYPE in place, so evaluation sees what is shipped."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(SAVE_DTYPE).float())


@torch.no_grad()
def evaluate(model: MLAForCausalLM, windows: torch.Tensor, batch_size: int, reference=None) -> dict:
    """Held-out figures on windows int64 [n, T + 2] (see `heads`): bits per byte and top-1 accuracy of the next byte,
    of the MTP module's byte after next (and its agreement with the target's own greedy choice
    there), and, given a `reference` model, how often this model's greedy byte equals it."""
    sums = {}

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + float(value)

    for batch in windows.split(batch_size):
        logits, logits_2 = heads(model, batch)
        nats = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:-1].flatten(), reduction="sum")
        add("nats", nats)
        add("correct", (logits.argmax(-1) == batch[:, 1:-1]).sum())
        add("count", batch[:, 1:-1].numel())
        if logits_2 is not None:
            add("mtp_nats", F.cross_entropy(logits_2.flatten(0, 1), batch[:, 2:].flatten(), reduction="sum"))
            add("mtp_correct", (logits_2.argmax(-1) == batch[:, 2:]).sum())
            # speculative acceptance proxy: the MTP's guess at i + 2 vs the target's greedy byte there
            add("mtp_agree", (logits_2[:, :-1].argmax(-1) == logits[:, 1:].argmax(-1)).sum())
            add("mtp_agree_count", logits[:, 1:].shape[:2].numel())
        if reference is not None:
            add("agree", (logits.argmax(-1) == reference(batch[:, :-2]).argmax(-1)).sum())
    out = {"bpb": sums["nats"] / sums["count"] / math.log(2), "accuracy": sums["correct"] / sums["count"]}
    if "mtp_nats" in sums:
        out["mtp_bpb"] = sums["mtp_nats"] / sums["count"] / math.log(2)
        out["mtp_accuracy"] = sums["mtp_correct"] / sums["count"]
        out["mtp_target_agreement"] = sums["mtp_agree"] / sums["mtp_agree_count"]
    if reference is not None:
        out["target_agreement"] = sums["agree"] / sums["count"]
    return {k: round(v, 4) for k, v in out.items()}


# ----- the block drafter's stage: self-distillation from the frozen target -----


@torch.no_grad()
def continuations(target: MLAForCausalLM, stream: torch.Tensor, count: int, block: BlockPreset, temperature: float,
                  generator: torch.Generator, bar=None) -> torch.Tensor:  # fmt: skip
    """`count` sequences int64 [count, prompt_len + new_tokens]: a random window of `stream`,
    then what the target writes after it at `temperature` (0: greedy), through the latent cache
    as generation does, generate_batch rows at a time."""
    out = []
    for done in range(0, count, block.generate_batch):
        prompts = sample_windows(stream, min(block.generate_batch, count - done), block.prompt_len, generator)
        lm = MLACausalLM(target)
        try:
            logits, _ = lm.prefill(list(prompts), block.new_tokens)
            tokens = []
            for i in range(block.new_tokens):
                token = logits.argmax(-1) if temperature == 0 else sample(probabilities(logits, temperature), generator)
                tokens.append(token)
                if i < block.new_tokens - 1:
                    logits = lm.forward(token[:, None])[0][:, -1]
                if bar is not None:
                    bar.update(len(prompts))
        finally:
            lm.release()
        out.append(torch.cat([prompts, torch.stack(tokens, dim=1)], dim=1))
    return torch.cat(out)


@torch.no_grad()
def target_view(target: MLAForCausalLM, sequences: torch.Tensor, block: BlockPreset, batch: int = 16) -> dict:
    """What the drafter learns from, per sequence int64 [n, T]: the target's hidden states
    (`target_layers`, concatenated) at every position, float16 [n, T, F], and its logits at the
    continuation's positions (position prompt_len + i scores token prompt_len + i + 1), float16
    [n, new_tokens, V]; the cache-free forward, teacher-forced on the sequences."""
    features, logits = [], []
    for rows in sequences.split(batch):
        with capture_hidden(target, block.target_layers) as select:
            out, final = target(rows, return_hidden=True)
            features.append(select(final).half())
        logits.append(out[:, block.prompt_len :].half())
    return {"tokens": sequences, "features": torch.cat(features), "logits": torch.cat(logits)}


def block_losses(model: BlockDraftModel, data: dict, rows: torch.Tensor, anchors: torch.Tensor, block: BlockPreset):
    """Losses of blocks at `anchors` (int64 [B, N], pending positions) of sequences `rows` (int64 [B]) of `data`
    (`target_view` plus "regime" int64 [n]: GREEDY or SAMPLED, how the sequence was written).

    Drafting: per block position j, cross entropy against the target's argmax plus against its
    whole distribution (temperature 1), weighted position_decay ** j; the Markov head reads the
    sequence's previous token, i.e. the draft as it is when everything before was accepted.
    Confidence (on detached inputs, so it does not pull the drafter): binary cross entropy of
    each position's acceptance given the earlier ones', in the sequence's regime: greedy, whether
    the draft's argmax is the target's; sampled, the acceptance probability sum(min(p, q)).

    Returns (total loss, {"draft", "confidence", "greedy_accept", "sampled_accept"} floats).
    """
    tokens, regime = data["tokens"][rows], data["regime"][rows]
    w = block.block_size
    hidden, base, logits = model.teacher_forced(data["features"][rows].float(), tokens, anchors)  # [B, N, W, .]
    positions = anchors[..., None] + torch.arange(w)  # [B, N, W]
    index = (positions - block.prompt_len).flatten(1)[..., None].expand(-1, -1, base.shape[-1])
    target_logits = data["logits"][rows].gather(1, index).view_as(logits).float()
    p = torch.softmax(target_logits, dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    best = target_logits.argmax(-1)
    hard = -log_q.gather(-1, best[..., None]).squeeze(-1)
    soft = -(p * log_q).sum(-1)
    weights = block.position_decay ** torch.arange(w, dtype=torch.float32)
    draft = ((hard + soft) * weights).mean() / weights.mean()
    with torch.no_grad():
        greedy_ok = (logits.argmax(-1) == best).float()
        overlap = torch.minimum(p, log_q.exp()).sum(-1)
        label = torch.where((regime == GREEDY)[:, None, None], greedy_ok, overlap)
    confidence = model.confidence_logits(hidden.detach(), base.detach())  # [B, N, W, 2]
    chosen = confidence.gather(-1, regime.view(-1, 1, 1, 1).expand(*label.shape, 1)).squeeze(-1)
    confidence_loss = F.binary_cross_entropy_with_logits(chosen, label)
    parts = {"draft": draft.detach(), "confidence": confidence_loss.detach(),
             "greedy_accept": greedy_ok.mean(), "sampled_accept": overlap.mean()}  # fmt: skip
    return draft + confidence_loss, parts


def random_anchors(count: int, block: BlockPreset, generator: torch.Generator) -> torch.Tensor:
    """int64 [count, anchors]: distinct pending positions in the continuation, prompt_len .. T - W."""
    span = block.new_tokens - block.block_size + 1
    return torch.rand(count, span, generator=generator).argsort(dim=1)[:, : block.anchors] + block.prompt_len


def train_block(model: BlockDraftModel, data: dict, block: BlockPreset, deadline: float, max_steps: int | None,
                seed: int) -> dict:  # fmt: skip
    """Train the drafter on `data` until `deadline` or `max_steps` (the schedule as `train_model`'s);
    returns {"steps", "blocks_seen", "wall_seconds", "final_loss"}. Eager: torch.compile of this
    step took over a minute to build on 2 shared cores, a tenth of the stage, for no measured gain."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, block.lr, block.weight_decay)
    start = time.time()
    clock = start
    step, smoothed = 0, None
    bar = tqdm(total=100, desc="block drafter", unit="%", dynamic_ncols=True, file=sys.stderr)
    model.train()
    n = len(data["tokens"])
    while True:
        progress = _progress(step, clock, deadline, max_steps)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, block.lr, block)
        rows = torch.randint(0, n, (block.batch_size,), generator=generator)
        loss, parts = block_losses(model, data, rows, random_anchors(block.batch_size, block, generator), block)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step == 1:
            clock = time.time()
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        bar.n = min(100, int(100 * progress))
        bar.set_postfix(step=step, loss=f"{smoothed:.3f}", greedy_acc=f"{parts['greedy_accept'].item():.2f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=True)  # fmt: skip
    bar.n = 100
    bar.close()
    model.eval()
    return {"steps": step, "blocks_seen": step * block.batch_size * block.anchors,
            "wall_seconds": round(time.time() - start, 1), "final_loss": round(smoothed, 4) if smoothed else None}


@torch.no_grad()
def block_outcomes(model: BlockDraftModel, data: dict, block: BlockPreset, batch: int = 4) -> dict:
    """Every block of `data` (all pending positions of every continuation), teacher-forced:
    per regime {"survival": raw estimates float32 [m, W], "observed": float32 [m, W]}, observed
    survival being the running product of greedy matches (GREEDY) or of acceptance
    probabilities sum(min(p, q)) (SAMPLED) in the sequence's own regime."""
    span = block.new_tokens - block.block_size + 1
    out = {GREEDY: ([], []), SAMPLED: ([], [])}
    for rows in torch.arange(len(data["tokens"])).split(batch):
        anchors = (torch.arange(span) + block.prompt_len).expand(len(rows), -1)
        hidden, base, logits = model.teacher_forced(data["features"][rows].float(), data["tokens"][rows], anchors)
        positions = anchors[..., None] + torch.arange(block.block_size)
        index = (positions - block.prompt_len).flatten(1)[..., None].expand(-1, -1, base.shape[-1])
        p = torch.softmax(data["logits"][rows].gather(1, index).view_as(logits).float(), dim=-1)
        accept = {GREEDY: (logits.argmax(-1) == p.argmax(-1)).float(),
                  SAMPLED: torch.minimum(p, torch.softmax(logits, dim=-1)).sum(-1)}  # fmt: skip
        raw = torch.sigmoid(model.confidence_logits(hidden, base).float()).cumprod(dim=-2)  # [b, N, W, 2]
        for i, r in enumerate(rows.tolist()):
            regime = int(data["regime"][r])
            out[regime][0].append(raw[i, :, :, regime])
            out[regime][1].append(accept[regime][i].cumprod(dim=-1))
    return {k: {"survival": torch.cat(s), "observed": torch.cat(o)} for k, (s, o) in out.items() if s}


def fit_platt(survival: torch.Tensor, observed: torch.Tensor) -> tuple[float, float]:
    """(scale, shift) minimising the cross entropy of calibrate(survival, scale, shift) against observed."""
    params = torch.tensor([1.0, 0.0], requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy(calibrate(survival, params[0], params[1]).clamp(1e-6, 1 - 1e-6), observed)
        loss.backward()
        return loss

    optimizer.step(closure)
    return tuple(round(v, 4) for v in params.tolist())


def calibrate_block(model: BlockDraftModel, heldout: dict, block: BlockPreset) -> dict:
    """Fit the confidence head's Platt scales on half of the held-out continuations (the even
    ones), write them into model.calibration, and measure on the other half: per regime, ECE of the
    survival estimates before and after, mean acceptance per block position and the expected
    accepted length (1 + the summed survival) with all W drafts verified."""
    n = len(heldout["tokens"])
    # even and odd sequences: both halves hold both regimes
    split = [{k: v[idx] for k, v in heldout.items()} for idx in (torch.arange(0, n, 2), torch.arange(1, n, 2))]
    fit, test = (block_outcomes(model, part, block) for part in split)
    report = {}
    for regime, name in ((GREEDY, "greedy"), (SAMPLED, "sampled")):
        if regime not in fit or regime not in test:
            continue
        scale, shift = fit_platt(fit[regime]["survival"].flatten(), fit[regime]["observed"].flatten())
        model.calibration[regime] = torch.tensor([scale, shift])
        raw, observed = test[regime]["survival"], test[regime]["observed"]
        calibrated = calibrate(raw, scale, shift)
        conditional = observed[:, 1:] / observed[:, :-1].clamp_min(1e-9)
        report[name] = {
            "platt": [scale, shift],
            "ece_raw": round(expected_calibration_error(raw, observed), 4),
            "ece": round(expected_calibration_error(calibrated, observed), 4),
            "survival_by_position": [round(v, 4) for v in observed.mean(0).tolist()],
            "first_acceptance": round(observed[:, 0].mean().item(), 4),
            "later_acceptance": round((conditional * observed[:, :-1]).sum().item()
                                      / observed[:, :-1].sum().clamp_min(1e-9).item(), 4),  # fmt: skip
            "expected_accepted_length": round(1 + observed.sum(-1).mean().item(), 3),
            "blocks": observed.shape[0],
        }
    return report


def block_data(target: MLAForCausalLM, stream: torch.Tensor, count: int, block: BlockPreset, seed: int,
               desc: str) -> dict:  # fmt: skip
    """`count` greedy and `count` sampled (temperature 1) continuations of windows of `stream`,
    with their `target_view` and regimes."""
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=2 * count * block.new_tokens, desc=desc, unit="tok", dynamic_ncols=True, file=sys.stderr)
    sequences = torch.cat([continuations(target, stream, count, block, t, generator, bar) for t in (0.0, 1.0)])
    bar.close()
    data = target_view(target, sequences, block)
    data["regime"] = torch.tensor([GREEDY] * count + [SAMPLED] * count)
    return data


def save(model: torch.nn.Module, path: Path) -> int:
    """State dict as SAVE_DTYPE safetensors; returns the file size in bytes."""
    from safetensors.torch import save_file

    state = {name: t.detach().to(SAVE_DTYPE).contiguous() for name, t in model.state_dict().items()}
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise RuntimeError(f"tensors {bad} do not fit {SAVE_DTYPE}; not saving")
    save_file(state, str(path))
    return path.stat().st_size


def sample_text(model: MLAForCausalLM, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of a prompt through the latent cache (the inference path)."""
    out = model.generate_greedy([shipped.encode(prompt)], max_new_tokens)
    return prompt + shipped.decode(out[0])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="wall-clock budget of the models stage (default 20); the draft gets a fixed share")
    parser.add_argument("--block-minutes", type=float, default=25.0,
                        help="wall-clock budget of the block drafter stage (default 25), its data generation included")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="models: the target (with its MTP module) and the draft model; block: the block drafter "
                             "for the target already in --out (default: both)")
    parser.add_argument("--steps", type=int, default=None, help="at most this many optimizer steps per model")
    parser.add_argument("--out", type=Path, default=shipped.WEIGHTS_DIR, help="output folder (default bench/weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model sizes (tiny: for tests)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="train the models stage eagerly instead of through torch.compile (about 3x faster on CPU); "
                             "the block drafter always trains eagerly")
    args = parser.parse_args(argv)
    for name in ("minutes", "block_minutes"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_models(args, preset: Preset, corpus: dict) -> tuple[MLAForCausalLM, dict, dict]:
    """The models stage: train the target (with its MTP module) and the draft, evaluate and save
    them; returns (target, config, metadata) of the weights folder."""
    start = time.time()
    deadline = start + 60 * args.minutes
    held_out = eval_windows(corpus["heldout"], preset.eval_windows, preset.seq_len + 2)
    # Seconds kept back at the end of each phase for the held-out evaluation and saving.
    reserve = 5.0 + 5e-4 * held_out.numel()

    torch.manual_seed(args.seed)
    target = attach_mtp(MLAForCausalLM(preset.target), MultiTokenPredictor(preset.target))
    init_weights(target)
    torch.manual_seed(args.seed + 1)
    draft = MLAForCausalLM(preset.draft)
    init_weights(draft)

    target_deadline = deadline - preset.draft_share * 60 * args.minutes - reserve
    target_run = train_model(target, corpus, preset, preset.target_lr, target_deadline, args.steps, args.seed,
                             args.compile, "target")
    round_trip(target)
    target_eval = evaluate(target, held_out, preset.batch_size)
    print(f"target: held-out {target_eval['bpb']:.3f} bits/byte, MTP accuracy {target_eval['mtp_accuracy']:.3f}",
          file=sys.stderr)

    draft_run = train_model(draft, corpus, preset, preset.draft_lr, deadline - reserve, args.steps, args.seed + 1,
                            args.compile, "draft")
    round_trip(draft)
    draft_eval = evaluate(draft, held_out, preset.batch_size, reference=target)
    print(f"draft: held-out {draft_eval['bpb']:.3f} bits/byte", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {name: save(model, args.out / shipped.WEIGHT_FILES[name]) for name, model in
             (("target", target), ("draft", draft))}
    config = {"format": shipped.FORMAT, "dtype": str(SAVE_DTYPE).removeprefix("torch."), "mtp_depth": 1,
              "target": shipped.config_to_dict(preset.target), "draft": shipped.config_to_dict(preset.draft)}
    metadata = {
        "preset": args.preset,
        "seed": args.seed,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": args.threads,
        "minutes_budget": args.minutes,
        "max_steps": args.steps,
        "wall_seconds": round(time.time() - start, 1),
        "data": {"source": "Python standard library *.py", "train_files": corpus["train_files"],
                 "heldout_files": corpus["heldout_files"], "train_bytes": corpus["train"].numel(),
                 "heldout_bytes": corpus["heldout"].numel(), "eval_bytes": preset.eval_windows * preset.seq_len},
        "training": {"seq_len": preset.seq_len, "batch_size": preset.batch_size, "optimizer": "AdamW",
                     "schedule": "linear warmup + cosine", "mtp_weight": MTP_WEIGHT},
        "target": {"parameters": params(target), "parameters_without_mtp": params(target) - params(target.mtp),
                   "lr": preset.target_lr, **target_run, **target_eval, "file_bytes": sizes["target"]},
        "draft": {"parameters": params(draft), "lr": preset.draft_lr, **draft_run, **draft_eval,
                  "file_bytes": sizes["draft"]},
    }
    prompt = "import os\n\n\ndef "
    metadata["sample"] = sample_text(target, prompt, 160 if args.preset == "small" else 8)
    print(f"models: target {target_eval['bpb']:.3f} bits/byte ({metadata['target']['parameters'] / 1e6:.2f} M "
          f"parameters), draft {draft_eval['bpb']:.3f} bits/byte ({metadata['draft']['parameters'] / 1e6:.2f} M)"
          f"\n--- sample ---\n{metadata['sample']}", file=sys.stderr)
    return target, config, metadata


def train_block_stage(args, preset: Preset, corpus: dict, target: MLAForCausalLM) -> tuple[dict, dict]:
    """The block drafter stage, the target frozen: generate its continuations, train the drafter
    on them, calibrate its confidence head on held-out continuations, save it; returns the
    drafter's (config, metadata) entries."""
    start = time.time()
    block = preset.block
    target.requires_grad_(False)
    train_data = block_data(target, corpus["train"], block.sequences, block, args.seed + 2, "block data")
    heldout = block_data(target, corpus["heldout"], block.heldout_sequences, block, args.seed + 3, "block held-out")
    generated = time.time() - start
    config = BlockDrafterConfig(block.layers, block.target_layers, block.block_size, block.markov_rank)
    torch.manual_seed(args.seed + 4)
    model = BlockDraftModel(config).attach(target)  # PyTorch's default initialisation
    # kept back for calibration and saving: a forward over every held-out block, about 1 ms each
    reserve = 5.0 + 2e-3 * len(heldout["tokens"]) * (block.new_tokens - block.block_size + 1)
    run = train_block(model, train_data, block, start + 60 * args.block_minutes - reserve, args.steps, args.seed + 4)
    round_trip(model)
    calibration = calibrate_block(model, heldout, block)
    size = save(model, args.out / shipped.WEIGHT_FILES["block_drafter"])
    metadata = {
        "parameters": params(model), "lr": block.lr, "minutes_budget": args.block_minutes,
        "data": {"prompt_bytes": block.prompt_len, "new_tokens": block.new_tokens,
                 "sequences": {"greedy": block.sequences, "sampled": block.sequences},
                 "heldout_sequences": {"greedy": block.heldout_sequences, "sampled": block.heldout_sequences},
                 "generation_seconds": round(generated, 1)},
        "training": {"batch_size": block.batch_size, "anchors": block.anchors, "position_decay": block.position_decay,
                     **run},
        "heldout": calibration, "file_bytes": size, "wall_seconds": round(time.time() - start, 1),
    }  # fmt: skip
    greedy, sampled = calibration.get("greedy", {}), calibration.get("sampled", {})
    print(f"block drafter: held-out expected accepted length {greedy.get('expected_accepted_length')} (greedy), "
          f"{sampled.get('expected_accepted_length')} (sampled), survival ECE {greedy.get('ece')} / "
          f"{sampled.get('ece')}, {metadata['wall_seconds']:.0f} s", file=sys.stderr)
    return config.to_dict(), metadata


def main(argv=None) -> dict:
    """Train, evaluate and save the stages asked for; returns the metadata written to metadata.json."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    corpus = load_corpus()
    print(f"corpus: {corpus['train_files']} training files ({corpus['train'].numel() / 1e6:.1f} MB), "
          f"{corpus['heldout_files']} held out ({corpus['heldout'].numel() / 1e6:.2f} MB)", file=sys.stderr)
    if "models" in args.stages:
        target, config, metadata = train_models(args, preset, corpus)
    else:
        target = shipped.load_target(directory=args.out)
        config, metadata = json.loads((args.out / shipped.CONFIG_FILE).read_text()), shipped.load_metadata(args.out)
    if "block" in args.stages:
        config["block_drafter"], metadata["block_drafter"] = train_block_stage(args, preset, corpus, target)
    (args.out / shipped.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (args.out / shipped.METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return metadata


if __name__ == "__main__":
    main()
