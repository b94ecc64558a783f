"""Absorbed-form decode for transformers' DeepSeek-V2/V3 attention.

What transformers (5.x) caches. `DeepseekV2Attention` / `DeepseekV3Attention` call
`cache.update(kv_nope, k_rot, layer_idx)` before expanding anything, so each cache layer
already holds the compressed MLA state, as single-head 4D tensors:

    keys   = kv_a_layernorm(latent)   [batch, 1, kv_len, kv_lora_rank]
    values = roped k_pe               [batch, 1, kv_len, qk_rope_head_dim]

(`DynamicCache` grows them along dim 2; `StaticCache` preallocates kv_len = max_cache_len
and the attention mask hides the unused tail.) What it still does every step is
`expand_kv`: run kv_b_proj over the *whole* cached context to rebuild per-head K
[b, h, kv_len, qk_nope + qk_rope] and V [b, h, kv_len, v_head_dim], i.e.
2 * kv_len * kv_lora_rank * h * (qk_nope + v) FLOPs and h * (qk_nope + qk_rope + v)
values of memory traffic per cached token, per layer, per generated token.

`patch(model)` turns every such module into an adapter that keeps that cache exactly as is
(same `cache.update` call, same tensors, so `generate()`, cropping, beam reordering and
static caches work unchanged) but, for short queries, attends in latent space:

    q_lat  = q_nope @ W_UK                      [b, h, s, r]    (W_UK: per-head view of kv_b_proj.weight)
    scores = (q_lat @ latent^T + q_pe @ k_pe^T) * scaling + mask
    out    = (softmax_fp32(scores) @ latent) @ W_UV^T -> o_proj

which reads only r + rope_dim values per cached token. Long queries (prefill) keep the
original module's computation; see `DEFAULT_MAX_ABSORBED_QUERY_LEN`.

The cache layout (latent and k_pe as two separate, contiguous-per-sequence tensors) is not
the paged [num_blocks, page, 1, r + rope_dim] layout `mla.kernels.flash_mla_with_kvcache`
reads; packing it would copy the whole context every step, so the adapter runs the
absorbed form in plain PyTorch on every device. For the fused kernel use `mla.MLAttention`
on `mla.LatentCache`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as _v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as _v3
from transformers.utils.deprecation import deprecate_kwarg

from mla.reference import split_kv_b

__all__ = [
    "DEFAULT_MAX_ABSORBED_QUERY_LEN",
    "AbsorbedDeepseekV2Attention",
    "AbsorbedDeepseekV3Attention",
    "patch",
    "unpatch",
]

# Why prefill stays naive. Per layer, for s query tokens over L cached tokens and h heads, in MACs:
#   naive    = L*h*r*(qk_nope + v)            (expand_kv: every cached latent through kv_b_proj)
#            + s*L*h*(qk_nope + rope + v)     (scores and output in head space)
#   absorbed = s*L*h*(r + rope + r)           (scores and output in latent space)
#            + s*h*r*(qk_nope + v)            (W_UK into q, W_UV out of the output, per query only)
# With DeepSeek-V3/V2 shapes (r = 512, qk_nope = v = 128, rope = 64) absorbed costs 1088 MACs per
# query/key/head against 320 naive, while the expansion costs 131072 per key/head whatever s is:
# absorbed wins while s < ~170 and loses by ~3.4x on a long prefill (s = L), where the original
# path can also use SDPA/flash kernels instead of materializing fp32 scores. 16 covers decode and
# short multi-token steps (speculative verification) with a wide margin.
DEFAULT_MAX_ABSORBED_QUERY_LEN = 16

# Attention implementations whose masks the adapter understands: a 4D float (additive) or
# boolean (True = attend) mask [b, 1, q, kv], or None with SDPA's `is_causal` meaning.
_ABSORBED_IMPLEMENTATIONS = ("eager", "sdpa")


class _AbsorbedMLA:
    """Latent-space attention shared by the V2 and V3 adapters.

    Mixed into a subclass of the transformers attention class, so `super().forward` is the
    original computation and every parameter is the original module's own. The subclass
    supplies `_rope(q_pe, k_pe, position_embeddings)`, its model's rotary embedding.
    """

    max_absorbed_query_len: int = DEFAULT_MAX_ABSORBED_QUERY_LEN
    _absorbed_weights_key: tuple | None = None
    _absorbed_weights_value: tuple[torch.Tensor, torch.Tensor] | None = None

    def _uses_absorbed(self, hidden_states: torch.Tensor, attention_mask) -> bool:
        """Whether this call runs in latent space (short query, a mask we understand, no dropout)."""
        if hidden_states.shape[1] > self.max_absorbed_query_len:
            return False
        if self.config._attn_implementation not in _ABSORBED_IMPLEMENTATIONS:
            return False
        if self.training and self.attention_dropout > 0:
            return False
        return attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head views of kv_b_proj.weight: (W_UK [h, qk_nope, r], W_UV [h, v_head_dim, r]).

        Views, not copies: in-place weight updates show through. They are rebuilt when the
        weight tensor is replaced or moved (new storage, dtype or device) and when grad mode
        changes (a view taken under no_grad would cut the weight's gradient).
        """
        weight = self.kv_b_proj.weight
        key = (weight, weight.data_ptr(), weight.dtype, weight.device, weight.shape, torch.is_grad_enabled())
        cached = self._absorbed_weights_key
        if cached is None or cached[0] is not weight or cached[1:] != key[1:]:
            self._absorbed_weights_value = split_kv_b(weight, self.num_heads, self.v_head_dim)
            self._absorbed_weights_key = key
        return self._absorbed_weights_value

    def _project(self, hidden_states: torch.Tensor, position_embeddings):
        """The original module's projections: q_nope [b, h, s, qk_nope], q_pe [b, h, s, rope],
        latent [b, 1, s, r] (after kv_a_layernorm), k_pe [b, 1, s, rope] (roped)."""
        batch_size, seq_length = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(batch_size, seq_length, -1, self.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
        latent, k_pe = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(batch_size, 1, seq_length, self.kv_lora_rank)
        k_pe = k_pe.view(batch_size, 1, seq_length, self.qk_rope_head_dim)
        q_pe, k_pe = self._rope(q_pe, k_pe, position_embeddings)
        return q_nope, q_pe, latent, k_pe

    def _attend_absorbed(self, q_nope, q_pe, latent, k_pe, attention_mask, causal_if_unmasked: bool):
        """Attention in latent space.

        q_nope [b, h, s, qk_nope], q_pe [b, h, s, rope], latent [b, 1, L, r], k_pe [b, 1, L, rope]
        (the cache's full contents, this step's tokens last), attention_mask a 4D additive or
        boolean mask [b, 1, s, >= L] or None; `causal_if_unmasked` applies SDPA's `is_causal`
        when there is no mask. Returns (o_proj output [b, s, hidden], attention probabilities
        [b, h, s, L] in the query dtype).
        """
        batch_size, num_heads, seq_length, _ = q_nope.shape
        kv_length = latent.shape[-2]
        latent, k_pe = latent[:, 0], k_pe[:, 0]  # [b, L, r], [b, L, rope]: views of the cache
        w_uk, w_uv = self.absorbed_weights()
        # q_nope . (W_UK c) = (W_UK^T q_nope) . c: one [r]-vector per head instead of expanding every c.
        q_lat = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)
        # Every head attends to the same single-head latent and k_pe (multi-query attention), so the
        # heads fold into the rows of one [h*s, r] x [r, L] product per sequence: the cache is read
        # once, and nothing is broadcast to [b, h, L, r] (matmul would materialize that copy).
        rows = (batch_size, num_heads * seq_length, -1)
        scores = torch.bmm(q_lat.reshape(rows), latent.transpose(1, 2))
        scores = scores + torch.bmm(q_pe.reshape(rows), k_pe.transpose(1, 2))
        scores = scores.view(batch_size, num_heads, seq_length, kv_length) * self.scaling
        if attention_mask is not None:
            mask = attention_mask[..., :kv_length]
            if mask.dtype == torch.bool:
                # finfo.min rather than -inf, as the eager mask does: a fully masked row (a left-pad
                # query) then averages instead of producing NaN that 0-weights would spread.
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        elif causal_if_unmasked:
            # SDPA's `is_causal` is upper-left aligned: query i sees keys j <= i. Transformers only
            # drops the mask when that equals the true mask (kv_len == q_len, or an empty cache).
            future = torch.ones(seq_length, kv_length, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        # float32 softmax for 16/32-bit models, as transformers does. A float64 model stays float64
        # (eager would round it to float32, where its finfo(float64).min mask becomes -inf and a
        # fully masked pad row turns to NaN).
        softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
        probs = nn.functional.softmax(scores, dim=-1, dtype=softmax_dtype).to(q_nope.dtype)
        out_lat = torch.bmm(probs.reshape(rows), latent).view(batch_size, num_heads, seq_length, -1)
        # sum_j p_j (W_UV c_j) = W_UV (sum_j p_j c_j): W_UV is applied once per query, not per cached token.
        out = torch.einsum("bhsr,hvr->bshv", out_lat, w_uv).reshape(batch_size, seq_length, -1)
        return self.o_proj(out), probs

    def _absorbed_forward(self, hidden_states, position_embeddings, attention_mask, cache, kwargs):
        q_nope, q_pe, latent, k_pe = self._project(hidden_states, position_embeddings)
        if cache is not None:
            # The original module's exact cache call: the cache keeps the same contents and layout.
            latent, k_pe = cache.update(latent, k_pe, self.layer_idx, kwargs=kwargs)
        # Mirrors transformers' sdpa_attention_forward; eager applies no mask when given none.
        causal_if_unmasked = (
            self.config._attn_implementation == "sdpa"
            and hidden_states.shape[1] > 1
            and kwargs.get("is_causal", self.is_causal)
        )
        return self._attend_absorbed(q_nope, q_pe, latent, k_pe, attention_mask, causal_if_unmasked)


class AbsorbedDeepseekV3Attention(_AbsorbedMLA, _v3.DeepseekV3Attention):
    """DeepseekV3Attention that decodes in latent space. Built by `patch`, not directly."""

    def _rope(self, q_pe, k_pe, position_embeddings):
        cos, sin = position_embeddings
        if self.config.rope_interleave:
            return _v3.apply_rotary_pos_emb_interleave(q_pe, k_pe, cos, sin)
        return _v3.apply_rotary_pos_emb(q_pe, k_pe, cos, sin)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        """Same signature and outputs as DeepseekV3Attention.forward: (out [b, s, hidden], weights)."""
        if not self._uses_absorbed(hidden_states, attention_mask):
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        return self._absorbed_forward(hidden_states, position_embeddings, attention_mask, cache, kwargs)


class AbsorbedDeepseekV2Attention(_AbsorbedMLA, _v2.DeepseekV2Attention):
    """DeepseekV2Attention that decodes in latent space. Built by `patch`, not directly."""

    def _rope(self, q_pe, k_pe, position_embeddings):
        return _v2.apply_rotary_emb(q_pe, k_pe, position_embeddings.to(q_pe.device))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        """Same signature and outputs as DeepseekV2Attention.forward: (out [b, s, hidden], weights)."""
        if not self._uses_absorbed(hidden_states, attention_mask):
            return super().forward(
                hidden_states, attention_mask, cache=cache, position_embeddings=position_embeddings, **kwargs
            )
        return self._absorbed_forward(hidden_states, position_embeddings, attention_mask, cache, kwargs)


_ADAPTERS = {
    _v3.DeepseekV3Attention: AbsorbedDeepseekV3Attention,
    _v2.DeepseekV2Attention: AbsorbedDeepseekV2Attention,
}
_ORIGINALS = {adapter: original for original, adapter in _ADAPTERS.items()}


def patch(model: nn.Module, max_absorbed_query_len: int = DEFAULT_MAX_ABSORBED_QUERY_LEN) -> nn.Module:
    """Make every DeepseekV2Attention / DeepseekV3Attention in `model` decode in latent space.

    Each module is converted in place to its adapter subclass (`AbsorbedDeepseekV2Attention` /
    `AbsorbedDeepseekV3Attention`): the same object with the same parameters, buffers and hooks,
    so state_dict, optimizers and references to the module are unaffected. Calls with at most
    `max_absorbed_query_len` query tokens and an eager or SDPA attention implementation run the
    absorbed form; everything else (prefill, flash/flex attention, attention dropout in training)
    runs the original code.
    The transformers cache is updated exactly as before.

    Args:
        model: any nn.Module containing DeepSeek-V2/V3 attention modules (e.g. DeepseekV3ForCausalLM).
        max_absorbed_query_len: longest query (tokens per sequence in one call) run absorbed, >= 1.
    Returns:
        `model`, patched. Patching again only updates `max_absorbed_query_len`.
    Raises:
        TypeError: `model` is not an nn.Module, or `max_absorbed_query_len` not an int.
        ValueError: no DeepSeek-V2/V3 attention in `model`, `max_absorbed_query_len` < 1, or a
            module whose `forward` was replaced on the instance (e.g. accelerate hooks: patch before
            dispatching), which would bypass the adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(max_absorbed_query_len, bool) or not isinstance(max_absorbed_query_len, int):
        raise TypeError(f"patch: max_absorbed_query_len must be an int, got {type(max_absorbed_query_len).__name__}")
    if max_absorbed_query_len < 1:
        raise ValueError(f"patch: max_absorbed_query_len must be >= 1, got {max_absorbed_query_len}")
    targets = [(name, m) for name, m in model.named_modules() if type(m) in _ADAPTERS or type(m) in _ORIGINALS]
    if not targets:
        raise ValueError(f"patch: {type(model).__name__} contains no DeepseekV2Attention or DeepseekV3Attention module")
    for name, module in targets:
        if "forward" in vars(module):
            raise ValueError(
                f"patch: module {name!r} has its forward replaced on the instance (accelerate/device-map hooks?); "
                "patch the model before dispatching it"
            )
    for _, module in targets:
        module.__class__ = _ADAPTERS.get(type(module), type(module))
        module.max_absorbed_query_len = max_absorbed_query_len
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: adapters go back to their transformers class. Returns `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        original = _ORIGINALS.get(type(module))
        if original is not None:
            for attr in ("max_absorbed_query_len", "_absorbed_weights_key", "_absorbed_weights_value"):
                module.__dict__.pop(attr, None)
            module.__class__ = original
    return model
