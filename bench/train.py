"""Train the shipped small model: a byte-level MLA LM with one MTP module, and a draft model.

    python -m bench.train [--minutes 20] [--steps N] [--out bench/weights] [--seed 0]

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
from mla.speculative.mtp import MultiTokenPredictor, attach_mtp

from . import model as shipped

MTP_WEIGHT = 0.3  # DeepSeek-V3 weights its MTP loss 0.3 early in training
SAVE_DTYPE = torch.float16  # 10 mantissa bits, and no weight here comes near float16's range limit


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
    ),
    # For tests: trains in a fraction of a second per step.
    "tiny": Preset(
        target=_config(32, 1, 2, 16, 8, 8, 8, 64, 64),
        draft=_config(16, 1, 2, 8, 8, 8, 8, 32, 64),
        seq_len=32, batch_size=2, target_lr=1e-3, draft_lr=1e-3, draft_share=0.3, eval_windows=2, warmup_steps=1,
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
        progress = (time.time() - clock) / max(deadline - clock, 1e-9) if step > 0 else 0.0
        if max_steps is not None:
            progress = max(progress, step / max_steps)
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
                        help="wall-clock budget for everything (default 20); the draft gets a fixed share")
    parser.add_argument("--steps", type=int, default=None, help="at most this many optimizer steps per model")
    parser.add_argument("--out", type=Path, default=shipped.WEIGHTS_DIR, help="output folder (default bench/weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model sizes (tiny: for tests)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="train eagerly instead of through torch.compile (which is about 3x faster on CPU)")
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv=None) -> dict:
    """Train, evaluate and save; returns the metadata written to metadata.json."""
    args = parse_args(argv)
    start = time.time()
    deadline = start + 60 * args.minutes
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    corpus = load_corpus()
    print(f"corpus: {corpus['train_files']} training files ({corpus['train'].numel() / 1e6:.1f} MB), "
          f"{corpus['heldout_files']} held out ({corpus['heldout'].numel() / 1e6:.2f} MB)", file=sys.stderr)
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
    (args.out / shipped.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    def params(model):
        return sum(p.numel() for p in model.parameters())

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
    (args.out / shipped.METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {args.out} in {metadata['wall_seconds']:.0f} s: target {target_eval['bpb']:.3f} bits/byte "
          f"({metadata['target']['parameters'] / 1e6:.2f} M parameters), draft {draft_eval['bpb']:.3f} bits/byte "
          f"({metadata['draft']['parameters'] / 1e6:.2f} M)\n--- sample ---\n{metadata['sample']}", file=sys.stderr)
    return metadata


if __name__ == "__main__":
    main()
