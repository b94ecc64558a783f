"""Section 2 (any device, the CPU figure of the report): one decode step of one attention layer.

Three ways to decode one token of a DeepSeek attention layer over s_k - 1 cached tokens, all
with the same weights, the same cached latents and the same new hidden state, and all
including the layer's projections (q, kv_a, o_proj):

- absorbed: `mla.MLAttention` on a `LatentCache` (the decode kernel's math: the reference
  backend on the CPU, Triton on a GPU);
- naive: the same projections and cache, then `mla.reference.mla_naive`: every cached latent
  is decompressed to per-head K and V through kv_b_proj, then ordinary multi-head attention;
- transformers: `DeepseekV3Attention` as shipped (eager attention) on a `DynamicCache`
  prefilled with the same latents; it also decompresses the whole context every step.

The three outputs are compared as well as timed. Each row also gives the time to stream the
step's bytes (the layer's weights and the cached latents) at the copy bandwidth measured in
turn with the step's own calls, and the step's time as a multiple of it: at b = 1 a decode step reads every
byte once and does little else, so a multiple near 1 says the step is memory-bound with little
left to gain (a read-only stream can run a little faster than a copy, so slightly under 1 is
possible).
"""

from __future__ import annotations

import torch

from mla import LatentCache, MLAConfig, MLAttention
from mla.reference import mla_naive
from mla.rope import apply_rope

from .common import copy_fn, format_table, synchronize, time_ms, time_ms_alternating

IMPLS = ("absorbed", "naive", "transformers")
PAGE = 64


def hf_config(cfg: MLAConfig, attn_implementation: str = "eager", **overrides):
    """A transformers DeepseekV3Config with cfg's attention dims, RoPE and a dense MLP."""
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_theta": cfg.rope_theta, **cfg.rope_scaling, "rope_type": "yarn"}
        rope.pop("type")
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope, rope_interleave=cfg.rope_interleave, rms_norm_eps=cfg.rms_norm_eps,
        attention_bias=cfg.attention_bias, tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
        attn_implementation=attn_implementation,
    )  # fmt: skip
    fields.update(overrides)
    if "first_k_dense_replace" not in overrides:
        fields["first_k_dense_replace"] = fields["num_hidden_layers"]  # every layer dense
    return DeepseekV3Config(**fields)


