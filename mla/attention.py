"""`MLAttention`: DeepSeek-V2/V3 multi-head latent attention over the paged latent cache.

Per token the layer caches only the normalized latent c = kv_a_layernorm(W_DKV x) [r] and the
roped shared key k_pe [dr]. Per head, K = [W_UK c | k_pe] and V = W_UV c, with W_UK and W_UV
the two halves of kv_b_proj. Two ways to attend:

Which form a step takes is the step plan's decision (`mla.backend.absorbed_is_cheaper`, a
multiply-add count shared with `mla.hf`):

- decode (a few new tokens per sequence): absorbed form. q_nope . (W_UK c) = (W_UK^T q_nope) . c
  and sum_j p_j W_UV c_j = W_UV sum_j p_j c_j, so the query is folded into latent space and the
  attention is multi-query attention over the cache rows [c | k_pe] with V = c, which is what
  `flash_mla_with_kvcache` computes. Reads r + dr values per cached token.
- prefill (many new tokens): the decompressed form over the gathered cache, a causal mask
  offset by the tokens already cached, through PyTorch's scaled_dot_product_attention. With
  many queries per key, attending in the per-head dims (nope + dr for scores, v for values:
  192 + 128 for DeepSeek-V3) beats the latent dims (576 + 512), and decompressing each cached
  token once is shared by all queries.
- training (`cache=None`): the same decompressed form over the fresh latents of whole
  sequences, causal, through autograd (a cache write would cut the gradient).

DeepSeek-V3.2 sparse attention (config.has_indexer): a lightning indexer (`Indexer`) scores
every visible cached token for each query and the query attends only the index_topk best, in
every form: absorbed decode through the sparse kernel over the chosen slots, prefill and
training through a mask of the chosen positions. Semantics, as in DeepSeek's reference code
(inference/model.py of DeepSeek-V3.2-Exp): query t chooses among the positions it can see
(<= t), so one-shot prefill and token-by-token decode choose alike; fewer than index_topk
visible positions means all of them. DeepSeek leaves tied scores to `torch.topk`, whose order
among ties is unspecified; we break ties by position (the lower wins), so a query's choice never
depends on how many other tokens share its forward. That is what transformers 5.24 lacks: ReLU
makes exact ties (scores of 0) common, and its one-shot forward, prefix forwards and cached
decode pick different tied tokens (logit differences near 0.1 on tiny models); with the tie
rule fixed they agree with each other and with us to float32 rounding (tests/test_hf_v32.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mla.backend import check_backend
from mla.cache import LatentCache
from mla.config import MLAConfig
from mla.plan import StepPlan
from mla.reference import split_kv_b
from mla.reference.indexer import index_scores, index_topk
from mla.rope import RotaryEmbedding, apply_rope, softmax_scale


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalized in at least float32 (transformers' DeepseekV3RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Indexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer: which cached tokens each query attends.

    For query token t and cached token j (positions j <= t):
        q_I = wq_b(q_resid) as index_n_heads heads of index_head_dim, k_I = k_norm(wk(x_j)),
        both roped on their first qk_rope_head_dim channels in the half-split (not interleaved)
        layout, w = weights_proj(x_t) * index_n_heads^-0.5 * index_head_dim^-0.5,
        score(t, j) = sum_h w[h] * relu(q_I[h] . k_I).
    DeepSeek's inference code also rotates q_I and k_I by a Hadamard transform before scoring
    them in FP8; the transform is orthogonal, so in exact arithmetic the scores are these.

    Parameters (transformers' DeepseekV32Indexer names): wq_b [H * D, q_lora_rank], wk [D, hidden],
    k_norm (LayerNorm with bias, eps 1e-6), weights_proj [H, hidden].
    """

    def __init__(self, config: MLAConfig):
        super().__init__()
        c = config
        self.config = config
        self.wq_b = nn.Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, c.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(c.index_head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(c.hidden_size, c.index_n_heads, bias=False)

    def forward(self, hidden_states, q_resid, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [b, s, hidden], q_resid [b, s, q_lora_rank], float32 rotary tables
        [b or 1, s, dr / 2] -> (q_I [b, s, H, D], k_I [b, s, D] in hidden_states' dtype, head
        weights float32 [b, s, H]). Reads only the parameters and config fields transformers'
        DeepseekV32Indexer has too, so `mla.hf` runs it on that module."""
        c = self.config
        b, s, _ = hidden_states.shape
        q = self.wq_b(q_resid).view(b, s, c.index_n_heads, c.index_head_dim)
        q_pe, q_rest = q.split([c.qk_rope_head_dim, c.index_head_dim - c.qk_rope_head_dim], -1)
        q = torch.cat([apply_rope(q_pe, cos[:, :, None], sin[:, :, None], False), q_rest], dim=-1)
        k = self.k_norm(self.wk(hidden_states))
        k_pe, k_rest = k.split([c.qk_rope_head_dim, c.index_head_dim - c.qk_rope_head_dim], -1)
        k = torch.cat([apply_rope(k_pe, cos, sin, False), k_rest], dim=-1)
        # DeepSeek keeps weights_proj in float32 (transformers too: _keep_in_fp32_modules)
        weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float()
        weights = weights * (c.index_n_heads * c.index_head_dim) ** -0.5
        return q, k, weights

    def extra_repr(self) -> str:
        c = self.config
        return f"heads={c.index_n_heads}, head_dim={c.index_head_dim}, topk={c.index_topk}"


class MLAttention(nn.Module):
    """Multi-head latent attention with the parameters of transformers' DeepseekV3Attention.

    Args:
        config: the attention dimensions.
        layer_idx: which of the cache's layers this module writes and reads.
        backend: "triton" (`mla.kernels`, CUDA or TRITON_INTERPRET=1), "reference"
            (`mla.reference`, any device), or None (the rule of `mla.backend`). Used for the
            plans this module builds itself (called with a cache and no plan); a model's plan
            carries the model's backend.

    Parameters (names as in transformers, so its state dicts load as they are):
        q_proj [h * qk_head_dim, hidden] when q_lora_rank is None, else q_a_proj, q_a_layernorm,
        q_b_proj; kv_a_proj_with_mqa [r + dr, hidden], kv_a_layernorm [r], kv_b_proj
        [h * (nope + v), r], o_proj [hidden, h * v]; with config.has_indexer (DeepSeek-V3.2) also
        `indexer` (`Indexer`, transformers' DeepseekV32Attention names).
    """

    def __init__(self, config: MLAConfig, layer_idx: int = 0, backend: str | None = None):
        super().__init__()
        if not isinstance(config, MLAConfig):
            raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
        check_backend(backend)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        self.config, self.layer_idx, self.backend = config, layer_idx, backend
        c, h = config, config.num_heads
        bias = c.attention_bias
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, h * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * c.v_head_dim, c.hidden_size, bias=bias)
        self.rotary = RotaryEmbedding(config)
        self.softmax_scale = softmax_scale(config)
        self.indexer = Indexer(config) if c.has_indexer else None

    @classmethod
    def from_hf(cls, hf_attention: nn.Module, backend: str | None = None) -> MLAttention:
        """Copy a transformers DeepseekV2Attention / V3Attention / V32Attention (weights, dtype, device)."""
        config = MLAConfig.from_hf(hf_attention.config)
        module = cls(config, hf_attention.layer_idx, backend=backend)
        weight = hf_attention.kv_b_proj.weight
        module.to(device=weight.device, dtype=weight.dtype)
        module.load_state_dict(hf_attention.state_dict())
        return module

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [h, nope, r], W_UV [h, v, r]): views of kv_b_proj.weight, so weight updates show
        through and gradients flow; making the views costs no copy."""
        return split_kv_b(self.kv_b_proj.weight, self.config.num_heads, self.config.v_head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        seq_ids=None,
        plan: StepPlan | None = None,
    ) -> torch.Tensor:
        """Attend s new tokens of each of b sequences over their cached context.

        The caller has reserved the new tokens (`cache.reserve(seq_ids, s)`), so they are the
        last s of each sequence; this layer writes their latents to its cache layer, then
        attends. Sequences may hold different numbers of tokens.

        Without a cache (`cache=None`, the training path) the s tokens are whole sequences:
        causal attention among them in the decompressed form, differentiable, nothing stored.

        Args:
            hidden_states: [b, s, hidden_size].
            positions: integer [b, s], the new tokens' positions: length - s ... length - 1 of
                each sequence. Without a cache: the rotary positions, default 0 ... s - 1.
            cache: `mla.LatentCache` with this layer, kv_lora_rank and qk_rope_head_dim, or None.
            seq_ids: b distinct sequence ids of the cache (None without a cache).
            plan: `cache.plan(seq_ids, s, config)`, shared by all layers of one step; given a
                plan, the layer takes everything from it (positions, cache and seq_ids are not
                needed) and checks nothing: the plan was validated when it was built.

        Returns:
            [b, s, hidden_size] in hidden_states' dtype.
        """
        if plan is not None:
            return self._forward_planned(hidden_states, plan)
        if cache is None:
            if seq_ids is not None:
                raise ValueError("seq_ids name cached sequences; pass none without a cache")
            return self._forward_uncached(hidden_states, positions)
        b, s = self._check_inputs(hidden_states, positions, cache, seq_ids)
        plan = cache.plan(seq_ids, s, self.config, rotary=self.rotary, backend=self.backend)
        if not torch.equal(positions.to(plan.positions.device, torch.int64), plan.positions):
            raise ValueError(
                f"positions must be the last {s} positions of each sequence, "
                f"{plan.positions.tolist()}, got {positions.tolist()}"
            )
        return self._forward_planned(hidden_states, plan)

    def _forward_planned(self, hidden_states: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        q_nope, q_pe, latent, k_pe, q_resid = self._project(hidden_states, plan.cos, plan.sin)
        plan.write(self.layer_idx, latent.reshape(b * s, -1), k_pe.reshape(b * s, -1))
        chosen = None
        if self.indexer is not None:
            q_index, k_index, weights = self.indexer(hidden_states, q_resid, plan.cos, plan.sin)
            plan.write_index(self.layer_idx, k_index.reshape(b * s, -1))
            chosen, _ = plan.select(self.layer_idx, q_index, weights, self.config.index_topk, as_slots=plan.absorbed)
        if plan.absorbed:
            out = self._attend_absorbed(q_nope, q_pe, plan, chosen)
        else:
            visible = plan.visible() if chosen is None else chosen_mask(chosen, plan.visible())
            out = self._attend_decompressed(q_nope, q_pe, plan, visible)
        return self.o_proj(out.flatten(2))  # [b, s, h * v] -> [b, s, hidden]

    def _forward_uncached(self, hidden_states, positions) -> torch.Tensor:
        """`forward` without a cache: [b, s, hidden] -> [b, s, hidden], causal over the s tokens."""
        b, s = self._check_inputs(hidden_states, positions, None, None)
        if positions is None:
            positions = torch.arange(s, device=hidden_states.device)[None]  # [1, s], broadcast over b
        cos, sin = self.rotary(positions.to(hidden_states.device))
        q_nope, q_pe, latent, k_pe, q_resid = self._project(hidden_states, cos, sin)
        k, v = self._decompress(latent, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [b, s, h, qk]
        if self.indexer is None:
            mask, causal = None, True
        else:
            mask, causal = self._select_uncached(hidden_states, q_resid, cos, sin)[:, None], False
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal,
            scale=self.softmax_scale,
        )  # fmt: skip  # [b, h, s, v]
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def _select_uncached(self, hidden_states, q_resid, cos, sin) -> torch.Tensor:
        """The indexer's choice among the s fresh tokens of each sequence (causal), as a bool
        mask [b, s, s]: the reference selection over the keys viewed as one page per sequence."""
        b, s, _ = hidden_states.shape
        q_index, k_index, weights = self.indexer(hidden_states, q_resid, cos, sin)
        if k_index.dtype == torch.float64:  # scored in float32, as a cache of a float64 model stores them
            q_index, k_index = q_index.float(), k_index.float()
        table = torch.arange(b, dtype=torch.int32, device=hidden_states.device)[:, None]
        lengths = torch.full((b,), s, dtype=torch.int32, device=hidden_states.device)
        with torch.no_grad():  # a choice of positions: nothing to differentiate
            scores = index_scores(q_index, weights, k_index[:, :, None], table, lengths, s)
            positions, _ = index_topk(scores, self.config.index_topk)
        causal = torch.ones(s, s, dtype=torch.bool, device=hidden_states.device).tril()
        return chosen_mask(positions, causal.expand(b, s, s))

    def _project(self, hidden_states, cos, sin):
        """[b, s, hidden] and float32 rotary tables [b or 1, s, dr / 2] -> q_nope [b, s, h, nope],
        roped q_pe [b, s, h, dr], normalized latent [b, s, r], roped k_pe [b, s, dr], and the
        compressed query q_resid [b, s, q_lora_rank] (None without q_lora_rank), which the indexer reads."""
        cfg = self.config
        b, s, _ = hidden_states.shape
        q_resid = None
        if cfg.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states))
            q = self.q_b_proj(q_resid)
        q = q.view(b, s, cfg.num_heads, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], -1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], cfg.rope_interleave)

        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rope(k_pe, cos, sin, cfg.rope_interleave)
        return q_nope, q_pe, latent, k_pe, q_resid

    def _decompress(self, latent, k_pe) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [b, L, r], k_pe [b, L, dr] -> per-head K [b, L, h, nope + dr], V [b, L, h, v]."""
        cfg = self.config
        b, L, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, L, cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], -1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, cfg.num_heads, -1)], dim=-1)
        return k, v

    def _attend_absorbed(self, q_nope, q_pe, plan: StepPlan, indices=None) -> torch.Tensor:
        """[b, s, h, nope], [b, s, h, dr] -> [b, s, h, v]: W_UK folded into q, the plan's decode
        attention over the latent cache (over the slots `indices` when given), W_UV applied to its output."""
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
        q = torch.cat([q_latent, q_pe], dim=-1)  # [b, s, h, r + dr]
        out = plan.attend(self.layer_idx, q, self.softmax_scale, indices)
        return torch.einsum("bshr,hvr->bshv", out.to(q_nope.dtype), w_uv)

    def _attend_decompressed(self, q_nope, q_pe, plan: StepPlan, visible: torch.Tensor) -> torch.Tensor:
        """[b, s, h, nope], [b, s, h, dr] -> [b, s, h, v]: decompress the gathered cache, SDPA
        masked by `visible` (bool [b, s, max_seqlen])."""
        cfg = self.config
        latent, k_pe = plan.context(self.layer_idx, q_nope.dtype).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
        k, v = self._decompress(latent, k_pe)  # [b, L, h, qk], [b, L, h, v]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [b, s, h, qk]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=visible[:, None], scale=self.softmax_scale,
        )  # fmt: skip  # [b, h, s, v]
        return out.transpose(1, 2)

    def _check_inputs(self, hidden_states, positions, cache, seq_ids) -> tuple[int, int]:
        cfg = self.config
        b, s = check_tokens(hidden_states, cfg.hidden_size, positions, required=cache is not None)
        if cache is None:
            return b, s
        if not isinstance(cache, LatentCache):
            raise TypeError(f"cache must be an mla.LatentCache, got {type(cache).__name__}")
        if len(list(seq_ids)) != b:
            raise ValueError(f"seq_ids has {len(list(seq_ids))} ids for a batch of {b}")
        check_cache(cache, cfg, self.layer_idx + 1, hidden_states.device)
        return b, s

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layer_idx={self.layer_idx}, heads={c.num_heads}, kv_lora_rank={c.kv_lora_rank}, "
            f"qk_rope_head_dim={c.qk_rope_head_dim}, backend={self.backend or 'auto'}"
        )


def check_tokens(hidden_states, hidden_size: int, positions, required: bool) -> tuple[int, int]:
    """(b, s) of hidden_states [b, s, hidden_size] (s >= 1) and its positions, an integer tensor
    [b, s] (None allowed unless `required`); raises naming the value. Shared by the attention
    modules' boundary checks."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be a [b, s, hidden_size] tensor, got {_describe(hidden_states)}")
    b, s, hidden = hidden_states.shape
    if hidden != hidden_size:
        raise ValueError(f"hidden_states has hidden size {hidden}, the config says hidden_size={hidden_size}")
    if s < 1:
        raise ValueError("hidden_states has no tokens (s = 0)")
    if positions is None and not required:
        return b, s
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an integer tensor [b, s], got {_describe(positions)}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    if tuple(positions.shape) != (b, s):
        raise ValueError(f"positions must have shape [b={b}, s={s}] like hidden_states, got {tuple(positions.shape)}")
    return b, s


