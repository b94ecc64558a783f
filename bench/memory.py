"""Section 1: KV-cache bytes per token, MLA latent (bf16, FP8) vs full multi-head K/V."""

from __future__ import annotations

import torch

from mla import MLAConfig

from .common import format_table as _format_table

# Llama-3-8B: 32 layers, 8 KV heads of 128 (grouped-query attention), bf16 K and V.
LLAMA3_8B = {"layers": 32, "bytes_per_token_per_layer": 2 * 8 * 128 * 2}
CAPACITIES_GB = (80, 141)


def presets(shipped: MLAConfig | None = None) -> dict[str, MLAConfig]:
    """The DeepSeek presets, plus the shipped small model's config when there is one."""
    models = {
        "DeepSeek-V3": MLAConfig.deepseek_v3(),
        "DeepSeek-V2": MLAConfig.deepseek_v2(),
        "DeepSeek-V2-Lite": MLAConfig.deepseek_v2_lite(),
    }
    if shipped is not None:
        models["shipped small model"] = shipped
    return models


def memory_rows(models: dict[str, MLAConfig]) -> list[dict]:
    """One row per (model, cache format): bytes per token per layer and per token in all
    layers, the same model's full-MHA figure, and the context a whole GPU of each size
    would hold if all its memory went to the cache."""
    rows = []
    for name, cfg in models.items():
        mha = cfg.mha_bytes_per_token(torch.bfloat16)
        formats = {
            "bf16": cfg.kv_bytes_per_token(torch.bfloat16),
            "fp8": cfg.kv_bytes_per_token("fp8"),
        }
        for kv_dtype, per_layer in formats.items():
            rows.append(_row(name, kv_dtype, per_layer, mha, cfg.num_hidden_layers))
    rows.append(_row("Llama-3-8B (GQA)", "bf16", LLAMA3_8B["bytes_per_token_per_layer"], None, LLAMA3_8B["layers"]))
    return rows


def _row(model, kv_dtype, per_layer, mha, layers):
    per_token = per_layer * layers
    row = {
        "model": model,
        "kv_dtype": kv_dtype,
        "layers": layers,
        "bytes_per_token_per_layer": per_layer,
        "mha_bytes_per_token_per_layer": mha,
        "reduction_vs_mha": mha / per_layer if mha else None,
        "vs_llama3_8b_gqa": LLAMA3_8B["bytes_per_token_per_layer"] * LLAMA3_8B["layers"] / per_token,
    }
    for gb in CAPACITIES_GB:
        row[f"tokens_in_{gb}gb"] = int(gb * 1e9 // per_token)
    return row


def format_table(rows: list[dict]) -> str:
    columns = [
        ("model", "model", ""),
        ("cache", "kv_dtype", ""),
        ("layers", "layers", "d"),
        ("B/token/layer", "bytes_per_token_per_layer", ",d"),
        ("MHA B/token/layer", "mha_bytes_per_token_per_layer", ",d"),
        ("x smaller than MHA", "reduction_vs_mha", ".1f"),
        ("x smaller than Llama-3-8B per token", "vs_llama3_8b_gqa", ".2f"),
    ] + [(f"tokens in {gb} GB", f"tokens_in_{gb}gb", ",d") for gb in CAPACITIES_GB]
    return _format_table(columns, rows)
