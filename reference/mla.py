"""Plain MLA attention math, in the two forms the library is built on.

Both take the projected queries and the compressed cache of one layer and return the
per-head attention output before o_proj. Shapes:
    q_nope [b, s_q, h, qk_nope_head_dim], q_pe [b, s_q, h, qk_rope_head_dim]
    latent [b, s_k, kv_lora_rank] (after kv_a_layernorm), k_pe [b, s_k, qk_rope_head_dim] (roped)
    w_kv_b [h * (qk_nope_head_dim + v_head_dim), kv_lora_rank]: kv_b_proj.weight
    returns [b, s_q, h, v_head_dim]
With `causal`, query i sees keys j <= s_k - s_q + i (the queries are the last s_q keys).
"""

from __future__ import annotations

import torch


def _causal_mask(s_q: int, s_k: int, device) -> torch.Tensor:
    """[s_q, s_k] True where query i may see key j."""
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    return j <= s_k - s_q + i


def split_kv_b(w_kv_b: torch.Tensor, num_heads: int, v_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj.weight -> (W_UK [h, qk_nope_head_dim, r], W_UV [h, v_head_dim, r])."""
    w = w_kv_b.view(num_heads, -1, w_kv_b.shape[-1])
    return w[:, : w.shape[1] - v_head_dim], w[:, w.shape[1] - v_head_dim :]


def mla_naive(q_nope, q_pe, latent, k_pe, w_kv_b, v_head_dim: int, softmax_scale: float, causal: bool = True):
    """Decompress K and V for every cached token, then ordinary multi-head attention."""
    h = q_nope.shape[2]
    w_uk, w_uv = split_kv_b(w_kv_b, h, v_head_dim)
    k_nope = torch.einsum("bsr,hdr->bshd", latent, w_uk)
    v = torch.einsum("bsr,hvr->bshv", latent, w_uv)
    scores = torch.einsum("bqhd,bkhd->bhqk", q_nope, k_nope) + torch.einsum("bqhd,bkd->bhqk", q_pe, k_pe)
    scores = scores * softmax_scale
    if causal:
        scores = scores.masked_fill(~_causal_mask(q_nope.shape[1], latent.shape[1], scores.device), float("-inf"))
    return torch.einsum("bhqk,bkhv->bqhv", scores.softmax(dim=-1), v)


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """Fold W_UK into the query: [b, s_q, h, qk_nope_head_dim] -> [b, s_q, h, kv_lora_rank]."""
    return torch.einsum("bshd,hdr->bshr", q_nope, w_uk)


def mla_absorbed(q_nope, q_pe, latent, k_pe, w_kv_b, v_head_dim: int, softmax_scale: float, causal: bool = True):
    """Attend in latent space (multi-query attention over [latent, k_pe]), then apply W_UV.

    Equal to `mla_naive` by associativity: q_nope . (W_UK c) = (W_UK^T q_nope) . c and
    sum_j p_j (W_UV c_j) = W_UV (sum_j p_j c_j), but reads only the latent per token.
    """
    h = q_nope.shape[2]
    w_uk, w_uv = split_kv_b(w_kv_b, h, v_head_dim)
    q_lat = absorb_query(q_nope, w_uk)
    scores = torch.einsum("bqhr,bkr->bhqk", q_lat, latent) + torch.einsum("bqhd,bkd->bhqk", q_pe, k_pe)
    scores = scores * softmax_scale
    if causal:
        scores = scores.masked_fill(~_causal_mask(q_nope.shape[1], latent.shape[1], scores.device), float("-inf"))
    o_lat = torch.einsum("bhqk,bkr->bqhr", scores.softmax(dim=-1), latent)
    return torch.einsum("bqhr,hvr->bqhv", o_lat, w_uv)
