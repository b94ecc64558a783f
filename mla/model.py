"""A small dense MLA decoder on the paged latent cache.

Layout and parameter names follow transformers' DeepseekV3ForCausalLM with every layer dense
(first_k_dense_replace >= num_hidden_layers), so `MLAForCausalLM.from_hf` loads such a
checkpoint's state dict as it is (MoE checkpoints too: their MoE layers keep transformers' block):

    model.embed_tokens -> layers[i]: x += self_attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))
    -> model.norm -> lm_head

Every call adds the same number of tokens to each listed sequence: `forward` checks the input
once, reserves the tokens in the cache, has the cache build the step's `StepPlan` once, and runs
`step` (the layers, which only read the plan: nothing in them checks ids, builds tables or
syncs, so `step` compiles with torch.compile and captures in a CUDA graph). Generation is
`prefill` once, then `decode_step` per token (or per k + 1 tokens when verifying a draft; roll
rejected tokens back with `cache.truncate`). Training calls `model(input_ids)` without a
cache: whole sequences, causal, differentiable.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from mla.attention import MLAttention, RMSNorm, check_cache
from mla.backend import check_backend
from mla.cache import LatentCache
from mla.config import MLAConfig
from mla.formats import PLAIN_DTYPES
from mla.plan import StepPlan
from mla.rope import RotaryEmbedding


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MLAConfig, layer_idx: int, backend: str | None = None):
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx, backend)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, plan: StepPlan | None = None) -> torch.Tensor:
        """x [b, s, hidden] -> [b, s, hidden]; without a plan, x holds whole sequences (positions 0 ... s - 1)."""
        x = x + self.self_attn(self.input_layernorm(x), plan=plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class MLAModel(nn.Module):
    """Embedding, decoder layers and final norm: input_ids [b, s] -> hidden states [b, s, hidden].

    backend: "triton", "reference" or None (`mla.backend`'s rule), for the cache writes and
    attention of every step this model plans.
    """

    def __init__(self, config: MLAConfig, backend: str | None = None):
        super().__init__()
        self.config, self.backend = config, check_backend(backend)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(
        self, input_ids: torch.Tensor, cache: LatentCache | None = None, seq_ids=None, num_new_tokens=None
    ) -> torch.Tensor:
        """Append s tokens to each sequence and run them through the layers.

        Args:
            input_ids: integer [b, s], the next s tokens of each sequence.
            cache: the model's cache (`MLAForCausalLM.new_cache`), or None: input_ids are b
                whole sequences (positions 0 ... s - 1), run causally without storing anything,
                with gradients (training).
            seq_ids: b distinct ids of sequences in `cache` (None without a cache).
            num_new_tokens: None (every row adds s tokens), or b counts n_i <= s: row i adds only
                its first n_i tokens (a ragged step, e.g. speculative verification of drafts of
                different lengths); its other columns are padding, stored nowhere.

        Returns:
            [b, s, hidden_size] final hidden states (after the last norm, what the LM head reads);
            padding columns hold no meaning. The tokens stay in the cache; if anything fails
            they are removed again.
        """
        self._check_input_ids(input_ids)
        if cache is None:
            if seq_ids is not None or num_new_tokens is not None:
                raise ValueError("seq_ids and num_new_tokens describe cached sequences; pass neither without a cache")
            return self.step(input_ids, None)
        seq_ids = list(seq_ids)
        if len(seq_ids) != input_ids.shape[0]:
            raise ValueError(f"seq_ids has {len(seq_ids)} ids for a batch of {input_ids.shape[0]}")
        check_cache(cache, self.config, len(self.layers), input_ids.device)
        counts = input_ids.shape[1] if num_new_tokens is None else num_new_tokens
        lengths = [cache.length(sid) for sid in seq_ids]
        cache.reserve(seq_ids, counts)
        try:
            plan = self.plan(cache, seq_ids, counts)
            if plan.num_new_tokens != input_ids.shape[1]:
                raise ValueError(f"input_ids has {input_ids.shape[1]} columns for at most {plan.num_new_tokens} new tokens")
            return self.step(input_ids, plan)
        except BaseException:
            for sid, n in zip(seq_ids, lengths):
                cache.truncate(sid, n)
            raise

    def plan(self, cache: LatentCache, seq_ids, num_new_tokens: int, **kwargs) -> StepPlan:
        """`cache.plan` with this model's config, rotary tables and backend (kwargs: `table_width`, `out`)."""
        return cache.plan(seq_ids, num_new_tokens, self.config, rotary=self.rotary, backend=self.backend, **kwargs)

    def step(self, input_ids: torch.Tensor, plan: StepPlan | None) -> torch.Tensor:
        """The layers alone: input_ids [b, s] -> final hidden states [b, s, hidden_size], the tokens
        already reserved and planned (`plan`), or whole sequences without a cache (plan None).
        Only tensor work: what `torch.compile` compiles and a CUDA graph captures."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, plan)
        return self.norm(x)

    def _check_input_ids(self, input_ids) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor [b, s], got {shape}")
        # Reading the ids would synchronise a GPU; there the embedding's own device assert stands.
        if input_ids.device.type == "cpu" and input_ids.numel():
            low, high = input_ids.min().item(), input_ids.max().item()
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")


class MLAForCausalLM(nn.Module):
    """`MLAModel` plus the LM head; `lm_head` shares the embedding when tie_word_embeddings."""

    def __init__(self, config: MLAConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.model = MLAModel(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf(cls, hf_model: nn.Module, backend: str | None = None) -> MLAForCausalLM:
        """Copy a transformers DeepseekV3ForCausalLM (or DeepseekV2 / DeepseekV32ForCausalLM, the
        latter with its lightning indexers), MoE layers included.

        Dense layers get our SwiGLU MLP. The MoE layers (index >= first_k_dense_replace) keep
        transformers' own MoE block (DeepseekV3MoE / DeepseekV2Moe: router, routed and shared
        experts), built from the checkpoint's config and holding copies of its tensors in their
        dtypes (transformers' loader keeps the router in float32): experts are not re-implemented here. Such a model's step has
        data-dependent expert dispatch, so it is not captured whole by torch.compile or a CUDA graph.
        """
        hf_config = hf_model.config
        config = MLAConfig.from_hf(hf_config)
        if hf_config.hidden_act != "silu" or getattr(hf_config, "mlp_bias", False):
            raise ValueError(f"the MLP must be SwiGLU without bias, got hidden_act={hf_config.hidden_act!r}")
        model = cls(config, backend)
        weight = hf_model.lm_head.weight
        model.to(device=weight.device, dtype=weight.dtype)
        for layer, hf_layer in zip(model.model.layers, hf_model.model.layers):
            if layer.self_attn.indexer is not None:  # transformers keeps weights_proj in float32, as DeepSeek
                layer.self_attn.indexer.weights_proj.to(hf_layer.self_attn.indexer.weights_proj.weight.dtype)
            if layer.self_attn.layer_idx >= hf_config.first_k_dense_replace:
                # a fresh transformers MoE block holding copies of the checkpoint's tensors, dtypes kept
                layer.mlp = type(hf_layer.mlp)(hf_config)
                layer.mlp.load_state_dict({k: v.clone() for k, v in hf_layer.mlp.state_dict().items()}, assign=True)
        model.load_state_dict(hf_model.state_dict())
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LatentCache | None = None,
        seq_ids=None,
        return_hidden: bool = False,
        num_new_tokens=None,
    ):
        """Append input_ids [b, s] to the sequences; logits [b, s, vocab] of every new token.

        Without a cache (`model(input_ids)`), input_ids are b whole sequences run causally from
        position 0, nothing stored, differentiable: the training forward. Its logits equal
        those of `prefill` through a cache.

        With `return_hidden`, returns (logits, hidden [b, s, hidden_size]); the hidden states
        are those the LM head reads (e.g. the input of a multi-token-prediction module).
        num_new_tokens: per-row counts for a ragged step (`MLAModel.forward`).
        """
        hidden = self.model(input_ids, cache, seq_ids, num_new_tokens)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def new_cache(self, num_pages: int, page_size: int, dtype: torch.dtype | None = None, device=None) -> LatentCache:
        """An empty cache for this model; dtype and device default to the model's."""
        weight = self.lm_head.weight
        c = self.config
        if dtype is None and weight.dtype not in PLAIN_DTYPES:
            raise ValueError(
                f"the model is {weight.dtype} and a cache holds {PLAIN_DTYPES} or FP8: pass dtype, "
                "e.g. new_cache(..., dtype=torch.float32)"
            )
        return LatentCache(
            c.num_hidden_layers, num_pages, page_size, c.kv_lora_rank, c.qk_rope_head_dim,
            dtype=dtype or weight.dtype, device=device or weight.device, index_head_dim=c.index_head_dim,
        )  # fmt: skip

    @torch.no_grad()
    def prefill(self, input_ids, cache: LatentCache, seq_ids) -> torch.Tensor:
        """Append prompts to the sequences (fresh, or already holding tokens: chunked prefill).

        Args:
            input_ids: integer [b, s], or a list of b 1-D prompts of any lengths (sequences
                of equal length run together, one call per distinct length).
            seq_ids: b distinct sequence ids.

        Returns:
            [b, vocab] logits of each sequence's last token, which predict its next one.
        """
        if isinstance(input_ids, torch.Tensor):
            return self.lm_head(self.model(input_ids, cache, seq_ids)[:, -1])
        prompts, seq_ids = list(input_ids), list(seq_ids)
        if len(prompts) != len(seq_ids):
            raise ValueError(f"got {len(prompts)} prompts for {len(seq_ids)} seq_ids")
        for i, p in enumerate(prompts):
            if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0:
                shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"prompt {i} must be a non-empty 1-D tensor of token ids, got {shape}")
        rows_by_length = defaultdict(list)
        for i, p in enumerate(prompts):
            rows_by_length[p.numel()].append(i)
        logits = [None] * len(prompts)
        for rows in rows_by_length.values():
            batch = torch.stack([prompts[i] for i in rows])
            out = self.lm_head(self.model(batch, cache, [seq_ids[i] for i in rows])[:, -1])
            for i, row in zip(rows, out):
                logits[i] = row
        return torch.stack(logits)

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, cache: LatentCache, seq_ids, num_new_tokens=None) -> torch.Tensor:
        """Append input_ids [b, n] (n >= 1; n = k + 1 to verify a k-token draft; per-row counts in
        num_new_tokens for drafts of different lengths) -> logits [b, n, vocab]."""
        return self(input_ids, cache, seq_ids, num_new_tokens=num_new_tokens)

    @torch.no_grad()
    def generate_greedy(
        self, prompts, max_new_tokens: int, cache: LatentCache | None = None, page_size: int = 16
    ) -> torch.Tensor:
        """Greedy continuation of each prompt ([b, s] tensor or list of 1-D prompts).

        Uses `cache` (or a new one just big enough), adding one sequence per prompt and freeing
        them at the end. Returns int64 [b, max_new_tokens], no stopping at EOS.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        prompts = list(prompts)
        if cache is None:
            pages = sum(-(-(len(p) + max_new_tokens) // page_size) for p in prompts)
            cache = self.new_cache(pages, page_size)
        seq_ids = [cache.add_sequence() for _ in prompts]
        try:
            tokens = [self.prefill(prompts, cache, seq_ids).argmax(-1)]  # [b]
            for _ in range(max_new_tokens - 1):
                tokens.append(self.decode_step(tokens[-1][:, None], cache, seq_ids)[:, -1].argmax(-1))
        finally:
            for sid in seq_ids:
                cache.free(sid)
        return torch.stack(tokens, dim=1)