class LayerBench:
    """One attention layer (cfg's dims), its weights shared by the three implementations.

    Args:
        cfg: attention dims (e.g. `MLAConfig.deepseek_v3()`).
        device, dtype: where and in what the layer runs (float32 on the CPU).
        seed: weights, cached latents and the new hidden state are drawn from it.
    """

    def __init__(self, cfg: MLAConfig, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3Attention,
            DeepseekV3RotaryEmbedding,
        )

        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.hf_cfg = hf_config(cfg, "eager", num_hidden_layers=1)
        gen = torch.Generator().manual_seed(seed)
        with torch.device(device):
            torch.manual_seed(seed)
            self.hf = DeepseekV3Attention(self.hf_cfg, layer_idx=0).to(dtype).eval()
            self.hf_rotary = DeepseekV3RotaryEmbedding(self.hf_cfg)
        # Unit-scale norm gains away from 1 so a skipped norm shows in the comparison.
        with torch.no_grad():
            for name, p in self.hf.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        backend = "triton" if device.type == "cuda" else "reference"
        self.mla = MLAttention.from_hf(self.hf, backend=backend).eval()
        self.x = torch.randn(1, 1, cfg.hidden_size, generator=gen).to(device, dtype)
        self._gen = gen
        self.s_k = 0

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.mla.parameters())

    def set_context(self, s_k: int) -> None:
        """Fill both caches with the same s_k - 1 random latents; the timed step is token s_k."""
        from transformers import DynamicCache

        cfg, n = self.cfg, s_k - 1
        latent = torch.randn(n, cfg.kv_lora_rank, generator=self._gen).to(self.device, self.dtype)
        k_pe = torch.randn(n, cfg.qk_rope_head_dim, generator=self._gen).to(self.device, self.dtype)
        self.cache = LatentCache(1, -(-s_k // PAGE), PAGE, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                 dtype=self.dtype, device=self.device)  # fmt: skip
        self.sid = self.cache.add_sequence()
        self.cache.reserve([self.sid], n)
        self.cache.write(0, self.cache.slot_mapping([self.sid], torch.arange(n)[None]), latent, k_pe)
        self.hf_cache = DynamicCache(config=self.hf_cfg)
        self.hf_cache.update(latent[None, None], k_pe[None, None], 0)
        self.position = torch.tensor([[n]], device=self.device)
        self.hf_position_embeddings = self.hf_rotary(self.x, self.position)
        self.s_k = s_k

    @torch.no_grad()
    def absorbed(self) -> torch.Tensor:
        """[1, 1, hidden]: `MLAttention` decode (absorbed) over the latent cache."""
        cache, sid = self.cache, self.sid
        cache.reserve([sid], 1)
        try:
            return self.mla(self.x, self.position, cache, [sid])
        finally:
            cache.truncate(sid, self.s_k - 1)

    @torch.no_grad()
    def naive(self) -> torch.Tensor:
        """[1, 1, hidden]: the same projections and cache write, then decompressed K/V attention."""
        m, cfg, cache, sid = self.mla, self.cfg, self.cache, self.sid
        cache.reserve([sid], 1)
        try:
            cos, sin = m.rotary(self.position)  # [1, 1, dr / 2]
            if cfg.q_lora_rank is None:
                q = m.q_proj(self.x)
            else:
                q = m.q_b_proj(m.q_a_layernorm(m.q_a_proj(self.x)))
            q_nope, q_pe = q.view(1, 1, cfg.num_heads, cfg.qk_head_dim).split(
                [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], -1
            )
            q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], cfg.rope_interleave)
            latent, k_pe = m.kv_a_proj_with_mqa(self.x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
            latent = m.kv_a_layernorm(latent)
            k_pe = apply_rope(k_pe, cos, sin, cfg.rope_interleave)
            cache.write(0, cache.slot_mapping([sid], self.position), latent[0], k_pe[0])
            all_latent, all_k_pe = cache.read(0, sid)  # [s_k, r], [s_k, dr]
            out = mla_naive(q_nope, q_pe, all_latent[None], all_k_pe[None], m.kv_b_proj.weight,
                            cfg.v_head_dim, m.softmax_scale, causal=True)  # fmt: skip
            return m.o_proj(out.flatten(2))
        finally:
            cache.truncate(sid, self.s_k - 1)

    @torch.no_grad()
    def transformers(self) -> torch.Tensor:
        """[1, 1, hidden]: DeepseekV3Attention as shipped, appending to its DynamicCache."""
        try:
            out, _ = self.hf(self.x, self.hf_position_embeddings, None, cache=self.hf_cache)
            return out
        finally:
            self.hf_cache.crop(-1)  # drop the token this step appended


def layer_rows(cfg: MLAConfig, s_k_list, device: torch.device, dtype=torch.float32, progress=None,
               model: str = "DeepSeek-V3", copy_bytes: int | None = None) -> list[dict]:
    """Time the three implementations at each context length.

    Returns rows {"impl", "model", b=1, s_k, h_q, s_q=1, ms, bytes, gbps, speedup_vs_transformers,
    max_abs_diff}, and with copy_bytes also {copy_gbps, stream_ms, stream_multiple}. bytes is
    what a decode step must read at least: the layer's weights and the s_k cached latents; gbps
    is bytes over the time. copy_gbps: a copy_bytes buffer copied in turn with the row's timed
    calls (`common.copy_fn`, `common.time_ms_alternating`), so a shared machine's load weighs on
    both alike; stream_ms: the time to stream the step's bytes at that rate; stream_multiple =
    ms / stream_ms. max_abs_diff is the output's largest difference from transformers' on the
    same inputs.
    """
    bench = LayerBench(cfg, device, dtype)
    copy, moved = copy_fn(device, copy_bytes) if copy_bytes else (None, 0)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    rows = []
    jobs = [(s_k, impl) for s_k in s_k_list for impl in IMPLS]
    for s_k, impl in progress(jobs) if progress else jobs:
        if bench.s_k != s_k:
            bench.set_context(s_k)
            expected = bench.transformers()
        fn = getattr(bench, impl)
        diff = (fn().float() - expected.float()).abs().max().item()
        ms, copy_ms = time_ms_alternating([fn, copy], device) if copy else (time_ms(fn, device), None)
        synchronize(device)
        nbytes = s_k * cfg.cache_dim * itemsize + bench.weight_bytes()
        row = {"impl": impl, "model": model, "b": 1, "s_k": s_k, "h_q": cfg.num_heads, "s_q": 1, "ms": ms,
               "bytes": nbytes, "gbps": nbytes / ms / 1e6, "max_abs_diff": diff}  # fmt: skip
        if copy:
            row["copy_gbps"] = moved / copy_ms / 1e6
            row["stream_ms"] = nbytes / row["copy_gbps"] / 1e6
            row["stream_multiple"] = ms / row["stream_ms"]
        rows.append(row)
    for row in rows:
        base = next(r["ms"] for r in rows if r["s_k"] == row["s_k"] and r["impl"] == "transformers")
        row["speedup_vs_transformers"] = base / row["ms"]
    return rows


def format_layer_table(rows: list[dict]) -> str:
    columns = [
        ("impl", "impl", ""), ("s_k", "s_k", "d"), ("h_q", "h_q", "d"), ("ms", "ms", ".2f"),
        ("copy GB/s", "copy_gbps", ".1f"), ("stream ms", "stream_ms", ".2f"),
        ("x stream time", "stream_multiple", ".2f"),
        ("x faster than transformers", "speedup_vs_transformers", ".1f"), ("eff. GB/s", "gbps", ".1f"),
        ("max |diff| vs transformers", "max_abs_diff", ".1e"),
    ]  # fmt: skip
    return format_table(columns, rows)
