"""`V4Attention`: one DeepSeek-V4 attention layer as a PyTorch module: the cache-free path
(whole sequences, causal, differentiable: training, and the ground truth) and the cached path
over a paged `mla.v4_cache.V4Cache` (prefill chunks and decode steps, proven equal to it in
tests/test_v4_cache.py). Both compute the math below. The cache-free path gathers keys and masks
in PyTorch (`_one_shot_keys`, `_attend`); the cached path writes the cache and attends in one
sparse decode call per layer (`_cached_attend`: `flash_mla_with_kvcache` with the window as
`indices`, the entries as the extra cache and the sinks), on the Triton kernels or their
PyTorch twins (`backend`).

Every layer is shared-KV multi-query attention (one KV head of head_dim that is both K and V)
with a per-head attention sink. For query token t (positions 0 ... s - 1 of one sequence):

    q_t     = rope_t(rms(q_b(q_a_norm(q_a(x_t)))))         per head, rms without a weight
    kv_j    = rope_j(kv_norm(kv_proj(x_j)))                 [head_dim], K = V
    keys(t) = window: tokens j with t - sliding_window < j <= t (every layer)
              + compressed entries w the layer kind lets t see (below)
    o_t     = sum_{k in keys(t)} p_k kv_k,  p = softmax over [q_t . k * head_dim^-0.5 | sink_h]
              (the sink is one more logit per head whose value is dropped)
    out_t   = o_b(grouped o_a(rope_t^-1(o_t)))

RoPE rotates the LAST rope_dim channels in interleaved pairs. Because V = K carries rotated
channels, the output's rope slice is rotated back by the query's angle, so each key's share
depends on its distance to t only. The output projection splits the heads' concatenated
[h * head_dim] output into o_groups groups, maps each through its own o_lora_rank block of
o_a_proj, then mixes them with o_b_proj. Sliding layers use plain RoPE with rope_theta; CSA and
HCA layers use compress_rope_theta with the YaRN frequencies of rope_scaling, for every rotation
of the layer (query, window keys, entries, indexer).

Compressed entries (`mla.reference.compressor.pool`). With rate m, entry w is a softmax-gated pooling of tokens,
kv_norm-ed and roped at position w * m (its window's first token):
  - HCA (m' = 128): the m' tokens w m' ... (w + 1) m' - 1, per channel
    softmax_j(gate_j + position_bias[j mod m']) weighting kv_j.
  - CSA (m = 4, overlapping): kv_proj / gate_proj are 2 * head_dim wide; entry w pools 2m
    slots: the first head_dim channels of tokens (w - 1) m ... w m - 1 and the last head_dim
    channels of tokens w m ... (w + 1) m - 1 (entry 0 has only the second half).
Visibility (DeepSeek's `get_compress_topk_idxs` and Indexer mask, transformers'
`causal_threshold`): query t sees entry w iff w < (t + 1) // m, i.e. once the entry's last
token (w + 1) m - 1 <= t; an entry is never seen by a token inside its own window before it
closes, and the overlapping CSA entry w (which reads tokens from (w - 1) m) becomes visible
when its own window closes. HCA layers attend every visible entry; CSA layers attend the
index_topk visible entries with the highest lightning-indexer scores

    score(t, w) = sum_h w_h(x_t) * relu(qI_{t,h} . kI_w),   w_h = weights_proj(x_t) * (H D)^-0.5

with qI = rope_t(indexer.q_b(q_resid)) (H heads of D = index_head_dim) and kI_w the indexer's
own overlapping pooling at D (same rule, own weights). A query with fewer visible entries than
index_topk attends all of them. The choice is `mla.reference.indexer.index_topk`'s exact top-k
with ties to the lower position.

Why the tie rule matters (the CSA decode / one-shot disagreement). DeepSeek's reference and
transformers both call `torch.topk`, whose order among equal scores is unspecified. ReLU makes
exact zeros common (an entry every index head scores negatively gets 0.0), and a zero at the
k-th place ties. Evidence, on a tiny 2-layer CSA DeepseekV4ForCausalLM (transformers 5.24,
hidden 64, 4 heads of 32, rope 8, window 8, m = 4, 4 index heads of 16, float32, eager, 40
tokens, prefill 20 then 20 cached steps): with index_topk 3 the cached steps disagree with the
one-shot forward from the 3rd step on (max logit difference 0.049 on logits of 0.59; with
index_topk 4: 0.057); index_topk 2 and >= the entry count agree to 2.4e-7, as do sliding and
HCA models. Spying on every `topk` call: each row whose choice differed from a stable
descending sort had a tie at the k-th score, the tied value always exactly 0.0, and no row
differed without one. Replacing `Tensor.topk` by `torch.sort(scores, descending=True,
stable=True)` makes the cached steps equal the one-shot forward to 1.8e-7 for every
index_topk. Visibility is not the cause: one-shot, prefill with a cache and decode apply the
same (t + 1) // m rule (identical prefill logits with and without a cache). The same tie
separates this module from transformers' one-shot layer: on tests/test_v4_attention.py's CSA
layer (9 entries, index_topk 3) they differ by 0.32 with torch.topk and agree to float32
rounding (6e-7, transformers' own float32 error) once its top-k is stable. So neither
transformers nor DeepSeek's code defines which tied entry wins; DeepSeek's semantics are "the
index_topk best visible entries", and we make them a function of the query alone by breaking
ties to the lower position, as for V3.2 (`mla.attention`).

Sources and where they differ (DeepSeek's inference/model.py of DeepSeek-V4, read in the
Nicooo-Wang/DeepSeek-V4-Pro-code copy, against transformers 5.24 modeling_deepseek_v4.py). All
agree in exact arithmetic except where noted; we follow DeepSeek unless it simulates
quantization:
  - DeepSeek simulates FP8 (block 64) on the window's and entries' non-rope channels and FP4
    plus a Hadamard rotation on the indexer's queries and keys (quantization-aware training);
    transformers does not. We do not either: the cache formats (`mla.formats`) own
    quantization, and the Hadamard transform is orthogonal (scores unchanged in exact math).
  - DeepSeek's compressors project and pool in float32 and cast to the model dtype before
    kv_norm; transformers projects in the model dtype and pools in it with float32 softmax
    weights. We pool in at least float32 and cast before kv_norm (DeepSeek); the projections
    run in the module dtype (both agree in float32).
  - transformers casts cos / sin to the activation dtype before rotating; DeepSeek rotates by
    float32 angles. We rotate in at least float32 with float32 tables (DeepSeek).
  - The attention softmax: DeepSeek's kernel accumulates in float32 with the sink as a key of
    value 0 in the denominator (read in the copy's pure-PyTorch `sparse_attn`, kernel.py),
    transformers' eager path appends the sink as a logit and softmaxes in the logits' dtype.
    Same math; we use at least float32.
  - The query's per-head RMS (no weight): DeepSeek in the activation dtype, transformers and we
    in float32.
  - Norm weights are float32 in both; ours take the module dtype (`mla.attention.RMSNorm`),
    and transformers' norms round float64 activations to float32 (why float64 comparisons
    against it agree only to float32 rounding).
  - transformers' default compress_rope_theta is 160000, DeepSeek's ModelArgs default 40000;
    the checkpoint config decides (`V4Config.from_hf`).
These differences are bfloat16-level; in float32 our module equals transformers' to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from mla import ops
from mla.attention import RMSNorm, check_tokens, chosen_mask
from mla.backend import check_backend, resolve_backend
from mla.cache import LatentCache
from mla.formats import index_key_format
from mla.reference.compressor import pool
from mla.rope import RotaryEmbedding
from mla.v4 import CSA, HCA, SLIDING, V4Config
from mla.v4_cache import V4Cache


def rotate_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """V4's RoPE: rotate the last 2 * cos.shape[-1] channels of x in interleaved pairs and
    keep the layout (`mla.rope.apply_rope` returns the half-split layout, but here V = K
    carries the rope channels into the output projection, whose weights expect the
    checkpoint's order).

    Args:
        x: [..., head] in any float dtype.
        cos, sin: float32 [..., rope / 2], broadcastable against x's leading dims; negate sin
            to rotate back.

    Returns:
        [..., head] in x's dtype, rotated in at least float32.
    """
    r = 2 * cos.shape[-1]
    compute = torch.promote_types(x.dtype, torch.float32)
    pairs = x[..., -r:].to(compute).unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], rotated.to(x.dtype)], dim=-1)


def v4_rotary(config: V4Config, kind: str) -> RotaryEmbedding:
    """The rotary tables of a layer of `kind`: plain rope_theta for sliding layers,
    compress_rope_theta with rope_scaling's YaRN frequencies for CSA / HCA (`mla.rope` owns
    the YaRN formula; it reads only these fields)."""
    compressed = kind != SLIDING
    scaling = config.rope_scaling if compressed else None
    rope = SimpleNamespace(
        qk_rope_head_dim=config.rope_dim,
        rope_theta=config.compress_rope_theta if compressed else config.rope_theta,
        rope_scaling=None if scaling is None else {**scaling, "mscale": 0, "mscale_all_dim": 0},
        rope_interleave=True,
    )
    rotary = RotaryEmbedding(rope)
    rotary.attention_factor = 1.0  # V4 takes YaRN's frequencies only: cos / sin are not scaled
    return rotary


class V4Compressor(nn.Module):
    """A compressor: tokens -> one entry per closed window of m tokens (`pool`, i.e.
    `mla.reference.compressor.pool`, the pooling the compressor kernel's twin runs too; then
    kv_norm, then RoPE at the window's first position). transformers' DeepseekV4HCACompressor /
    DeepseekV4CSACompressor parameters: kv_proj, gate_proj [c * width, hidden], position_bias
    [m, c * width] (float32 in checkpoints), kv_norm [width]; c = 2 when `overlap`."""

    def __init__(self, hidden_size: int, width: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        c = 2 if overlap else 1
        self.overlap = overlap
        self.kv_proj = nn.Linear(hidden_size, c * width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, c * width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, c * width))
        self.kv_norm = RMSNorm(width, eps)

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [b, s, hidden] -> the raw rows [b, s, 2, c * width] (kv_proj, gate_proj)
        that `pool` turns into entries; a cache keeps them for the windows still open."""
        return torch.stack([self.kv_proj(hidden_states), self.gate_proj(hidden_states)], dim=2)

    def pool(self, raw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """raw rows [b, T, 2, c * width] of tokens from a window boundary (`project`), float32
        rotary tables [1 or b, T // m - skip, rope / 2] of the entries' positions -> the entries
        of its whole windows but the first `skip` [b, T // m - skip, width], in raw's dtype (a
        continuation passes the window before its first new one with skip 1: CSA's overlap)."""
        pooled = pool(raw[:, :, 0], raw[:, :, 1], self.position_bias, self.overlap)[:, skip:]
        return rotate_tail(self.kv_norm(pooled), cos, sin)

    def entries(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """hidden_states [b, s, hidden], float32 rotary tables [1, s // m, rope / 2] of the
        entries' positions 0, m, 2m, ... -> entries [b, s // m, width] in hidden_states' dtype."""
        return self.pool(self.project(hidden_states), cos, sin)

    def extra_repr(self) -> str:
        return f"rate={self.position_bias.shape[0]}, overlap={self.overlap}"


class V4IndexScorer(nn.Module):
    """The lightning indexer's head weights: weights_proj [index_n_heads, hidden]
    (transformers' DeepseekV4IndexerScorer)."""

    def __init__(self, config: V4Config):
        super().__init__()
        self.weights_proj = nn.Linear(config.hidden_size, config.index_n_heads, bias=False)
        self.scale = (config.index_n_heads * config.index_head_dim) ** -0.5

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[b, s, hidden] -> float32 [b, s, index_n_heads]: w_h, with both softmax scales folded in."""
        return self.weights_proj(hidden_states).float() * self.scale


class V4Indexer(V4Compressor):
    """CSA's lightning indexer: its own overlapping compressor at index_head_dim (the keys),
    q_b_proj [index_n_heads * index_head_dim, q_lora_rank] (the queries from the attention's
    q_resid) and `scorer` (transformers' DeepseekV4Indexer names)."""

    def __init__(self, config: V4Config):
        c = config
        super().__init__(c.hidden_size, c.index_head_dim, c.compress_rates[CSA], overlap=True, eps=c.rms_norm_eps)
        self.config = config
        self.q_b_proj = nn.Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.scorer = V4IndexScorer(config)

    def select(self, hidden_states, q_resid, cos, sin, entry_cos, entry_sin) -> torch.Tensor:
        """The entries each query of whole sequences attends, as a bool mask [b, s, s // m].

        hidden_states [b, s, hidden], q_resid [b, s, q_lora_rank], float32 rotary tables of the
        tokens [1 or b, s, rope / 2] and of the entries [1, s // m, rope / 2]: `choose` (the
        reference) over the entries viewed as one page per sequence."""
        b, s, _ = hidden_states.shape
        keys = self.entries(hidden_states, entry_cos, entry_sin)  # [b, n, D]
        if keys.dtype == torch.float64:  # scored in float32, as V4Cache.index_dtype stores them for float64
            keys = keys.float()
        device = hidden_states.device
        visible_count = (torch.arange(1, s + 1, device=device) // self.config.compress_rates[CSA]).expand(b, s)
        table = torch.arange(b, dtype=torch.int32, device=device)[:, None]
        chosen = self.choose(hidden_states, q_resid, cos, sin, index_key_format(keys.dtype, self.config.index_head_dim),
                             keys[:, :, None].contiguous(), table, visible_count, "reference")  # fmt: skip
        visible = torch.arange(keys.shape[1], device=device) < visible_count[..., None]
        return chosen_mask(chosen, visible)

    def choose(self, hidden_states, q_resid, cos, sin, key_format, key_pages, table, visible_count, backend,
               page_size=None) -> torch.Tensor:  # fmt: skip
        """Which entries each query attends, from paged indexer keys, through `backend`.

        hidden_states [b, s, hidden], q_resid [b, s, q_lora_rank], float32 rotary tables of the
        queries [1 or b, s, rope / 2]; key_pages [num_pages, P, 1, row] of rows in key_format
        (`mla.formats.index_key_format`: plain keys score the queries in their dtype, MXFP4 ones
        in the queries'), table int32 [b, pages] (entry w of row
        i at row w % P of page table[i, w // P]), visible_count [b, s] the entries query
        (i, t) sees, w < (t + 1) // m. Query t chooses the index_topk best of its visible
        entries (all when fewer), ties to the lower w: `index_scores` with each query its own
        row and visible length, then `index_topk` (`mla.ops.select`).

        Returns:
            int32 [b, s, index_topk], -1 after the last choice: the entries' indices w, or with
            page_size = P their slots in key_pages' rows (table[i, w // P] * P + w % P), the
            sparse decode's `indices` format.
        """
        c = self.config
        b, s, _ = hidden_states.shape
        n = int(visible_count.max())
        if n == 0:
            return torch.full((b, s, c.index_topk), -1, dtype=torch.int32, device=hidden_states.device)
        q = self.q_b_proj(q_resid).view(b, s, c.index_n_heads, c.index_head_dim)
        q = rotate_tail(q, cos[:, :, None], sin[:, :, None])
        weights = self.scorer(hidden_states)
        with torch.no_grad():  # a choice of entries: nothing to differentiate
            chosen, _ = ops.select(
                key_format, q.reshape(b * s, 1, c.index_n_heads, -1),
                weights.reshape(b * s, 1, -1), key_pages, table.repeat_interleave(s, dim=0),
                visible_count.reshape(-1).to(torch.int32), n, None, c.index_topk, page_size, backend,
            )  # fmt: skip
        return chosen.view(b, s, -1)


class V4Attention(nn.Module):
    """One DeepSeek-V4 attention layer (the module docstring has the math), with or without a cache.

    Args:
        config: a V4Config.
        layer_idx: the layer; its kind is config.layer_types[layer_idx].
        backend: the cached path's implementation: "triton" (`mla.kernels`: the sparse decode
            kernel, the indexer's scores and top-k), "reference" (their PyTorch twins, any dtype
            and device), or None (`mla.backend`'s rule; the reference over a float64 cache).
            The cache-free path is PyTorch always.

    Parameters (transformers' DeepseekV4Attention names, so its state dicts load as they are):
        q_a_proj [q_lora_rank, hidden], q_a_norm [q_lora_rank], q_b_proj [h * head_dim,
        q_lora_rank], kv_proj [head_dim, hidden], kv_norm [head_dim], o_a_proj
        [o_groups * o_lora_rank, h * head_dim / o_groups], o_b_proj [hidden, o_groups *
        o_lora_rank], sinks [h]; CSA / HCA layers also `compressor` (`V4Compressor`), CSA
        layers `compressor.indexer` (`V4Indexer`).
    """

    def __init__(self, config: V4Config, layer_idx: int, backend: str | None = None):
        super().__init__()
        self.backend = check_backend(backend)
        if not isinstance(config, V4Config):
            raise TypeError(f"config must be a V4Config, got {type(config).__name__}")
        n = len(config.layer_types)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < n:
            raise ValueError(f"layer_idx must be an int in [0, {n}), got {layer_idx!r}")
        c, h = config, config.num_heads
        self.config, self.layer_idx = config, layer_idx
        self.kind = c.layer_types[layer_idx]
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, h * c.head_dim, bias=False)
        self.kv_proj = nn.Linear(c.hidden_size, c.head_dim, bias=False)
        self.kv_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.o_a_proj = nn.Linear(h * c.head_dim // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(c.o_groups * c.o_lora_rank, c.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h))
        self.compressor = None
        if self.kind != SLIDING:
            rate = c.compress_rates[self.kind]
            self.compressor = V4Compressor(c.hidden_size, c.head_dim, rate, self.kind == CSA, c.rms_norm_eps)
            if self.kind == CSA:
                self.compressor.indexer = V4Indexer(config)
        self.rotary = v4_rotary(config, self.kind)
        self.softmax_scale = c.head_dim**-0.5

    @classmethod
    def from_hf(cls, hf_attention: nn.Module, backend: str | None = None) -> V4Attention:
        """Copy a transformers DeepseekV4Attention (weights, dtype, device)."""
        module = cls(V4Config.from_hf(hf_attention.config), hf_attention.layer_idx, backend)
        weight = hf_attention.q_b_proj.weight
        module.to(device=weight.device, dtype=weight.dtype)
        module.load_state_dict(hf_attention.state_dict())
        return module

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: V4Cache | None = None,
        seq_ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Causal attention of b sequences: whole sequences without a cache (differentiable), or
        s new tokens of each cached sequence.

        Args:
            hidden_states: [b, s, hidden_size], float.
            positions: integer [b, s], the rotary positions; default the tokens' indices in
                their sequences (0 ... s - 1 without a cache; after the tokens the layer already
                holds with one). Compressed windows are aligned to token 0, so in CSA / HCA
                layers they must be those indices (a sliding layer takes any).
            cache: None, or a `mla.v4_cache.V4Cache` for this config. The s new tokens of each
                sequence must be reserved (`cache.reserve(seq_ids, s)`); they are appended to
                what this layer holds: window rows and compressor rows written, windows their
                last token closes pooled into entries (and CSA indexer keys), then attention
                over the cached window, entries and sink. Sequences may hold different lengths
                (one s per call). Rows are stored in the cache's dtype: with the module's dtype
                the result equals the one-shot rows of the same tokens up to summation order.
            seq_ids: with a cache, the b sequence ids, one per row of hidden_states.

        Returns:
            [b, s, hidden_size] in hidden_states' dtype.
        """
        c, h = self.config, self.config.num_heads
        b, s = self._check_inputs(hidden_states, positions)
        device = hidden_states.device
        if cache is None:
            if seq_ids is not None:
                raise ValueError("seq_ids without a cache: pass cache= too, or neither")
            starts = [0] * b
        else:
            seq_ids, starts = self._begin_step(cache, seq_ids, b, s)
        tokens = torch.tensor(starts, device=device)[:, None] + torch.arange(s, device=device)  # [b, s]
        self._check_positions(positions, tokens)
        cos, sin = self.rotary((tokens if positions is None else positions).to(device))  # [b, s, rope / 2]

        q_resid = self.q_a_norm(self.q_a_proj(hidden_states))
        q = self.q_b_proj(q_resid).view(b, s, h, c.head_dim)
        # per-head RMS without a weight, normalized in at least float32
        q32 = q.to(torch.promote_types(q.dtype, torch.float32))
        q = (q32 * torch.rsqrt(q32.square().mean(-1, keepdim=True) + c.rms_norm_eps)).to(q.dtype)
        q = rotate_tail(q, cos[:, :, None], sin[:, :, None])
        kv = rotate_tail(self.kv_norm(self.kv_proj(hidden_states)), cos, sin)  # [b, s, head_dim]

        if cache is None:
            keys, visible = self._one_shot_keys(hidden_states, q_resid, kv, cos, sin)
            out = self._attend(q, keys, visible)  # [b, s, h, head_dim]
        else:
            out = self._cached_attend(cache, seq_ids, starts, tokens, hidden_states, q_resid, q, kv, cos, sin)
        out = rotate_tail(out, cos[:, :, None], -sin[:, :, None])  # undo the keys' rotation on V = K
        grouped = out.reshape(b, s, c.o_groups, -1)  # [b, s, g, h * head_dim / g]
        w = self.o_a_proj.weight.view(c.o_groups, c.o_lora_rank, -1)  # [g, r, h * head_dim / g]
        return self.o_b_proj(torch.einsum("bsgd,grd->bsgr", grouped, w).flatten(2))

    def _one_shot_keys(self, hidden_states, q_resid, kv, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole sequences: keys [b, s + n, head_dim] (the tokens' rows, then the n entries) and
        bool visible [b, s, s + n]."""
        b, s, _ = hidden_states.shape
        token = torch.arange(s, device=hidden_states.device)
        visible = self._window_mask(token.expand(b, s), token.expand(b, s)[:, None])
        if self.compressor is None:
            return kv, visible
        entries, entry_mask = self._entries(hidden_states, q_resid, cos, sin)
        return torch.cat([kv, entries], dim=1), torch.cat([visible, entry_mask], dim=-1)

    def _window_mask(self, tokens: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Queries at token indices [b, s] see keys at token indices [b, 1 or s, L] (-1: none)
        iff t - sliding_window < j <= t: bool [b, s, L]."""
        offset = tokens[..., None] - keys  # query minus key
        return (keys >= 0) & (offset >= 0) & (offset < self.config.sliding_window)

    def _entries(self, hidden_states, q_resid, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's compressed entries [b, n, head_dim] and which each query attends, bool
        [b, s, n]: all visible ones (HCA) or the indexer's choice among them (CSA)."""
        b, s, _ = hidden_states.shape
        m = self.config.compress_rates[self.kind]
        device = hidden_states.device
        entry_cos, entry_sin = self.rotary(torch.arange(s // m, device=device)[None] * m)  # positions w * m
        entries = self.compressor.entries(hidden_states, entry_cos, entry_sin)
        if self.kind == CSA:
            return entries, self.compressor.indexer.select(hidden_states, q_resid, cos, sin, entry_cos, entry_sin)
        token = torch.arange(s, device=device)
        visible = torch.arange(entries.shape[1], device=device) < ((token + 1) // m)[:, None]  # [s, n]
        return entries, visible.expand(b, s, -1)

    def _begin_step(self, cache, seq_ids, b: int, s: int) -> tuple[list[int], list[int]]:
        """Validate the cache and ids once: (ids as ints, each sequence's first new token)."""
        if not isinstance(cache, V4Cache):
            raise TypeError(
                f"cache must be a mla.v4_cache.V4Cache, got {type(cache).__name__}"
                + (" (a V3 cache: V4 layers need window rows, entries and compressor state)"
                   if isinstance(cache, LatentCache) else "")
            )  # fmt: skip
        if seq_ids is None or isinstance(seq_ids, (str, bytes)) or len(seq_ids) != b:
            raise ValueError(f"seq_ids must list one sequence id per row of hidden_states ({b}), got {seq_ids!r}")
        cache.check_fits(self.layer_idx, self.config)
        return cache.step_starts(self.layer_idx, seq_ids, s)

    def _cached_attend(self, cache, ids, starts, tokens, hidden_states, q_resid, q, kv, cos, sin) -> torch.Tensor:
        """Append the new tokens (token indices [b, s]) to the cache (window rows, compressor
        rows, closed entries and indexer keys), then attend in one sparse decode call
        (`mla.ops.attend_lists`): each query's window as `indices` into the window rows, the
        entries it sees (every visible one for HCA, the indexer's choice for CSA) as the extra
        cache's slots, and the sinks. Returns [b, s, h, head_dim] in q's dtype."""
        b, s, _ = hidden_states.shape
        layer, device, window = self.layer_idx, hidden_states.device, self.config.sliding_window
        backend = self._cached_backend(cache, device)
        token_slots = [cache.slots(sid, start, start + s) for sid, start in zip(ids, starts)]
        for i, slots in enumerate(token_slots):
            cache.write(layer, "kv", slots, kv[i])
        cache.advance(layer, ids, s)
        # query start + j attends tokens start + j - window + 1 ... start + j (those >= 0)
        reach = torch.arange(s)[:, None] + torch.arange(1 - window, 1)  # [s, window]
        rows = []
        for sid, start in zip(ids, starts):
            lo = max(0, start - window + 1)
            held = cache.slots(sid, lo, start + s)
            offset = (start + reach - lo).to(held.device)
            rows.append(torch.where(offset >= 0, held[offset.clamp_min(0)], -1))
        indices = torch.stack(rows).to(torch.int32)  # [b, s, window]

        pages = cache.kvcache(layer, "kv")
        extra = extra_slots = None
        if self.compressor is not None:
            extra_slots = self._cached_entries(cache, ids, starts, tokens, hidden_states, q_resid, cos, sin, token_slots,
                                               backend)  # fmt: skip
            extra = None if extra_slots is None else cache.kvcache(layer, "entries")
        out = ops.attend_lists(
            q, pages, indices, self.config.head_dim, self.softmax_scale, cache.is_fp8, backend,
            self.sinks.detach().float(), extra, extra_slots,
        )  # fmt: skip
        return out.to(q.dtype)

    def _cached_backend(self, cache, device) -> str:
        """The backend of the cached path: the module's, or `mla.backend`'s rule; a float64
        cache (for exactness tests) runs the reference, as the kernels read 16- and 32-bit rows."""
        if cache.dtype == torch.float64:
            if self.backend == "triton":
                raise ValueError("backend='triton' reads bfloat16 / float16 / float32 caches, got a float64 V4Cache")
            return "reference"
        return resolve_backend(self.backend, device)

    def _cached_entries(self, cache, ids, starts, tokens, hidden_states, q_resid, cos, sin, token_slots, backend):
        """Store the compressor rows and close the windows the new tokens complete, then list
        the entries each query attends as slots of the layer's entry rows: int32 [b, s, k], -1
        padded, or None while no query sees any."""
        layer, m = self.layer_idx, self.config.compress_rates[self.kind]
        self._close_windows(cache, "raw", "entries", self.compressor, self.compressor.project(hidden_states),
                            ids, starts, token_slots, m, backend)  # fmt: skip
        if self.kind == CSA:
            indexer = self.compressor.indexer
            self._close_windows(cache, "index_raw", "index_keys", indexer, indexer.project(hidden_states),
                                ids, starts, token_slots, m, backend)  # fmt: skip
        visible_count = (tokens + 1) // m  # [b, s]: query t sees entries w < (t + 1) // m
        n = int(visible_count.max())
        if n == 0:
            return None
        if self.kind == CSA:
            key_pages = cache.kvcache(layer, "index_keys")
            return indexer.choose(hidden_states, q_resid, cos, sin, cache.index_format, key_pages,
                                  cache.entry_table(layer, ids), visible_count, backend, page_size=key_pages.shape[1])  # fmt: skip
        held = [cache.entry_slots(layer, sid, 0, (start + tokens.shape[1]) // m) for sid, start in zip(ids, starts)]
        slots = torch.stack([F.pad(h, (0, n - h.shape[0]), value=-1) for h in held])  # [b, n]
        seen = torch.arange(n, device=slots.device) < visible_count.to(slots.device)[..., None]  # [b, s, n]
        return torch.where(seen, slots[:, None], -1).to(torch.int32)

    def _close_windows(self, cache, raw_name, entry_name, compressor, raw, ids, starts, token_slots, m,
                       backend) -> None:  # fmt: skip
        """Store the new tokens' compressor rows `raw` [b, s, 2, width] in cache tensor
        `raw_name`, then pool every window they close (its last token among them) from the
        cached rows into `entry_name`, before anything attends it: with the Triton backend
        `mla.kernels.compressor.write_compressed` (pool, norm, RoPE and write in one kernel),
        else `compressor.pool` and a cache write. CSA's entry w also reads window w - 1, so
        pooling starts one window early and skips that entry."""
        layer, s = self.layer_idx, raw.shape[1]
        for i, (sid, start, slots) in enumerate(zip(ids, starts, token_slots)):
            cache.write(layer, raw_name, slots, raw[i])
            lo, hi = start // m, (start + s) // m  # the entries this step closes: lo ... hi - 1
            if hi == lo:
                continue
            skip = 1 if compressor.overlap and lo > 0 else 0
            rows = cache.read(layer, raw_name, cache.slots(sid, (lo - skip) * m, hi * m))
            entry_cos, entry_sin = self.rotary(torch.arange(lo, hi, device=raw.device)[None] * m)
            entry_slots = cache.entry_slots(layer, sid, lo, hi)
            if backend != "triton":
                entries = compressor.pool(rows[None].to(raw.dtype), entry_cos, entry_sin, skip)[0]
                cache.write(layer, entry_name, entry_slots, entries)
                continue
            from mla.kernels import compressor as kernels  # Triton loads on first use, as in mla.ops

            d = compressor.kv_norm.weight.shape[0]
            window = rows[skip * m :].unflatten(0, (hi - lo, m))  # [n, m, 2, c * d]
            before = rows[:m, :, :d] if skip else None  # the previous window's Ca half
            args = (window[:, :, 0], window[:, :, 1], compressor.position_bias, compressor.kv_norm.weight,
                    entry_cos[0], entry_sin[0], None if before is None else before[:, 0],
                    None if before is None else before[:, 1], self.config.rms_norm_eps)  # fmt: skip
            if entry_name == "index_keys" and cache.index_format.is_fp4:
                # no kernel writes MXFP4 rows: pool in the kernel, pack on the host
                cache.write(layer, entry_name, entry_slots, kernels.compress(*args, raw.dtype))
                continue
            pages = getattr(cache.layers[layer], entry_name)  # MODEL1 pages, or plain rows
            pages = pages.unsqueeze(2) if pages.dim() == 3 else pages  # plain: [num_pages, P, 1, width]
            # MODEL1 pages quantize the module's values; plain pages round to their own dtype
            kernels.write_compressed(pages, cache.page_size, entry_slots, *args,
                                     raw.dtype if pages.dtype == torch.uint8 else None)  # fmt: skip

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """q [b, s, h, d], kv [b, L, d] (K = V), bool visible [b, s, L] (every query sees at
        least itself) -> [b, s, h, d]: softmax over the visible keys and the head's sink, in at
        least float32."""
        compute = torch.promote_types(q.dtype, torch.float32)
        logits = torch.einsum("bshd,bld->bhsl", q.to(compute), kv.to(compute)) * self.softmax_scale
        logits = logits.masked_fill(~visible[:, None], -math.inf)
        b, h, s, _ = logits.shape
        # float32 sinks, as DeepSeek keeps them and the decode kernels take them
        sink = self.sinks.float().to(compute).view(1, h, 1, 1).expand(b, h, s, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]  # the sink's share is dropped
        return torch.einsum("bhsl,bld->bshd", probs, kv.to(compute)).to(q.dtype)

    def _check_inputs(self, hidden_states, positions) -> tuple[int, int]:
        b, s = check_tokens(hidden_states, self.config.hidden_size, positions, required=False)
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be a float tensor, got {hidden_states.dtype}")
        return b, s

    def _check_positions(self, positions, tokens: torch.Tensor) -> None:
        """CSA / HCA windows are aligned to token 0: their positions must be the tokens' indices [b, s]."""
        if positions is None or self.compressor is None:
            return
        if not torch.equal(positions.long(), tokens.to(positions.device)):
            rows = sorted({(int(r[0]), int(r[-1])) for r in tokens})
            expected = ", ".join(f"{a} ... {z}" for a, z in rows)
            raise ValueError(
                f"a {self.kind} layer's compressed windows start at token 0: positions must be the tokens' "
                f"indices {expected} in every row, got {positions.tolist()}"
            )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layer_idx={self.layer_idx}, kind={self.kind}, heads={c.num_heads}, head_dim={c.head_dim}, "
            f"rope_dim={c.rope_dim}, sliding_window={c.sliding_window}, backend={self.backend or 'auto'}"
        )

