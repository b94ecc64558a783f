"""MXFP4 compressed entries (SGLang's proposal, `mla.formats.Mxfp4EntryFormat`, 368 B per
entry instead of MODEL1's 584 B): what they would save on DeepSeek-V4 at 1M tokens, and whether
tiny random DeepSeek-V4 models keep their greedy outputs with them.

No kernel reads MXFP4 entries, so this is a simulation: `RoundedV4Cache` is a float32
`mla.v4_cache.V4Cache` whose `write` rounds each row through a format's pack / unpack, so
attention reads exactly the values that format would give back (raw compressor rows kept in
bfloat16, as an FP8 cache keeps them). Six caches per prompt, on the reference backend:

    fp32            float32 rows (the reference),
    fp8             the real dtype="fp8" V4Cache: MODEL1 window rows and entries, MXFP4 indexer
                    keys, bfloat16 raw compressor rows,
    fp8-rounded     RoundedV4Cache holding the same values as fp8 in a float32 cache,
    mxfp4           as fp8-rounded but MXFP4 entries (CSA and HCA); window rows stay MODEL1,
    entries-model1  only the entries rounded (MODEL1), the rest float32: the entry format alone,
    entries-mxfp4   only the entries rounded (MXFP4), the rest float32.

fp8-rounded must give fp8's tokens on every prompt (the report shows both rows; the test checks
its logits equal): the simulation then differs from a real cache only in the entry format it
rounds through. The entries-* pair isolates what the issue asks about, the entry format, from
the window rows' and indexer keys' rounding that fp8 and mxfp4 share.

The models are transformers' DeepseekV4ForCausalLM with DeepSeek's row shape (head_dim 512,
rope_dim 64) and tiny otherwise (hidden 64, 2 heads, 4 layers mixing sliding, CSA with m = 4
and HCA with m' = 8 or 16, windows of 8 or 16, vocabulary 97, MoE of 4 experts): windows close
many entries over a prompt of 20-40 tokens, and index_topk 4 makes the CSA indexer choose.
Random weights give near-tie logits, so "kept" is a strict test: a flip shows where a format's
rounding moves a top-1 choice, not a quality loss one could see on a trained model.

Bytes, over DeepSeek-V3.2's FP8 cache (61 layers x 788 B per token) at 1M tokens: FP8 is
section 1's figure (`mla.v4_cache.sequence_bytes_per_token`: one sequence of a compact FP8
V4Cache); MXFP4 entries are the same cache with each entry's share of a 64-row MODEL1 page (585
B) replaced by Mxfp4EntryFormat's 368 B row, window rows left in MODEL1 as simulated here.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from mla.formats import Model1Format, Mxfp4EntryFormat, Mxfp4KeyFormat
from mla.v4 import CSA, HCA, SLIDING, V4Config
from mla.v4_cache import V4Cache, sequence_bytes_per_token

from .common import format_table

VOCAB = 97
V32_FP8_BYTES_PER_TOKEN = 61 * 788
"""DeepSeek-V3.2's FP8 cache per token, all layers (656 B latent row + 132 B indexer key)."""
MILLION = 1 << 20
ROUNDED = {
    "fp8-rounded": dict(kv=Model1Format, entries=Model1Format, index_keys=True, raw_dtype=torch.bfloat16),
    "mxfp4": dict(kv=Model1Format, entries=Mxfp4EntryFormat, index_keys=True, raw_dtype=torch.bfloat16),
    "entries-model1": dict(kv=None, entries=Model1Format, index_keys=False, raw_dtype=torch.float32),
    "entries-mxfp4": dict(kv=None, entries=Mxfp4EntryFormat, index_keys=False, raw_dtype=torch.float32),
}
"""The simulated caches: `RoundedV4Cache` arguments (formats as classes; None: float32)."""
CACHES = ("fp32", "fp8", *ROUNDED)
# The tiny models, one per seed in turn: layer schedule, HCA rate, sliding window.
MODELS = (
    ((SLIDING, CSA, HCA, CSA), 8, 8),
    ((CSA, HCA, SLIDING, CSA), 16, 16),
    ((HCA, CSA, HCA, CSA), 8, 16),
    ((SLIDING, HCA, CSA, HCA), 16, 8),
)


