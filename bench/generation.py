"""Section 3: greedy generation with a small transformers DeepseekV3ForCausalLM, as shipped and
with `mla.hf.patch` (its attention decoding through our paged latent cache, `mla.hf.MLACache`:
the Triton kernel on CUDA, the PyTorch reference on the CPU).

Per context length L: fill a DynamicCache with L cached tokens per layer, then decode N greedy
tokens unpatched, crop the cache back to L, patch, copy the same L tokens into an MLACache
(`MLACache.from_dynamic_cache`) and decode N tokens again from it. Only the decode loops are
timed; each starts with one untimed warm-up step.

The L cached tokens are random latents written straight into the cache (the same tensors a
prefill leaves there: [1, 1, L, kv_lora_rank] and [1, 1, L, qk_rope_head_dim] per layer),
not a real prefill: a decode step's cost does not depend on their values, and transformers'
prefill of 4k tokens (math SDPA: its value and key widths differ) takes most of a minute on
two cores, which is not what this section measures.
"""

from __future__ import annotations

import time

import torch

from mla import MLAConfig

from .common import format_table, synchronize
from .layer import hf_config

# A small dense DeepSeek-V3: DeepSeek's per-head dims (qk_nope 128, rope 64, v 128) and latent
# width (512) with 16 heads, 4 layers and hidden 512.
SMALL_DEEPSEEK = MLAConfig(
    hidden_size=512, num_heads=16, q_lora_rank=384, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, vocab_size=32000, num_hidden_layers=4, intermediate_size=1408,
    max_position_embeddings=16384,
)  # fmt: skip


def build_model(cfg: MLAConfig, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa", seed=0):
    """A randomly initialised transformers DeepseekV3ForCausalLM with cfg's dims (every layer dense)."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(hf_config(cfg, attn_implementation))
    return model.to(dtype).eval()


@torch.no_grad()
def _decode(model, cache, token: torch.Tensor, n: int, device: torch.device) -> tuple[list[int], float]:
    """n greedy tokens after `token` [1, 1]; returns (tokens, seconds of the n steps)."""
    model(input_ids=token, cache=cache, use_cache=True)  # warm-up step, then undone
    cache.crop(-1)
    synchronize(device)
    tokens = []
    start = time.perf_counter()
    for _ in range(n):
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        tokens.append(token)
    synchronize(device)
    seconds = time.perf_counter() - start
    cache.crop(-n)
    return torch.cat(tokens, dim=1)[0].tolist(), seconds


@torch.no_grad()
def generation_rows(contexts, new_tokens: dict[str, int], device: torch.device, dtype=torch.float32,
                    cfg: MLAConfig = SMALL_DEEPSEEK, progress=None) -> list[dict]:
    """Decode tokens/s of the model unpatched and patched at each context length.

    Args:
        contexts: tokens L in the cache before decoding.
        new_tokens: {"unpatched": N, "patched": N} greedy tokens timed per run.
        cfg: the model's dims (`SMALL_DEEPSEEK` by default).

    Returns:
        rows {"model", "impl": "unpatched" | "patched", "context", "new_tokens",
        "tokens_per_second", "ms_per_token", "speedup", "same_tokens"}; same_tokens: the
        patched run's tokens equal the unpatched run's over their common length.
    """
    from transformers import DynamicCache

    from mla import hf

    model = build_model(cfg, device, dtype)
    layers = cfg.num_hidden_layers
    name = f"DeepseekV3 {cfg.num_hidden_layers}L h{cfg.hidden_size} {cfg.num_heads} heads"
    gen = torch.Generator().manual_seed(0)
    rows = []
    jobs = [(L, impl) for L in contexts for impl in ("unpatched", "patched")]
    for L, impl in progress(jobs) if progress else jobs:
        if impl == "unpatched":
            hf.unpatch(model)
            cache = DynamicCache(config=model.config)
            for i in range(layers):
                latent = torch.randn(1, 1, L, cfg.kv_lora_rank, generator=gen).to(device, dtype)
                k_pe = torch.randn(1, 1, L, cfg.qk_rope_head_dim, generator=gen).to(device, dtype)
                cache.update(latent, k_pe, i)
            first = torch.randint(cfg.vocab_size, (1, 1), generator=gen).to(device)
        else:
            hf.patch(model)
            cache = hf.MLACache.from_dynamic_cache(model, cache)
        tokens, seconds = _decode(model, cache, first, new_tokens[impl], device)
        if impl == "unpatched":
            reference = tokens
        rows.append({
            "model": name, "impl": impl, "context": L, "new_tokens": len(tokens),
            "tokens_per_second": len(tokens) / seconds, "ms_per_token": 1e3 * seconds / len(tokens),
            "same_tokens": tokens[: len(reference)] == reference[: len(tokens)],
        })  # fmt: skip
    hf.unpatch(model)
    for row in rows:
        base = next(r for r in rows if r["context"] == row["context"] and r["impl"] == "unpatched")
        row["speedup"] = row["tokens_per_second"] / base["tokens_per_second"]
    return rows


def format_generation_table(rows: list[dict]) -> str:
    columns = [
        ("impl", "impl", ""), ("context", "context", "d"), ("new tokens", "new_tokens", "d"),
        ("tokens/s", "tokens_per_second", ".1f"), ("ms/token", "ms_per_token", ".1f"),
        ("x unpatched", "speedup", ".1f"), ("same tokens", "same_tokens", ""),
    ]  # fmt: skip
    return format_table(columns, rows)
