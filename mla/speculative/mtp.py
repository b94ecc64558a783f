"""DeepSeek-V3-style multi-token prediction (MTP) module and its drafter.

One MTP depth combines the target's hidden state at position i with the embedding of the
token at i+1 and predicts the token at i+2 (DeepSeek-V3 report, section 2.2):

    h'_i   = block(eh_proj([enorm(E(t_{i+1})) ; hnorm(h_i)]))     block: one decoder layer
    logits = head(shared_head.norm(h'_i))                          E, head: the model's own

(the concatenation order, embedding first, is that of DeepSeek's checkpoints). The block
attends over the module's own latent cache, one entry per position. Drafting k tokens chains
the one module: the normed output of a step (what its head reads, as for the target) is the
hidden state of the next step.
"""

from __future__ import annotations

import torch
from torch import nn

from mla.attention import RMSNorm, check_cache
from mla.cache import LatentCache
from mla.config import MLAConfig
from mla.model import DecoderLayer, MLAForCausalLM
from mla.rope import RotaryEmbedding

from .adapters import MLACausalLM
from .drafters import _CachedDrafter, _chain

_UNATTACHED = "the MTP module has no embedding/LM head: attach it to a model with attach_mtp(model, mtp)"


class MultiTokenPredictor(DecoderLayer):
    """One MTP depth: a decoder layer (its parameters keep DeepSeek's names: self_attn, mlp,
    input_layernorm, post_attention_layernorm) plus enorm, hnorm, eh_proj and shared_head.norm.

    The embedding and LM head are the model's, given by `attach_mtp`; they are referenced, not
    owned (not in this module's parameters or state dict).
    """

    def __init__(self, config: MLAConfig, backend: str | None = None):
        super().__init__(config, 0, backend)  # layer 0 of the module's own one-layer cache
        self.config = config
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(h, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self._shared: tuple[nn.Embedding, nn.Linear] | None = None  # a tuple, so nn.Module does not register them

    def new_cache(self, num_pages: int, page_size: int, backend: str | None = None) -> LatentCache:
        """An empty one-layer cache for this module, in its dtype and on its device."""
        w, c = self.eh_proj.weight, self.config
        return LatentCache(1, num_pages, page_size, c.kv_lora_rank, c.qk_rope_head_dim, dtype=w.dtype, device=w.device,
                           backend=backend, index_head_dim=c.index_head_dim)  # fmt: skip

    def forward(
        self, hidden: torch.Tensor, tokens: torch.Tensor, cache: LatentCache | None = None, seq_ids=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append n positions to each sequence of the module's cache.

        Args:
            hidden: [b, n, hidden_size], h_i: the target's final (normed) hidden states, or this
                module's own output when chaining.
            tokens: int64 [b, n], t_{i+1}: the token following each of those positions.
            cache, seq_ids: the module's cache (`new_cache`) and b of its sequences; or None:
                the n pairs are whole sequences from position 0, run causally, nothing stored,
                differentiable (training: with the target's `model(ids, return_hidden=True)`,
                hidden[:, :-1] and ids[:, 1:] give logits whose position i is scored on ids[:, i + 2]).

        Returns:
            logits [b, n, vocab] for t_{i+2}, and the normed output [b, n, hidden_size] (the
            head's input, the hidden state of the next chained step).
        """
        if self._shared is None:
            raise ValueError(_UNATTACHED)
        embed, head = self._shared
        if cache is None:
            x = self.eh_proj(torch.cat([self.enorm(embed(tokens)), self.hnorm(hidden)], dim=-1))
            out = self.shared_head.norm(super().forward(x))
            return head(out), out
        seq_ids = list(seq_ids)
        check_cache(cache, self.config, 1, hidden.device)
        lengths = [cache.length(s) for s in seq_ids]
        cache.reserve(seq_ids, tokens.shape[1])
        try:
            plan = cache.plan(seq_ids, tokens.shape[1], self.config, rotary=self.rotary, backend=self.self_attn.backend)
            x = self.eh_proj(torch.cat([self.enorm(embed(tokens)), self.hnorm(hidden)], dim=-1))
            out = self.shared_head.norm(super().forward(x, plan))
        except BaseException:
            for sid, n in zip(seq_ids, lengths):
                cache.truncate(sid, n)
            raise
        return head(out), out


def attach_mtp(model: MLAForCausalLM, mtp: MultiTokenPredictor) -> MLAForCausalLM:
    """Give `model` the MTP module as `model.mtp` (a submodule: it moves and saves with the
    model) and share the model's embedding and LM head with it. Returns the model."""
    if not isinstance(model, MLAForCausalLM):
        raise TypeError(f"model must be an mla.MLAForCausalLM, got {type(model).__name__}")
    if not isinstance(mtp, MultiTokenPredictor):
        raise TypeError(f"mtp must be a MultiTokenPredictor, got {type(mtp).__name__}")
    if mtp.config.hidden_size != model.config.hidden_size:
        raise ValueError(f"MTP hidden size {mtp.config.hidden_size} != model hidden size {model.config.hidden_size}")
    model.mtp = mtp
    mtp._shared = (model.model.embed_tokens, model.lm_head)
    return model


def load_mtp_state_dict(
    model: MLAForCausalLM, state_dict: dict[str, torch.Tensor], backend: str | None = None
) -> MultiTokenPredictor:
    """Build `model.mtp` from a DeepSeek-V3 checkpoint's MTP layer and attach it.

    DeepSeek stores the MTP depth as the layer after the last decoder layer:
    `model.layers.{num_hidden_layers}.{enorm, hnorm, eh_proj, shared_head.norm, self_attn.*,
    mlp.*, input_layernorm, post_attention_layernorm}`, plus copies of the embedding
    (`embed_tokens.weight`) and LM head (`shared_head.head.weight`), which must equal the
    model's (they are shared here). The MLP must be dense (this library has no MoE layer).
    Missing or unexpected keys raise ValueError. Returns the module.
    """
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not own:
        raise ValueError(f"the state dict has no MTP layer (no key starts with {prefix!r})")
    shared_weights = (("embed_tokens.weight", model.model.embed_tokens), ("shared_head.head.weight", model.lm_head))
    for key, module in shared_weights:
        shared = module.weight
        copy = own.pop(key, None)
        if copy is not None and not torch.equal(copy.to(shared.device, shared.dtype), shared):
            raise ValueError(
                f"{prefix}{key} differs from the model's; the MTP module shares the model's embedding and head"
            )
    weight = model.lm_head.weight
    mtp = MultiTokenPredictor(model.config, backend).to(device=weight.device, dtype=weight.dtype)
    expected = set(mtp.state_dict())
    missing, unexpected = sorted(expected - set(own)), sorted(prefix + k for k in set(own) - expected)
    if missing or unexpected:
        raise ValueError(f"MTP weights do not match a dense MTP layer: missing {missing}, unexpected {unexpected}")
    try:
        mtp.load_state_dict(own)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"MTP weights do not fit the model's config: {e}") from None
    attach_mtp(model, mtp)
    return mtp


class MTPDrafter(_CachedDrafter):
    """Drafts k tokens with an MTP module chained k times; the target must be an MLAForCausalLM
    (it provides the hidden states).

    The module's cache holds one entry per target position i (pair h_i, t_{i+1}). Only entries
    computed from the target's own hidden states are kept across steps: after each verify pass
    the chained (draft) entries are truncated, and the next `propose` first runs the pairs of the
    tokens just accepted (their target hidden states came with the verify pass) as one chunk,
    padded to the longest row and truncated back, then chains.

    Args:
        mtp: a `MultiTokenPredictor` attached to the target (`attach_mtp`), or the model carrying it.
        page_size: page size of the module's latent cache.
        cache_backend: the cache's write backend ("triton", "reference"; None: the cache's default).
    """

    needs_hidden = True

    def __init__(self, mtp, page_size: int = 64, cache_backend: str | None = None):
        if isinstance(mtp, MLAForCausalLM):
            if not isinstance(getattr(mtp, "mtp", None), MultiTokenPredictor):
                raise ValueError("the model carries no MTP module: attach one with attach_mtp(model, mtp)")
            mtp = mtp.mtp
        if not isinstance(mtp, MultiTokenPredictor):
            raise TypeError(f"mtp must be a MultiTokenPredictor or a model carrying one, got {type(mtp).__name__}")
        super().__init__()
        self.mtp, self.page_size, self.cache_backend = mtp, page_size, cache_backend

    @torch.no_grad()
    def start(self, target, prompts, pending, hidden, extra_tokens, temperature, top_p, generator):
        if not isinstance(target, MLACausalLM) or hidden is None:
            # the module was trained on its own model's hidden states; another model's mean nothing to it
            raise ValueError("MTPDrafter needs the target's hidden states: the target must be an mla.MLAForCausalLM")
        if self.mtp._shared is None:
            raise ValueError(_UNATTACHED)
        vocab = self.mtp._shared[1].weight.shape[0]
        if vocab != target.vocab_size:
            raise ValueError(f"the MTP head's vocabulary ({vocab}) differs from the target's ({target.vocab_size})")
        self.sampling = (temperature, top_p, generator)
        # Room per row: the prompt, then per step the accepted chunk padded to k + 1 and k - 1 chained entries.
        pages = sum(-(-(len(p) + 2 * extra_tokens) // self.page_size) for p in prompts)
        self.cache = self.mtp.new_cache(pages, self.page_size, self.cache_backend)
        self.seq_ids = [self.cache.add_sequence() for _ in prompts]
        # Pairs (h_i, t_{i+1}) of the prompt are all known except the last, whose t is `pending`.
        for length in sorted({len(p) for p in prompts} - {1}):
            rows = [r for r, p in enumerate(prompts) if len(p) == length]
            self.mtp(torch.stack([hidden[r][:-1] for r in rows]), torch.stack([prompts[r][1:] for r in rows]),
                     self.cache, [self.seq_ids[r] for r in rows])
        self.hidden = torch.stack([h[-1:] for h in hidden])  # [b, 1, H], pairs still to run
        self.tokens = None  # their t_{i+1}: pending, given to propose
        self.counts = [1] * len(prompts)

    @torch.no_grad()
    def propose(self, pending, k):
        tokens = pending[:, None] if self.tokens is None else self.tokens
        base = [self.cache.length(s) for s in self.seq_ids]
        logits, out = self.mtp(self.hidden, tokens, self.cache, self.seq_ids)
        # Each row's chunk ends at counts - 1; the padding after it is cut from the cache again.
        self.exact = [n + c for n, c in zip(base, self.counts)]
        for sid, n in zip(self.seq_ids, self.exact):
            self.cache.truncate(sid, n)
        last = torch.tensor(self.counts, device=out.device)[:, None] - 1
        logits = logits.gather(1, last[..., None].expand(-1, -1, logits.shape[-1]))[:, 0]
        h = out.gather(1, last[..., None].expand(-1, -1, out.shape[-1]))  # [b, 1, H]

        def step(token):
            nonlocal h
            logits, h = self.mtp(h, token[:, None], self.cache, self.seq_ids)
            return logits[:, -1]

        return _chain(logits, k, self.sampling, step, pending)

    def accept(self, verified):
        # Drop the chained entries; the accepted positions' target hidden states and their next
        # tokens (the emitted ones: accepted drafts, then the new pending) form the next chunk.
        for sid, n in zip(self.seq_ids, self.exact):
            self.cache.truncate(sid, n)
        self.hidden = verified.hidden
        self.tokens = verified.emitted.clamp_min(0)  # padding slots (-1) become a valid id; their outputs are unused
        self.counts = list(verified.num_emitted_host)

    def retain(self, rows):
        super().retain(rows)
        if self.tokens is not None:
            self.tokens = self.tokens[torch.tensor(rows, dtype=torch.long, device=self.tokens.device)]
