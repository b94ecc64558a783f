"""`MLAttention`: DeepSeek-V2/V3 multi-head latent attention over the paged latent cache.

Per token the layer caches only the normalized latent c = kv_a_layernorm(W_DKV x) [r] and the
roped shared key k_pe [dr]. Per head, K = [W_UK c | k_pe] and V = W_UV c, with W_UK and W_UV
the two halves of kv_b_proj. Two ways to attend:

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mla.cache import LatentCache
from mla.config import MLAConfig
from mla.reference import flash_mla_with_kvcache as reference_flash_mla
from mla.reference import dequantize_latent_fp8, split_kv_b
from mla.rope import RotaryEmbedding, apply_rope, softmax_scale

# Calls adding at most this many tokens per sequence attend in the absorbed form through the
# decode kernel (decode and speculative verification); longer ones take the prefill path.
DECODE_MAX_TOKENS = 8
BACKENDS = ("triton", "reference")
# what the FP8 cache's quantizer takes
_FP8_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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


@dataclass
class AttentionMetadata:
    """What every layer of one forward call shares; `AttentionMetadata.build` makes it once.

    Attributes:
        seq_ids: the b sequences, in batch order.
        positions: int64 [b, s], the new tokens' positions: the last s of each sequence.
        slots: int64 [b * s], their flat cache slots (`LatentCache.slot_mapping`).
        block_table: int32 [b, max_pages]; seqlens: int32 [b], lengths including the new tokens.
        max_seqlen: max of seqlens, on the host.
        cos, sin: float32 [b, s, qk_rope_head_dim // 2], rotary tables of `positions`.
        kernel_schedule: the Triton decode kernel's split plan (`get_mla_metadata`), made by
            the first layer that needs it.
    """

    seq_ids: list[int]
    positions: torch.Tensor
    slots: torch.Tensor
    block_table: torch.Tensor
    seqlens: torch.Tensor
    max_seqlen: int
    cos: torch.Tensor
    sin: torch.Tensor
    kernel_schedule: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, cache, seq_ids, num_new_tokens: int, rotary: RotaryEmbedding) -> AttentionMetadata:
        """For a call adding `num_new_tokens` to each sequence, after `cache.reserve(seq_ids, num_new_tokens)`."""
        seq_ids = list(seq_ids)
        lengths = [cache.length(sid) for sid in seq_ids]
        short = [(sid, n) for sid, n in zip(seq_ids, lengths) if n < num_new_tokens]
        if short:
            raise ValueError(
                f"sequences (id, length) {short} hold fewer than the {num_new_tokens} new tokens; "
                "call cache.reserve(seq_ids, num_new_tokens) first"
            )
        positions = torch.tensor(lengths)[:, None] - num_new_tokens + torch.arange(num_new_tokens)  # [b, s]
        slots = cache.slot_mapping(seq_ids, positions)
        positions = positions.to(cache.device)
        cos, sin = rotary(positions)
        return cls(
            seq_ids=seq_ids,
            positions=positions,
            slots=slots,
            block_table=cache.block_table(seq_ids),
            seqlens=cache.seqlens(seq_ids),
            max_seqlen=max(lengths),
            cos=cos,
            sin=sin,
        )


class MLAttention(nn.Module):
    """Multi-head latent attention with the parameters of transformers' DeepseekV3Attention.

    Args:
        config: the attention dimensions.
        layer_idx: which of the cache's layers this module writes and reads.
        backend: "triton" (`mla.kernels`, CUDA or TRITON_INTERPRET=1), "reference"
            (`mla.reference`, any device), or None: Triton on CUDA tensors, else reference.
            Chooses the decode attention; the prefill path is PyTorch on both.

    Parameters (names as in transformers, so its state dicts load as they are):
        q_proj [h * qk_head_dim, hidden] when q_lora_rank is None, else q_a_proj, q_a_layernorm,
        q_b_proj; kv_a_proj_with_mqa [r + dr, hidden], kv_a_layernorm [r], kv_b_proj
        [h * (nope + v), r], o_proj [hidden, h * v].
    """

    def __init__(self, config: MLAConfig, layer_idx: int = 0, backend: str | None = None):
        super().__init__()
        if not isinstance(config, MLAConfig):
            raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
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
        self._absorbed_key = None
        self._absorbed = None

    @classmethod
    def from_hf(cls, hf_attention: nn.Module, backend: str | None = None) -> MLAttention:
        """Copy a transformers DeepseekV2Attention / DeepseekV3Attention (weights, dtype, device)."""
        config = MLAConfig.from_hf(hf_attention.config)
        module = cls(config, hf_attention.layer_idx, backend=backend)
        weight = hf_attention.kv_b_proj.weight
        module.to(device=weight.device, dtype=weight.dtype)
        module.load_state_dict(hf_attention.state_dict())
        return module

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [h, nope, r], W_UV [h, v, r]), views of kv_b_proj.weight.

        Made once and reused by every decode step; remade when the weight tensor is replaced
        (`module.to(...)`, `load_state_dict(..., assign=True)`). In-place updates such as a
        plain `load_state_dict` show through the views.
        """
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), w.dtype, w.device, torch.is_grad_enabled())
        if key != self._absorbed_key:
            self._absorbed = split_kv_b(w, self.config.num_heads, self.config.v_head_dim)
            self._absorbed_key = key
        return self._absorbed

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        seq_ids=None,
        metadata: AttentionMetadata | None = None,
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
            metadata: `AttentionMetadata.build(cache, seq_ids, s, rotary)`, shared by all
                layers of one call (models pass it; positions is then not re-checked).

        Returns:
            [b, s, hidden_size] in hidden_states' dtype.
        """
        if cache is None:
            return self._forward_uncached(hidden_states, positions, seq_ids, metadata)
        b, s = self._check_inputs(hidden_states, positions, cache, seq_ids)
        if metadata is None:
            metadata = AttentionMetadata.build(cache, seq_ids, s, self.rotary)
            if not torch.equal(positions.to(metadata.positions.device, torch.int64), metadata.positions):
                raise ValueError(
                    f"positions must be the last {s} positions of each sequence, "
                    f"{metadata.positions.tolist()}, got {positions.tolist()}"
                )
        elif metadata.positions.shape != (b, s) or metadata.seq_ids != list(seq_ids):
            raise ValueError(
                f"metadata was built for sequences {metadata.seq_ids} with positions "
                f"{tuple(metadata.positions.shape)}, not for {list(seq_ids)} with [b={b}, s={s}]"
            )
        q_nope, q_pe, latent, k_pe = self._project(hidden_states, metadata.cos, metadata.sin)
        k_cache = cache.pages[self.layer_idx]
        # an FP8 cache quantizes the module's values as they are (float64 through float32)
        store_dtype = k_cache.dtype
        if cache.is_fp8:
            store_dtype = latent.dtype if latent.dtype in _FP8_INPUT_DTYPES else torch.float32
        cache.write(
            self.layer_idx,
            metadata.slots,
            latent.reshape(b * s, -1).to(store_dtype),
            k_pe.reshape(b * s, -1).to(store_dtype),
        )

        if s <= DECODE_MAX_TOKENS:
            out = self._attend_absorbed(q_nope, q_pe, k_cache, metadata, cache.is_fp8)
        else:
            out = self._attend_decompressed(q_nope, q_pe, k_cache, metadata, cache.is_fp8)
        return self.o_proj(out.flatten(2))  # [b, s, h * v] -> [b, s, hidden]

    def _forward_uncached(self, hidden_states, positions, seq_ids, metadata) -> torch.Tensor:
        """`forward` without a cache: [b, s, hidden] -> [b, s, hidden], causal over the s tokens."""
        if seq_ids is not None or metadata is not None:
            raise ValueError("seq_ids and metadata name cached sequences; pass neither without a cache")
        b, s = self._check_inputs(hidden_states, positions, None, None)
        if positions is None:
            positions = torch.arange(s, device=hidden_states.device)[None]  # [1, s], broadcast over b
        cos, sin = self.rotary(positions.to(hidden_states.device))
        q_nope, q_pe, latent, k_pe = self._project(hidden_states, cos, sin)
        k, v = self._decompress(latent, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [b, s, h, qk]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )  # [b, h, s, v]
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def _project(self, hidden_states, cos, sin):
        """[b, s, hidden] and float32 rotary tables [b or 1, s, dr / 2] -> q_nope [b, s, h, nope],
        roped q_pe [b, s, h, dr], normalized latent [b, s, r], roped k_pe [b, s, dr]."""
        cfg = self.config
        b, s, _ = hidden_states.shape
        if cfg.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(b, s, cfg.num_heads, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], -1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], cfg.rope_interleave)

        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rope(k_pe, cos, sin, cfg.rope_interleave)
        return q_nope, q_pe, latent, k_pe

    def _decompress(self, latent, k_pe) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [b, L, r], k_pe [b, L, dr] -> per-head K [b, L, h, nope + dr], V [b, L, h, v]."""
        cfg = self.config
        b, L, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, L, cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], -1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, cfg.num_heads, -1)], dim=-1)
        return k, v

    def _attend_absorbed(
        self, q_nope, q_pe, k_cache, metadata: AttentionMetadata, is_fp8: bool = False
    ) -> torch.Tensor:
        """[b, s, h, nope], [b, s, h, dr] -> [b, s, h, v] through the decode kernel.

        q goes in the cache dtype. With an FP8 cache the reference attends in the module's
        dtype; the Triton kernel takes a 16-bit q, so a float32 module's q is rounded to
        bfloat16 (float32's range; relative error 2^-9, small beside the cache's 2^-4).
        """
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
        q = torch.cat([q_latent, q_pe], dim=-1)  # [b, s, h, r + dr]
        r = self.config.kv_lora_rank
        backend = self.backend or ("triton" if q.is_cuda else "reference")
        if not is_fp8:
            q = q.to(k_cache.dtype)
        elif backend == "triton" and q.dtype not in (torch.bfloat16, torch.float16):
            q = q.to(torch.bfloat16)
        if backend == "triton":
            from mla.kernels import flash_mla_with_kvcache, get_mla_metadata  # lazy: Triton only when used

            if metadata.kernel_schedule is None:
                metadata.kernel_schedule = get_mla_metadata(metadata.seqlens, q.shape[1] * q.shape[2], 1)
            out, _ = flash_mla_with_kvcache(
                q, k_cache, metadata.block_table, metadata.seqlens, r, *metadata.kernel_schedule,
                softmax_scale=self.softmax_scale, causal=True, is_fp8_kvcache=is_fp8,
            )  # fmt: skip
        else:
            out, _ = reference_flash_mla(
                q, k_cache, metadata.block_table, metadata.seqlens, r,
                softmax_scale=self.softmax_scale, causal=True, is_fp8_kvcache=is_fp8,
                compute_dtype=torch.promote_types(q.dtype, torch.float32),
            )  # fmt: skip
        return torch.einsum("bshr,hvr->bshv", out.to(q_nope.dtype), w_uv)

    def _attend_decompressed(
        self, q_nope, q_pe, k_cache, metadata: AttentionMetadata, is_fp8: bool = False
    ) -> torch.Tensor:
        """[b, s, h, nope], [b, s, h, dr] -> [b, s, h, v]: decompress the gathered cache, masked SDPA.

        FP8 rows are dequantized (exactly, to float32) before the cast to the module's dtype."""
        cfg = self.config
        s = q_nope.shape[1]
        page_size = k_cache.shape[1]
        j = torch.arange(metadata.max_seqlen, device=q_nope.device)  # [L]
        pages = metadata.block_table[:, j // page_size].long()  # [b, L]
        rows = k_cache[pages, (j % page_size)[None, :], 0]  # [b, L, r + dr]; FP8: [b, L, bytes]
        if is_fp8:
            rows = torch.cat(dequantize_latent_fp8(rows, cfg.kv_lora_rank, cfg.qk_rope_head_dim), dim=-1)
        # rows past a sequence's end come from other pages; zero them so they cannot be NaN
        in_seq = j[None, :] < metadata.seqlens[:, None]  # [b, L]
        rows = rows.to(q_nope.dtype).masked_fill(~in_seq[..., None], 0.0)
        latent, k_pe = rows.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)

        k, v = self._decompress(latent, k_pe)  # [b, L, h, qk], [b, L, h, v]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [b, s, h, qk]
        # query i of sequence n is position seqlens[n] - s + i and sees keys j <= that position
        i = torch.arange(s, device=q.device)
        visible = j[None, None, :] <= (metadata.seqlens[:, None, None] - s + i[None, :, None])  # [b, s, L]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=visible[:, None], scale=self.softmax_scale,
        )  # fmt: skip  # [b, h, s, v]
        return out.transpose(1, 2)

    def _check_inputs(self, hidden_states, positions, cache, seq_ids) -> tuple[int, int]:
        cfg = self.config
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be a [b, s, hidden_size] tensor, got {_describe(hidden_states)}")
        b, s, hidden = hidden_states.shape
        if hidden != cfg.hidden_size:
            raise ValueError(f"hidden_states has hidden size {hidden}, the config says {cfg.hidden_size}")
        if s < 1:
            raise ValueError("hidden_states has no tokens (s = 0)")
        if positions is None and cache is None:
            return b, s
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be an integer tensor [b, s], got {_describe(positions)}")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
        if tuple(positions.shape) != (b, s):
            raise ValueError(
                f"positions must have shape [b={b}, s={s}] like hidden_states, got {tuple(positions.shape)}"
            )
        if cache is None:
            return b, s
        if not isinstance(cache, LatentCache):
            raise TypeError(f"cache must be an mla.LatentCache, got {type(cache).__name__}")
        seq_ids = list(seq_ids)
        if len(seq_ids) != b:
            raise ValueError(f"seq_ids has {len(seq_ids)} ids for a batch of {b}")
        if len(set(seq_ids)) != b:
            raise ValueError(f"seq_ids {seq_ids} lists a sequence more than once")
        for name, want in (("kv_lora_rank", cfg.kv_lora_rank), ("rope_dim", cfg.qk_rope_head_dim)):
            got = getattr(cache, name, None)
            if got != want:
                raise ValueError(
                    f"cache {name} is {got}, this layer needs {want}: the cache was built for another config"
                )
        if not self.layer_idx < cache.num_layers:
            raise ValueError(f"cache has {cache.num_layers} layers, this is layer {self.layer_idx}")
        if cache.pages[self.layer_idx].device != hidden_states.device:
            raise ValueError(
                f"cache is on {cache.pages[self.layer_idx].device} but hidden_states are on {hidden_states.device}"
            )
        return b, s

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layer_idx={self.layer_idx}, heads={c.num_heads}, kv_lora_rank={c.kv_lora_rank}, "
            f"qk_rope_head_dim={c.qk_rope_head_dim}, backend={self.backend or 'auto'}"
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