def check_cache(cache, config: MLAConfig, num_layers: int, device: torch.device) -> None:
    """Raise unless `cache` can hold `num_layers` layers of `config` on `device` (models check
    this once per step, a module called alone once per call)."""
    if not isinstance(cache, LatentCache):
        raise TypeError(f"cache must be an mla.LatentCache, got {type(cache).__name__}")
    for name, want in (("kv_lora_rank", config.kv_lora_rank), ("rope_dim", config.qk_rope_head_dim)):
        got = getattr(cache, name)
        if got != want:
            raise ValueError(f"cache {name} is {got}, the layers need {want}: the cache was built for another config")
    if config.has_indexer and cache.index_head_dim != config.index_head_dim:
        raise ValueError(
            f"cache index_head_dim is {cache.index_head_dim}, the layers' indexer needs {config.index_head_dim}: "
            "build the cache with LatentCache(..., index_head_dim=config.index_head_dim) (or model.new_cache)"
        )
    if cache.num_layers < num_layers:
        raise ValueError(f"cache has {cache.num_layers} layers, the model needs {num_layers}")
    if cache.pages[0].device != device:
        raise ValueError(f"cache is on {cache.pages[0].device} but hidden_states are on {device}")


def chosen_mask(positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """bool [b, s, L]: True at the chosen positions (int [b, s, k], -1 = none). A column that
    chose nothing (a ragged step's padding) keeps `visible`, so its softmax stays finite."""
    b, s, length = visible.shape
    slot = torch.where(positions >= 0, positions.long(), length)  # -1 -> a dropped extra column
    chosen = torch.zeros(b, s, length + 1, dtype=torch.bool, device=visible.device)
    chosen = chosen.scatter(2, slot, True)[..., :length]
    return torch.where(chosen.any(-1, keepdim=True), chosen, visible)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