class RoundedV4Cache(V4Cache):
    """A float32 V4Cache holding exactly what a cache of these row formats gives back.

    Args (after V4Cache's config, num_pages, page_size; its other keywords pass through):
        kv: format of the window rows, a row format with pack / unpack of [n, 512] rows
            (`Model1Format()`, `Mxfp4EntryFormat()`), or None: stored as computed (float32).
        entries: the same for the compressed entries (CSA and HCA).
        index_keys: round the CSA indexer keys through `Mxfp4KeyFormat` (as an FP8 cache stores them).
        raw_dtype: dtype of the raw compressor rows (an FP8 cache keeps them in bfloat16).
    """

    def __init__(self, *args, kv=None, entries=None, index_keys: bool = False, raw_dtype=torch.float32, **kwargs):
        super().__init__(*args, dtype=torch.float32, **kwargs)
        self.row_formats = {"kv": kv, "entries": entries}
        self.key_format = Mxfp4KeyFormat(self.config.index_head_dim) if index_keys else None
        raw = ("raw", "index_raw")
        self.layers = tuple(
            dataclasses.replace(store, **{n: t.to(raw_dtype) for n in raw if (t := getattr(store, n)) is not None})
            for store in self.layers
        )

    def write(self, layer, name, slots, rows):
        fmt = self.row_formats.get(name)
        if fmt is not None:
            rows = _round_trip(fmt, rows.detach().reshape(-1, self.config.head_dim).float())
        elif name == "index_keys" and self.key_format is not None:
            rows = self.key_format.unpack(self.key_format.pack(rows.detach().reshape(-1, self.config.index_head_dim)))
        super().write(layer, name, slots, rows)


def _round_trip(fmt, rows: torch.Tensor) -> torch.Tensor:
    """rows [n, 512] as `fmt`'s rows give them back (MODEL1's pack returns (data, scales))."""
    packed = fmt.pack(rows)
    return fmt.unpack(*packed) if isinstance(packed, tuple) else fmt.unpack(packed)


def tiny_v4_config(seed: int) -> V4Config:
    """The attention of model MODELS[seed % len(MODELS)]: DeepSeek's head_dim 512 / rope 64,
    tiny otherwise."""
    layer_types, hca_rate, window = MODELS[seed % len(MODELS)]
    return V4Config(
        num_hidden_layers=4, layer_types=layer_types, compress_rates={CSA: 4, HCA: hca_rate}, head_dim=512,
        rope_dim=64, num_heads=2, sliding_window=window, index_n_heads=2, index_head_dim=64, index_topk=4,
        hidden_size=64, q_lora_rank=32, o_groups=2, o_lora_rank=16, compress_rope_theta=40000.0,
    )  # fmt: skip


def tiny_v4_model(seed: int):
    """A random transformers DeepseekV4ForCausalLM of `tiny_v4_config(seed)`, float32 eager,
    weights from `seed` (sinks and gate biases N(0, 0.5), which transformers initialises to 0)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf_config = DeepseekV4Config(
        **tiny_v4_config(seed).hf_kwargs(), vocab_size=VOCAB, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, hc_mult=2, mlp_layer_types=["moe"] * 4,
    )  # fmt: skip
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                p.normal_(0, 0.5)
    return model


def random_prompts(count: int, lengths: tuple[int, int], seed: int) -> list[torch.Tensor]:
    """`count` prompts of uniform random tokens, each of a length in [lengths[0], lengths[1]]."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (count,), generator=generator).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in sizes]


