"""The shipped small model: a byte-level MLA language model with one MTP module, its draft model
and its block drafter.

`python -m bench.train` trains them on the Python standard library's source and writes them
to `bench/weights/`:

    config.json          {"format", "dtype", "mtp_depth", "target": MLAConfig fields, "draft": MLAConfig fields,
                          "block_drafter": BlockDrafterConfig fields}
    target.safetensors   the target's state dict (the MTP module under "mtp."), float16
    draft.safetensors    the draft's state dict, float16
    block_drafter.safetensors  the block drafter's state dict (without the target's embedding and head), float16
    metadata.json        how they were trained and how well they do (held-out bits per byte, ...)

    from bench.model import load_target, load_draft, load_block_drafter, encode, decode
    target = load_target()                       # MLAForCausalLM, float32, eval mode, target.mtp attached
    out = target.generate_greedy([encode("def ")], 64)
    print(decode(out[0]))
    block = load_block_drafter(target)           # BlockDraftModel attached to target: BlockDrafter(block)

Tokens are bytes (vocabulary 256): `encode` is UTF-8, `decode` replaces invalid sequences.
"""

from __future__ import annotations

import dataclasses
import json
import sysconfig
import zlib
from pathlib import Path

import torch

from mla import MLAConfig, MLAForCausalLM
from mla.speculative.block import BlockDrafterConfig, BlockDraftModel
from mla.speculative.mtp import MultiTokenPredictor, attach_mtp

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CONFIG_FILE, METADATA_FILE = "config.json", "metadata.json"
WEIGHT_FILES = {"target": "target.safetensors", "draft": "draft.safetensors",
                "block_drafter": "block_drafter.safetensors"}
FORMAT = 1
# Files whose relative path hashes into the lowest HELDOUT_PERCENT of 100 buckets are never
# trained on: a name-based split, so a file held out here is held out on every machine.
HELDOUT_PERCENT = 2


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of text as int64 token ids [len]."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens) -> str:
    """Token ids (a 1-D tensor or sequence of ints in [0, 256)) -> text, invalid UTF-8 replaced."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return bytes(values).decode("utf-8", errors="replace")


def is_heldout(relative_path: str) -> bool:
    """Whether a standard-library file (path relative to the stdlib root, '/'-separated) is held out."""
    return zlib.crc32(relative_path.encode("utf-8")) % 100 < HELDOUT_PERCENT


def stdlib_sources(root: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(train, held-out) relative paths of the *.py files under the standard library, sorted.

    site-packages is left out (it holds whatever is installed, not the standard library).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file())
    paths = [p for p in paths if "site-packages" not in p.split("/")]
    return [p for p in paths if not is_heldout(p)], [p for p in paths if is_heldout(p)]


def __getattr__(name: str):
    # HELDOUT_FILES (the held-out stdlib files, relative paths: prompts the model never saw)
    # is computed on first use so that importing this module does not walk the stdlib.
    if name == "HELDOUT_FILES":
        return tuple(stdlib_sources()[1])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_to_dict(config: MLAConfig) -> dict:
    return dataclasses.asdict(config)


def load_config(directory: str | Path = WEIGHTS_DIR) -> dict:
    """config.json of a weights folder: {"format", "dtype", "mtp_depth", "target": MLAConfig, "draft": MLAConfig,
    and "block_drafter": BlockDrafterConfig once the block stage has run}."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the shipped model with `python -m bench.train`")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} has format {raw.get('format')!r}, this code reads format {FORMAT}")
    config = {**raw, "target": MLAConfig(**raw["target"]), "draft": MLAConfig(**raw["draft"])}
    if "block_drafter" in raw:
        config["block_drafter"] = BlockDrafterConfig.from_dict(raw["block_drafter"])
    return config


def load_metadata(directory: str | Path = WEIGHTS_DIR) -> dict:
    """metadata.json of a weights folder (training run, held-out bits per byte, ...)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the shipped model with `python -m bench.train`")
    return json.loads(path.read_text())


def load_target(device="cpu", backend: str | None = None, directory: str | Path = WEIGHTS_DIR) -> MLAForCausalLM:
    """The shipped target: `MLAForCausalLM` (float32, eval mode, on `device`) with its MTP module
    attached as `model.mtp` (`mla.speculative.attach_mtp`). backend: as `mla.MLAttention`'s."""
    config = load_config(directory)
    model = attach_mtp(MLAForCausalLM(config["target"], backend), MultiTokenPredictor(config["target"], backend))
    return _load_weights(model, Path(directory) / WEIGHT_FILES["target"], device)


def load_draft(device="cpu", backend: str | None = None, directory: str | Path = WEIGHTS_DIR) -> MLAForCausalLM:
    """The shipped draft model: a smaller `MLAForCausalLM` on the same bytes (float32, eval mode)."""
    config = load_config(directory)
    return _load_weights(MLAForCausalLM(config["draft"], backend), Path(directory) / WEIGHT_FILES["draft"], device)


def load_block_drafter(target: MLAForCausalLM | None = None, device="cpu", backend: str | None = None,
                       directory: str | Path = WEIGHTS_DIR) -> BlockDraftModel:  # fmt: skip
    """The shipped block drafter (`mla.speculative.BlockDraftModel`, float32, eval mode) attached to
    `target` (default: `load_target(device, backend, directory)`), whose embedding and LM head it
    shares; draft with `mla.speculative.BlockDrafter(model)`."""
    config = load_config(directory)
    if "block_drafter" not in config:
        raise FileNotFoundError(
            f"{Path(directory) / CONFIG_FILE} has no block drafter: train it with `python -m bench.train --stages block`"
        )
    target = target if target is not None else load_target(device, backend, directory)
    model = BlockDraftModel(config["block_drafter"], backend)
    return _load_weights(model, Path(directory) / WEIGHT_FILES["block_drafter"], device).attach(target)


def _load_weights(model: torch.nn.Module, path: Path, device) -> torch.nn.Module:
    from safetensors.torch import load_file  # lazy: only loading needs safetensors

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the shipped model with `python -m bench.train`")
    state = {name: tensor.float() for name, tensor in load_file(str(path)).items()}
    model.load_state_dict(state)  # strict: a missing or extra tensor is an error
    return model.to(device).eval()
