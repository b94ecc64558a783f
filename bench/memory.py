"""Section 1: KV-cache bytes per token, MLA latent (bf16, FP8) vs full multi-head K/V, and per
token of a long context across DeepSeek's generations (V3, V3.2, V4's compressed layers)."""

from __future__ import annotations

import torch

from mla import LatentCache, MLAConfig
from mla.v4 import V4Config
from mla.v4_cache import sequence_bytes_per_token

from .common import format_table as _format_table

# Llama-3-8B: 32 layers, 8 KV heads of 128 (grouped-query attention), bf16 K and V.
LLAMA3_8B = {"layers": 32, "bytes_per_token_per_layer": 2 * 8 * 128 * 2}
CAPACITIES_GB = (80, 141)
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": "fp8"}


def presets(shipped: MLAConfig | None = None) -> dict[str, MLAConfig]:
    """The DeepSeek presets, plus the shipped small model's config when there is one."""
    models = {
        "DeepSeek-V3": MLAConfig.deepseek_v3(),
        "DeepSeek-V3.2": MLAConfig.deepseek_v32(),
        "DeepSeek-V2": MLAConfig.deepseek_v2(),
        "DeepSeek-V2-Lite": MLAConfig.deepseek_v2_lite(),
    }
    if shipped is not None:
        models["shipped small model"] = shipped
    return models


def cache_bytes_per_token(cfg: MLAConfig, kv_dtype) -> tuple[int, int]:
    """(all, indexer key) bytes one token occupies in one layer of a `LatentCache` built for cfg
    in kv_dtype (torch.bfloat16 or "fp8"): the cache's own accounting, read from a cache on the
    meta device (no memory). Raises RuntimeError where `MLAConfig.kv_bytes_per_token` /
    `index_bytes_per_token` price it differently: the report prints one number for both."""
    cache = LatentCache(1, 1, 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=kv_dtype, device="meta",
                        index_head_dim=cfg.index_head_dim)  # fmt: skip
    index = cache.index_format.bytes_per_token if cache.index_format else 0
    priced = (cfg.kv_bytes_per_token(kv_dtype), cfg.index_bytes_per_token(kv_dtype))
    if (cache.bytes_per_token, index) != priced:
        raise RuntimeError(
            f"{kv_dtype} cache: LatentCache stores {cache.bytes_per_token} bytes per token per layer "
            f"({index} of indexer key), MLAConfig prices {priced[0]} ({priced[1]})"
        )
    return cache.bytes_per_token, index


def memory_rows(models: dict[str, MLAConfig]) -> list[dict]:
    """One row per (model, cache format): bytes per token per layer (`cache_bytes_per_token`) and
    the indexer key's share of them, per token in all layers, the same model's full-MHA figure,
    and the context a whole GPU of each size would hold if all its memory went to the cache."""
    rows = []
    for name, cfg in models.items():
        mha = cfg.mha_bytes_per_token(torch.bfloat16)
        for kv_dtype, dtype in KV_DTYPES.items():
            per_layer, index = cache_bytes_per_token(cfg, dtype)
            rows.append(_row(name, kv_dtype, per_layer, index, mha, cfg.num_hidden_layers))
    llama = LLAMA3_8B["bytes_per_token_per_layer"]
    rows.append(_row("Llama-3-8B (GQA)", "bf16", llama, None, None, LLAMA3_8B["layers"]))
    return rows


def _row(model, kv_dtype, per_layer, index, mha, layers):
    per_token = per_layer * layers
    row = {
        "model": model,
        "kv_dtype": kv_dtype,
        "layers": layers,
        "bytes_per_token_per_layer": per_layer,
        "index_bytes_per_token_per_layer": index,
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
        ("of which indexer key", "index_bytes_per_token_per_layer", ",d"),
        ("MHA B/token/layer", "mha_bytes_per_token_per_layer", ",d"),
        ("x smaller than MHA", "reduction_vs_mha", ".1f"),
        ("x smaller than Llama-3-8B per token", "vs_llama3_8b_gqa", ".2f"),
    ] + [(f"tokens in {gb} GB", f"tokens_in_{gb}gb", ",d") for gb in CAPACITIES_GB]
    return _format_table(columns, rows)


# Contexts of the long-context table: 128k and 1M tokens (2 ** 17, 2 ** 20).
CONTEXTS = {"128k": 1 << 17, "1m": 1 << 20}
V32_BASELINE = ("DeepSeek-V3.2", "fp8")


def context_rows() -> list[dict]:
    """Bytes per token of a whole model's cache (all layers) at each context in CONTEXTS, from the
    caches' own accounting: V3 / V3.2 from `cache_bytes_per_token` (constant per token), V4 from
    `mla.v4_cache.sequence_bytes_per_token`: what one sequence holds in a compact `V4Cache`
    (max_rollback 0, pages of 64) built on the meta device after a decode step, per the real
    layer schedule: window and open-window token pages (kv and the raw compressor rows that make
    rollback exact), compressed entries, CSA indexer keys; FP8 = FlashMLA's MODEL1 rows with MXFP4
    indexer keys, as DeepSeek deploys them. ratio_vs_v32_at_1m: over V3.2's FP8 cache (61 x 788
    bytes per token)."""
    rows = []
    for name, cfg in (("DeepSeek-V3", MLAConfig.deepseek_v3()), ("DeepSeek-V3.2", MLAConfig.deepseek_v32())):
        for kv_dtype, dtype in KV_DTYPES.items():
            per_token = cache_bytes_per_token(cfg, dtype)[0] * cfg.num_hidden_layers
            rows.append({"model": name, "kv_dtype": kv_dtype, "layers": cfg.num_hidden_layers,
                         **{f"bytes_per_token_at_{c}": float(per_token) for c in CONTEXTS}})  # fmt: skip
    for name, cfg in (("DeepSeek-V4-Flash", V4Config.deepseek_v4_flash()), ("DeepSeek-V4-Pro", V4Config.deepseek_v4_pro())):
        for kv_dtype, dtype in KV_DTYPES.items():
            rows.append({"model": name, "kv_dtype": kv_dtype, "layers": cfg.num_hidden_layers,
                         **{f"bytes_per_token_at_{c}": sequence_bytes_per_token(cfg, n, dtype)
                            for c, n in CONTEXTS.items()}})  # fmt: skip
    baseline = next(r["bytes_per_token_at_1m"] for r in rows if (r["model"], r["kv_dtype"]) == V32_BASELINE)
    for row in rows:
        row["ratio_vs_v32_at_1m"] = row["bytes_per_token_at_1m"] / baseline
    return rows


def format_context_table(rows: list[dict]) -> str:
    columns = [
        ("model", "model", ""),
        ("cache", "kv_dtype", ""),
        ("layers", "layers", "d"),
        ("B/token at 128k", "bytes_per_token_at_128k", ",.0f"),
        ("B/token at 1M", "bytes_per_token_at_1m", ",.0f"),
        ("of V3.2 FP8 at 1M", "ratio_vs_v32_at_1m", ".2%"),
    ]
    return _format_table(columns, rows)