def generate(model, prompt: torch.Tensor, new_tokens: int, cache: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [new_tokens] and first-step logits [VOCAB] of one prompt on one of CACHES."""
    import mla.hf
    from mla.hf_v4 import V4HFCache

    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    mla.hf.patch(model, cache_dtype="fp8" if cache == "fp8" else None, backend="reference")
    try:
        hf_cache = V4HFCache.for_model(model, 1, len(prompt) + new_tokens)
        if cache in ROUNDED:  # the same pages and compactness, values rounded on write
            v4, spec = hf_cache.v4, ROUNDED[cache]
            formats = {name: spec[name] and spec[name]() for name in ("kv", "entries")}
            hf_cache.v4 = RoundedV4Cache(v4.config, v4.num_pages, v4.page_size, device=v4.device, max_rollback=0,
                                         **{**spec, **formats})  # fmt: skip
        # every token is real (token 0 too, which generate would otherwise take for padding)
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        out = model.generate(
            prompt[None], attention_mask=mask, cache=hf_cache, max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    finally:
        mla.hf.unpatch(model)
    return out.sequences[0, len(prompt) :], out.logits[0][0]


def leading_matches(tokens: torch.Tensor, reference: torch.Tensor) -> int:
    """How many leading tokens equal the reference's."""
    differ = (tokens != reference).nonzero()
    return int(differ[0]) if len(differ) else len(reference)


def bytes_rows(page_size: int = 64) -> list[dict]:
    """V4-Flash / V4-Pro bytes per token at 1M tokens with FP8 (MODEL1) and MXFP4 entries
    (module docstring)."""
    saved = Model1Format().page_bytes(page_size) / page_size - Mxfp4EntryFormat.bytes_per_token  # per entry
    rows = []
    for model, config in (("DeepSeek-V4-Flash", V4Config.deepseek_v4_flash()),
                          ("DeepSeek-V4-Pro", V4Config.deepseek_v4_pro())):  # fmt: skip
        fp8 = sequence_bytes_per_token(config, MILLION, "fp8", page_size)
        entries = sum(len(config.layers_of(kind)) * (MILLION // rate) for kind, rate in config.compress_rates.items())
        for name, per_token in (("fp8", fp8), ("mxfp4", fp8 - entries * saved / MILLION)):
            rows.append({"model": model, "entries": name, "bytes_per_token_at_1m": per_token,
                         "ratio_vs_v32_at_1m": per_token / V32_FP8_BYTES_PER_TOKEN})  # fmt: skip
    return rows


def mxfp4_report(prompts: int = 40, models: int = 4, new_tokens: int = 16, lengths=(20, 40), caches=CACHES,
                 reference: str = "fp32", progress=None) -> dict:  # fmt: skip
    """Greedy generation of `prompts` random prompts (split evenly over `models` tiny models,
    seeds 0 ... models - 1) on each of `caches`, compared with the `reference` cache's tokens.

    Returns {"rows": one per cache: cache, prompts, kept (prompts whose new_tokens greedy
    tokens all equal the reference's), mean_leading (mean matching leading tokens),
    first_logit_error (mean over prompts of the first step's max |logit - reference logit|);
    "reference_margin": mean over prompts of the reference's first-step top-1 minus top-2 logit
    (the scale a logit error must reach to flip a token); "bytes": `bytes_rows()`; "summary":
    the headline line; "settings"; "wall_s"}.
    """
    if prompts < 1 or models < 1 or new_tokens < 1:
        raise ValueError(f"prompts, models and new_tokens must be >= 1, got {prompts}, {models}, {new_tokens}")
    if reference not in caches:
        raise ValueError(f"reference {reference!r} must be one of caches {caches}")
    start = time.perf_counter()
    models = min(models, prompts)  # a model with no prompt is not one the report used
    per_model = [prompts // models + (i < prompts % models) for i in range(models)]
    found = {c: [] for c in caches}  # per cache: (leading matches, first-step logit error)
    work = [(seed, p) for seed in range(models) for p in random_prompts(per_model[seed], lengths, 1000 + seed)]
    margins = []
    model, model_seed = None, None
    for seed, prompt in progress(work) if progress else work:
        if seed != model_seed:
            model, model_seed = tiny_v4_model(seed), seed
        ref_tokens, ref_logits = generate(model, prompt, new_tokens, reference)
        top2 = ref_logits.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        for cache in caches:
            same = cache == reference
            tokens, logits = (ref_tokens, ref_logits) if same else generate(model, prompt, new_tokens, cache)
            found[cache].append((leading_matches(tokens, ref_tokens), float((logits - ref_logits).abs().max())))
    rows = [
        {"cache": cache, "prompts": len(results), "kept": sum(n == new_tokens for n, _ in results),
         "mean_leading": sum(n for n, _ in results) / len(results),
         "first_logit_error": sum(e for _, e in results) / len(results)}
        for cache, results in found.items()
    ]  # fmt: skip
    byte_rows = bytes_rows()
    return {"rows": rows, "reference_margin": sum(margins) / len(margins), "bytes": byte_rows,
            "summary": _summary(rows, byte_rows),
            "settings": {"prompts": prompts, "models": models, "new_tokens": new_tokens, "lengths": list(lengths),
                         "reference": reference},
            "wall_s": time.perf_counter() - start}  # fmt: skip


def _summary(rows: list[dict], byte_rows: list[dict]) -> str:
    kept = {r["cache"]: f"{r['kept']}/{r['prompts']}" for r in rows}
    ratio = {(r["model"], r["entries"]): r["ratio_vs_v32_at_1m"] for r in byte_rows}
    pro = ("DeepSeek-V4-Pro",)
    return (
        f"MXFP4 entries: {ratio[(*pro, 'mxfp4')]:.1%} of V3.2 at 1M tokens for V4-Pro (vs {ratio[(*pro, 'fp8')]:.1%} "
        f"FP8), greedy kept on {kept.get('mxfp4', '-')} prompts (FP8: {kept.get('fp8', '-')}); only the entries "
        f"rounded: kept on {kept.get('entries-mxfp4', '-')} (MXFP4), {kept.get('entries-model1', '-')} (MODEL1)"
    )


def format_mxfp4(result: dict) -> str:
    """The two tables and the summary line."""
    gen = format_table([("cache", "cache", ""), ("prompts", "prompts", "d"), ("greedy kept", "kept", "d"),
                        ("mean leading tokens", "mean_leading", ".2f"),
                        ("first-step max |d logit|", "first_logit_error", ".2e")], result["rows"])  # fmt: skip
    size = format_table([("model", "model", ""), ("entries", "entries", ""),
                         ("B/token at 1M", "bytes_per_token_at_1m", ",.0f"),
                         ("of V3.2 FP8 at 1M", "ratio_vs_v32_at_1m", ".1%")], result["bytes"])  # fmt: skip
    margin = f"(reference's first-step top-1 minus top-2 logit, mean: {result['reference_margin']:.2e})"
    return f"{gen}\n{margin}\n\n{size}\n{result['summary']}"
