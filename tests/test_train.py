"""The cache-free training forward, the training entry point (`python -m bench.train`) and the shipped model."""

import math

import pytest
import torch

from bench import model as shipped
from bench import train
from mla import MLAConfig, MLAForCausalLM, MLAttention
from mla.speculative import BlockDrafter, generate
from mla.speculative.mtp import MultiTokenPredictor, attach_mtp
from tests.utils import assert_close, max_error

VOCAB = 61
BASE = dict(
    hidden_size=48, num_heads=3, q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=12, vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=72, max_position_embeddings=128,
    rms_norm_eps=1e-5,
)  # fmt: skip
VARIANTS = {
    "q-lora": {},
    "no-q-lora-halves": {"q_lora_rank": None, "rope_interleave": False},
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                              "mscale": 0.8, "mscale_all_dim": 1.1}},
}  # fmt: skip


def random_model(variant: str, seed: int = 0, mtp: bool = False) -> MLAForCausalLM:
    """A float32 model with large random weights (norms perturbed away from 1), so that every
    part of the forward moves the logits."""
    config = MLAConfig(**{**BASE, **VARIANTS[variant]})
    torch.manual_seed(seed)
    model = MLAForCausalLM(config, backend="reference")
    if mtp:
        attach_mtp(model, MultiTokenPredictor(config, backend="reference"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.3 * noise if "norm" in name else 2 * noise / math.sqrt(p.shape[-1]))
    return model.eval()


def cached_logits(model: MLAForCausalLM, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits [b, T, vocab] of `tokens` fed through a latent cache in chunks of the given sizes
    (> DECODE_MAX_TOKENS: the decompressed prefill path; 1: the absorbed decode path)."""
    cache = model.new_cache(num_pages=2 * tokens.shape[0] * (tokens.shape[1] // 4 + 1), page_size=4)
    ids = [cache.add_sequence() for _ in range(tokens.shape[0])]
    out, done = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(tokens[:, done : done + n], cache, ids))
            done += n
    assert done == tokens.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("chunks", [[21], [12, 1, 1, 1, 1, 1, 1, 1, 1, 1]], ids=["prefill", "prefill-then-decode"])
def test_cache_free_forward_equals_cached_logits(variant, chunks):
    model = random_model(variant)
    tokens = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        free = model(tokens)
        exact = random_model(variant).double()(tokens)  # the same weights in float64
    cached = cached_logits(model, tokens, chunks)
    # Both paths are float32 with different summation orders (and, for decode, the absorbed
    # form); the cache-free path may be off the float64 logits by at most 2x the cached path.
    assert_close("cache-free vs cached", free, cached, atol=2 * max_error(cached, exact) + 1e-6)
    assert max_error(free, exact) <= 2 * max_error(cached, exact) + 1e-6


def test_cache_free_forward_is_causal_and_differentiable():
    model = random_model("q-lora")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    logits = model(tokens)
    assert torch.equal(logits[:, :10], model(changed)[:, :10].detach())
    assert max_error(logits[:, 10:], model(changed)[:, 10:]) > 1e-3
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient reaches {name}"


def test_attention_cache_free_positions_default_to_arange():
    model = random_model("yarn")
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 9, BASE["hidden_size"])
    with torch.no_grad():
        assert torch.equal(attn(x), attn(x, torch.arange(9).expand(2, 9)))
        shifted, plain = attn(x, torch.arange(5, 14).expand(2, 9)), attn(x)
    # RoPE is relative: shifting all positions changes only the float32 rounding of the angles
    # (measured 5e-7 of the largest output); YaRN's factors do not depend on position.
    assert_close("shifted positions", shifted, plain, atol=4e-6 * plain.abs().max().item())


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda attn, x: attn(x, seq_ids=[0, 1]), "seq_ids", id="seq-ids-without-cache"),
        pytest.param(lambda attn, x: attn(x, torch.arange(4)), "positions must have shape", id="positions-shape"),
        pytest.param(lambda attn, x: attn(x[0]), r"\[b, s, hidden_size\]", id="hidden-rank"),
    ],
)
def test_attention_cache_free_rejects_bad_arguments(call, match):
    attn = MLAttention(MLAConfig(**BASE))
    with pytest.raises(ValueError, match=match):
        call(attn, torch.randn(2, 5, BASE["hidden_size"]))


def test_model_cache_free_rejects_seq_ids():
    with pytest.raises(ValueError, match="seq_ids"):
        random_model("q-lora")(torch.zeros(1, 3, dtype=torch.long), seq_ids=[0])


def test_training_mtp_forward_equals_the_module_through_its_cache():
    model = random_model("q-lora", seed=3, mtp=True)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 13, BASE["hidden_size"], generator=g)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=g)
    with torch.no_grad():
        free = train.mtp_logits(model, hidden, tokens)
        cache = model.mtp.new_cache(num_pages=8, page_size=4)
        cached, _ = model.mtp(hidden, tokens, cache, [cache.add_sequence() for _ in range(2)])
        exact = train.mtp_logits(random_model("q-lora", seed=3, mtp=True).double(), hidden.double(), tokens)
    assert_close("MTP cache-free vs cached", free, cached, atol=2 * max_error(cached, exact) + 1e-6)


def test_heldout_split_is_stable_and_disjoint():
    train_files, heldout = shipped.stdlib_sources()
    assert heldout and not set(train_files) & set(heldout)
    assert 0.005 < len(heldout) / (len(train_files) + len(heldout)) < 0.05
    assert all(shipped.is_heldout(p) for p in heldout) and not any(shipped.is_heldout(p) for p in train_files)
    assert shipped.HELDOUT_FILES == tuple(heldout)


def test_missing_weights_tell_how_to_train(tmp_path):
    for load in (shipped.load_target, shipped.load_draft, shipped.load_block_drafter):
        with pytest.raises(FileNotFoundError, match="python -m bench.train"):
            load(directory=tmp_path)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--minutes", "-1"], ["--preset", "huge"]], ids=str)
def test_train_rejects_bad_options(argv):
    with pytest.raises(SystemExit):
        train.parse_args(argv)


def test_train_entry_point_smoke(tmp_path):
    metadata = train.main(["--preset", "tiny", "--steps", "2", "--out", str(tmp_path), "--no-compile", "--seed", "5"])
    preset = train.PRESETS["tiny"]
    for name in ("target", "draft"):
        assert metadata[name]["steps"] == 2
        assert metadata[name]["tokens_seen"] == 2 * preset.batch_size * preset.seq_len
        assert (tmp_path / shipped.WEIGHT_FILES[name]).stat().st_size == metadata[name]["file_bytes"]
    assert shipped.load_metadata(tmp_path) == metadata

    target = shipped.load_target(directory=tmp_path)
    draft = shipped.load_draft(directory=tmp_path)
    assert isinstance(target.mtp, MultiTokenPredictor)
    assert target.mtp._shared == (target.model.embed_tokens, target.lm_head)
    assert target.config == preset.target and draft.config == preset.draft
    assert target.lm_head.weight.dtype == torch.float32 and not target.training
    # metadata reports the saved (float16) weights: evaluating what loads gives the same figures
    windows = train.eval_windows(train.load_corpus()["heldout"], preset.eval_windows, preset.seq_len + 2)
    figures = train.evaluate(target, windows, preset.batch_size)
    for key in ("bpb", "mtp_bpb", "mtp_accuracy"):
        assert figures[key] == pytest.approx(metadata["target"][key], abs=1e-3), key
    assert train.evaluate(draft, windows, preset.batch_size)["bpb"] == pytest.approx(metadata["draft"]["bpb"], abs=1e-3)

    block = metadata["block_drafter"]
    assert block["training"]["steps"] == 2
    assert (tmp_path / shipped.WEIGHT_FILES["block_drafter"]).stat().st_size == block["file_bytes"]
    drafter = shipped.load_block_drafter(target, directory=tmp_path)
    assert drafter.config.layers == preset.block.layers and drafter.config.block_size == preset.block.block_size
    assert drafter._shared == (target.model.embed_tokens, target.lm_head)
    # the Platt scales fitted on held-out continuations are saved with the weights (in float16)
    for regime, name in enumerate(("greedy", "sampled")):
        assert drafter.calibration[regime].tolist() == pytest.approx(block["heldout"][name]["platt"], rel=1e-3)
        assert 0.0 <= block["heldout"][name]["ece"] <= 1.0


shipped_weights = pytest.mark.skipif(
    not (shipped.WEIGHTS_DIR / shipped.METADATA_FILE).is_file(), reason="no shipped weights: run python -m bench.train"
)


@shipped_weights
def test_shipped_model_is_trained_and_small():
    metadata = shipped.load_metadata()
    # 8 bits/byte is a uniform guess and about 5 a byte-frequency model of Python source.
    assert metadata["target"]["bpb"] < 3.0
    assert metadata["draft"]["bpb"] < 3.5
    assert metadata["target"]["bpb"] < metadata["draft"]["bpb"]
    assert metadata["target"]["mtp_accuracy"] > 0.3
    sizes = [(shipped.WEIGHTS_DIR / f).stat().st_size for f in shipped.WEIGHT_FILES.values()]
    assert sum(sizes) <= 20 * 2**20


@shipped_weights
def test_shipped_model_generates_python():
    target = shipped.load_target(backend="reference")  # the interpreter's kernels: half a minute
    assert isinstance(target.mtp, MultiTokenPredictor)
    prompt = "import sys\n\n\ndef main(argv):\n    "
    out = target.generate_greedy([shipped.encode(prompt)], 48)
    text = shipped.decode(out[0])
    assert out.shape == (1, 48)
    # a trained byte model writes printable ASCII (and newlines) after Python source
    assert sum(c.isprintable() or c == "\n" for c in text) >= 0.9 * len(text), repr(text)
    assert shipped.load_draft(backend="reference").generate_greedy([shipped.encode(prompt)], 8).shape == (1, 8)


@shipped_weights
def test_shipped_block_drafter_drafts_the_target_greedy_continuation():
    calibration = shipped.load_metadata()["block_drafter"]["heldout"]
    # measured at training: 0.032 (greedy) and 0.012 (sampled) after Platt scaling
    assert calibration["greedy"]["ece"] < 0.1 and calibration["sampled"]["ece"] < 0.1
    # the reference backend: the Triton interpreter these tests run under would take a minute
    target = shipped.load_target(backend="reference")
    block = shipped.load_block_drafter(target, backend="reference")
    prompt = shipped.encode("import sys\n\n\ndef main(argv):\n    ")
    out = generate(target, [prompt], BlockDrafter(block, adaptive=True), max_new_tokens=24, num_draft_tokens=8)
    assert out.sequences[0, len(prompt) :].tolist() == target.generate_greedy([prompt], 24)[0].tolist()
    assert out.stats.mean_accepted_length > 2
