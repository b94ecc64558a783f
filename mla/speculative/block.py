"""Block drafting (DSpark / DFlash style): one drafter forward proposes W tokens, a confidence head
says how far each row's draft is likely to survive, and each row verifies as many as pay off.

The drafter (`BlockDraftModel`) is a small stack of MLA decoder layers of the target's width,
with its own latent cache, sharing the target's embedding and LM head. Per target position i
its cache holds one context entry, made from the target's hidden states at i (one or more
layers, `BlockDrafterConfig.target_layers`, normed, concatenated, through `fc`): in every
drafter layer that vector is projected to the entry's latent and roped key, as DFlash injects
target features into each draft layer's keys and values. A step with pending token x at
position P (the target's cache holds positions < P) runs ONE forward over the block

    position   P       P+1    ...  P+W-1
    input      E(x)    m      ...  m            m: a learned mask embedding
    output     h_0     h_1    ...  h_{W-1}      h_j scores the token at P+1+j

whose W queries attend the cached context (causal to it: only positions < P exist there) and
all W block positions (bidirectional within the block). Drafting then walks the block once,
cheaply: q_j = softmax((head(h_j) + markov(d_{j-1}, h_j)) / T), where the "Markov" head is a
low-rank MLP bias from the previous draft token (d_{-1} = x), so a sampled chain stays coherent
while the block itself was computed in parallel. Each d_j is drawn from exactly that q_j, which
is what `rejection_sample` sees: lossless at any temperature.

The confidence head estimates, per block position, the probability that the draft survives up
to there (all of d_0 .. d_j accepted), from h_j and the spread of head(h_j), before any token is
drawn; a per-regime (greedy / sampled) Platt scale fitted on held-out data calibrates it. Since
the estimates do not depend on the drawn tokens, choosing each row's verify length from them
keeps sampling exact (a length chosen after seeing a drawn token would bias which tokens get
verified). `CostProfile.choose` picks, per row, the verify length L in 0..W maximising
(1 + sum_{j<L} survival_j) / (fixed + verify(L + 1)): expected tokens per second of a step.

How the block attends without a new cache API: the step reserves c_i + W slots per row (c_i
context entries new since the last step, then the block), writes every column's latent, and
folds the block's W query tokens into the head dimension of one query token (MLA decode is
multi-query attention over one latent head, so [b, W, h, d] queries are [b, 1, W * h, d]): the
decode kernel's causal rule lets a single query token see every cached row, block included.
The W block rows are then truncated again; only the context entries stay.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mla import ops
from mla.attention import MLAttention, RMSNorm, check_cache
from mla.cache import LatentCache
from mla.config import MLAConfig
from mla.model import DecoderLayer, MLAForCausalLM
from mla.plan import StepPlan
from mla.rope import RotaryEmbedding

from .adapters import CausalLM, as_causal_lm
from .drafters import Draft, _CachedDrafter, _choose
from .sampling import rejection_sample

GREEDY, SAMPLED = 0, 1  # the confidence head's two regimes: temperature 0, temperature > 0
_UNATTACHED = "the block drafter has no embedding/LM head: give it the target's with model.attach(target)"


@dataclass(frozen=True)
class BlockDrafterConfig:
    """Shape of a `BlockDraftModel`.

    layers: the drafter's decoder layers (`mla.MLAConfig`; num_hidden_layers of them, usually
        1 or 2); hidden_size and vocab_size must be the target's (the embedding and LM head are
        the target's own).
    target_layers: which of the target's hidden states feed the context entries, numbered as
        transformers' output_hidden_states (0: embeddings, j: after decoder layer j - 1, the
        target's layer count: the final normed states).
    block_size: W, the block's positions (most tokens drafted per step).
    markov_rank: width of the Markov head's bias MLP.
    """

    layers: MLAConfig
    target_layers: tuple[int, ...]
    block_size: int = 8
    markov_rank: int = 32

    def __post_init__(self):
        object.__setattr__(self, "target_layers", tuple(self.target_layers))
        if not self.target_layers or any(isinstance(j, bool) or not isinstance(j, int) or j < 0
                                         for j in self.target_layers):  # fmt: skip
            raise ValueError(f"target_layers must be non-negative ints, got {self.target_layers!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        if not isinstance(self.markov_rank, int) or self.markov_rank < 1:
            raise ValueError(f"markov_rank must be an int >= 1, got {self.markov_rank!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "target_layers": list(self.target_layers)}

    @classmethod
    def from_dict(cls, d: dict) -> BlockDrafterConfig:
        return cls(**{**d, "layers": MLAConfig(**d["layers"]), "target_layers": tuple(d["target_layers"])})


class BlockAttention(MLAttention):
    """`MLAttention` (same parameters and names) with the two block forms: over the drafter's
    latent cache (drafting) and over whole sequences without a cache (training)."""

    def forward_block(self, x: torch.Tensor, plan: StepPlan, columns: torch.Tensor, schedule) -> torch.Tensor:
        """One layer of a drafting step.

        Args:
            x: [b, S, hidden], the normed input of every new column of the plan (context entries
                and block positions); all of them are written to this layer's cache rows.
            plan: the step's plan (c_i + W new tokens per row, the block last).
            columns: int64 [b, W], where each row's block sits among its columns.
            schedule: the Triton decode schedule for one query token of W * heads heads, or None.

        Returns:
            [b, W, hidden]: the block's attention output, each block query seeing the row's
            whole cache (context and block) through the absorbed decode attention.
        """
        b, s, _ = x.shape
        w, h = columns.shape[1], self.config.num_heads
        q_nope, q_pe, latent, k_pe, _ = self._project(x, plan.cos, plan.sin)
        plan.write(self.layer_idx, latent.reshape(b * s, -1), k_pe.reshape(b * s, -1))
        index = columns[:, :, None, None]
        q_nope = q_nope.gather(1, index.expand(-1, -1, h, q_nope.shape[-1]))
        q_pe = q_pe.gather(1, index.expand(-1, -1, h, q_pe.shape[-1]))
        w_uk, w_uv = self.absorbed_weights()
        q = torch.cat([torch.einsum("bshd,hdr->bshr", q_nope, w_uk), q_pe], dim=-1)  # [b, W, h, r + dr]
        cache = plan.cache
        # W query tokens as W * h heads of one token: causal over one token sees every row
        out = ops.attend(cache.format, q.reshape(b, 1, w * h, -1), cache.pages[self.layer_idx], plan.block_table,
                         plan.seqlens, None, schedule, self.softmax_scale, plan.backend)  # fmt: skip
        out = torch.einsum("bshr,hvr->bshv", out.view(b, w, h, -1).to(q_nope.dtype), w_uv)
        return self.o_proj(out.flatten(2))

    def forward_train(self, context, block, context_rope, block_rope, visible) -> torch.Tensor:
        """The same attention without a cache, differentiable.

        Args:
            context: [B, T, hidden] normed context entries of positions 0 .. T - 1.
            block: [B, Q, hidden] normed block inputs (several blocks per sequence, Q = N * W).
            context_rope, block_rope: (cos, sin) of their positions, float32 [B or 1, T or Q, dr / 2].
            visible: bool [B, Q, T + Q], which context entries and block positions each query sees.

        Returns:
            [B, Q, hidden].
        """
        _, _, latent_c, k_pe_c, _ = self._project(context, *context_rope)
        q_nope, q_pe, latent_b, k_pe_b, _ = self._project(block, *block_rope)
        k, v = self._decompress(torch.cat([latent_c, latent_b], 1), torch.cat([k_pe_c, k_pe_b], 1))
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible[:, None], scale=self.softmax_scale
        )  # [B, h, Q, v]
        return self.o_proj(out.transpose(1, 2).flatten(2))


class BlockLayer(DecoderLayer):
    """A decoder layer whose attention is `BlockAttention` (parameter names unchanged)."""

    def __init__(self, config: MLAConfig, layer_idx: int, backend: str | None = None):
        super().__init__(config, layer_idx, backend)
        self.self_attn = BlockAttention(config, layer_idx, backend)


class BlockDraftModel(nn.Module):
    """The block drafter's network (module docstring); the embedding and LM head are the
    target's, referenced after `attach(target)`, not owned (not in the state dict).

    Parameters: feature_norms (one RMSNorm per target layer read), fc [hidden, F], mask_embedding
    [hidden], layers (BlockLayer), norm, markov_embed [V, rank], markov_in [rank, hidden],
    markov_out [V, rank], confidence [2, hidden + 2]; buffer calibration float32 [2, 2] (Platt
    scale and shift of the survival log-odds, per regime).
    """

    def __init__(self, config: BlockDrafterConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        c = config.layers
        h, v, r = c.hidden_size, c.vocab_size, config.markov_rank
        self.backend = backend
        self.feature_norms = nn.ModuleList(RMSNorm(h, c.rms_norm_eps) for _ in config.target_layers)
        self.fc = nn.Linear(h * len(config.target_layers), h, bias=False)
        self.mask_embedding = nn.Parameter(torch.zeros(h))
        self.layers = nn.ModuleList(BlockLayer(c, i, backend) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(h, c.rms_norm_eps)
        self.markov_embed = nn.Embedding(v, r)
        self.markov_in = nn.Linear(h, r, bias=False)
        self.markov_out = nn.Linear(r, v, bias=False)
        self.confidence = nn.Linear(h + 2, 2)
        self.register_buffer("calibration", torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        self.rotary = RotaryEmbedding(c)
        self._shared: tuple[nn.Embedding, nn.Linear] | None = None  # a tuple, so nn.Module does not register them

    def attach(self, target) -> BlockDraftModel:
        """Share the target's embedding and LM head (an `mla.MLAForCausalLM`, a transformers causal
        LM or a `CausalLM` adapter of either); returns self."""
        model = target.model if isinstance(target, CausalLM) else target
        if isinstance(model, MLAForCausalLM):
            embed, head = model.model.embed_tokens, model.lm_head
        elif hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings"):
            embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        else:
            raise TypeError(f"target must be an mla.MLAForCausalLM or a transformers causal LM, got {type(model).__name__}")
        c = self.config.layers
        if tuple(head.weight.shape) != (c.vocab_size, c.hidden_size):
            raise ValueError(
                f"the target's LM head is {tuple(head.weight.shape)}, the drafter needs [vocab {c.vocab_size}, "
                f"hidden {c.hidden_size}]"
            )
        self._shared = (embed, head)
        return self

    def new_cache(self, num_pages: int, page_size: int, backend: str | None = None) -> LatentCache:
        """An empty cache with one layer per drafter layer, in the drafter's dtype and device."""
        w, c = self.fc.weight, self.config.layers
        return LatentCache(c.num_hidden_layers, num_pages, page_size, c.kv_lora_rank, c.qk_rope_head_dim,
                           dtype=w.dtype, device=w.device, backend=backend, index_head_dim=c.index_head_dim)  # fmt: skip

    def _parts(self) -> tuple[nn.Embedding, nn.Linear]:
        if self._shared is None:
            raise ValueError(_UNATTACHED)
        return self._shared

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """Target hidden states [..., len(target_layers) * hidden] -> context entries [..., hidden]."""
        parts = features.chunk(len(self.feature_norms), dim=-1)
        return self.fc(torch.cat([norm(p) for norm, p in zip(self.feature_norms, parts)], dim=-1))

    def block_input(self, pending: torch.Tensor) -> torch.Tensor:
        """int64 [...] pending tokens -> [..., W, hidden]: E(pending), then W - 1 mask embeddings."""
        x = self._parts()[0](pending)[..., None, :]
        masks = self.mask_embedding.to(x.dtype).expand(*x.shape[:-2], self.config.block_size - 1, x.shape[-1])
        return torch.cat([x, masks], dim=-2)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final block states [..., hidden] -> the block's base logits [..., V] (before the Markov bias)."""
        return self._parts()[1](hidden)

    def markov(self, previous: torch.Tensor, states: torch.Tensor | None = None, hidden: torch.Tensor | None = None
               ) -> torch.Tensor:  # fmt: skip
        """The Markov head: previous tokens int64 [...] and block states [..., hidden] -> logit bias
        [..., V]; or, given `hidden` = markov_in(states) [..., rank] computed beforehand, from that."""
        hidden = self.markov_in(states) if hidden is None else hidden
        return self.markov_out(F.silu(self.markov_embed(previous) + hidden))

    def confidence_logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per block position, the log-odds that its draft is accepted given the earlier ones
        were, for each regime: [..., W, 2] from hidden [..., W, H] and base logits [..., W, V]
        (their top log-probability and entropy at temperature 1 join the hidden state)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        spread = torch.stack([logp.max(-1).values, -(logp.exp() * logp).sum(-1)], dim=-1)
        return self.confidence(torch.cat([hidden, spread.to(hidden.dtype)], dim=-1))

    def survival(self, hidden: torch.Tensor, logits: torch.Tensor, regime: int) -> torch.Tensor:
        """Calibrated survival estimates float32 [..., W]: P(the drafts at block positions 0..j are
        all accepted), from hidden [..., W, H] and base logits [..., W, V]; regime GREEDY or SAMPLED."""
        raw = torch.sigmoid(self.confidence_logits(hidden, logits)[..., regime].float()).cumprod(dim=-1)
        scale, shift = self.calibration[regime]
        return calibrate(raw, scale, shift)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """The training forward: many blocks per sequence at once, no cache, differentiable.

        Args:
            features: [B, T, F], the target's hidden states (`target_layers`) at positions 0 .. T - 1.
            tokens: int64 [B, T], the tokens at those positions.
            anchors: int64 [B, N], pending positions P; block n reads the context entries of
                positions < P and its own W positions P .. P + W - 1 (drafting's view of a step
                whose pending token is tokens[P]).

        Returns:
            final block states [B, N, W, hidden]; head + markov give the logits of the tokens
            at P + 1 .. P + W.
        """
        b, t, _ = features.shape
        n, w = anchors.shape[1], self.config.block_size
        z = self.context(features)
        x = self.block_input(tokens.gather(1, anchors)).reshape(b, n * w, -1)
        positions = (anchors[..., None] + torch.arange(w, device=anchors.device)).reshape(b, n * w)
        own_block = torch.arange(n, device=anchors.device).repeat_interleave(w)
        visible = torch.cat([
            torch.arange(t, device=anchors.device)[None, None, :] < anchors.repeat_interleave(w, dim=1)[..., None],
            (own_block[:, None] == own_block[None, :]).expand(b, -1, -1),
        ], dim=-1)  # fmt: skip
        context_rope = self.rotary(torch.arange(t, device=anchors.device)[None])
        block_rope = self.rotary(positions)
        for layer in self.layers:
            x = x + layer.self_attn.forward_train(layer.input_layernorm(z), layer.input_layernorm(x), context_rope,
                                                  block_rope, visible)  # fmt: skip
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x).view(b, n, w, -1)

    def teacher_forced(self, features: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor):
        """Blocks at `anchors` scored as drafting would score them were every earlier draft
        accepted: the Markov head reads the sequence's own previous token (d_{j-1} = tokens[P + j]).

        Args: as `forward` (anchors <= T - W, so every block position's previous token exists).

        Returns:
            (hidden [B, N, W, hidden], base logits [B, N, W, V], logits [B, N, W, V]): the final
            block states, head(hidden), and head(hidden) + the Markov bias; position j of block n
            scores the token at anchors[:, n] + j + 1.
        """
        hidden = self(features, tokens, anchors)
        positions = anchors[..., None] + torch.arange(self.config.block_size, device=anchors.device)
        previous = tokens.gather(1, positions.flatten(1)).view_as(positions)
        base = self.head(hidden)
        return hidden, base, base + self.markov(previous, hidden)

    def draft_block(self, context: torch.Tensor, counts: list[int], pending: torch.Tensor, cache: LatentCache,
                    seq_ids: list[int]) -> torch.Tensor:  # fmt: skip
        """One drafting step through the drafter's cache.

        Args:
            context: [b, c, hidden] context entries (`context(features)`); row i's first counts[i]
                are appended to its sequence (the rest is padding).
            counts: b ints, new context entries per row.
            pending: int64 [b], each row's pending token (at the position after its context).
            cache, seq_ids: the drafter's cache and the rows' sequences.

        Returns:
            final block states [b, W, hidden]. The context entries stay in the cache, the block's
            W rows do not (truncated again, also if anything fails, which removes the new context too).
        """
        c, w = self.config.layers, self.config.block_size
        check_cache(cache, c, len(self.layers), pending.device)
        b = len(seq_ids)
        lengths = [cache.length(s) for s in seq_ids]
        new = [n + w for n in counts]
        width = max(counts)
        cache.reserve(seq_ids, new)
        kept = lengths
        try:
            plan = cache.plan(seq_ids, new, c, rotary=self.rotary, backend=self.backend)
            schedule = None
            if plan.backend == "triton":
                from mla.kernels import get_mla_metadata  # Triton is imported only when it runs

                schedule = get_mla_metadata(plan.seqlens, w * c.num_heads, 1)
            columns = torch.tensor(counts, device=pending.device)[:, None] + torch.arange(w, device=pending.device)
            index = columns[..., None].expand(-1, -1, c.hidden_size)
            fixed = torch.cat([context[:, :width], context.new_zeros(b, w, c.hidden_size)], dim=1)
            x = self.block_input(pending)
            for layer in self.layers:
                full = fixed.scatter(1, index, x)
                x = x + layer.self_attn.forward_block(layer.input_layernorm(full), plan, columns, schedule)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            kept = [n + k for n, k in zip(lengths, counts)]
        finally:
            for sid, n in zip(seq_ids, kept):
                cache.truncate(sid, n)
        return self.norm(x)


def calibrate(survival: torch.Tensor, scale, shift) -> torch.Tensor:
    """Platt scaling of survival probabilities: sigmoid(scale * logit(s) + shift), float32
    (scale, shift: floats or 0-d tensors on survival's device)."""
    s = survival.float().clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid(scale * torch.log(s / (1 - s)) + shift)


def expected_calibration_error(predicted, observed, bins: int = 10) -> float:
    """ECE: sum over equal-width bins of predicted probability of |mean predicted - mean observed|
    times the bin's share of the samples (observed: 0/1 outcomes or their probabilities)."""
    p = torch.as_tensor(predicted, dtype=torch.float64).flatten()
    o = torch.as_tensor(observed, dtype=torch.float64).flatten()
    if p.numel() == 0:
        return float("nan")
    which = (p * bins).long().clamp(0, bins - 1)
    total = 0.0
    for k in range(bins):
        mask = which == k
        if mask.any():
            total += mask.sum().item() / p.numel() * abs(p[mask].mean().item() - o[mask].mean().item())
    return total


@dataclass
class CostProfile:
    """What a speculative step costs on a device, by the number of drafts a row puts up.

    step: step[L] is the time of one step that verifies L drafts per row, L = 0, 1, ..., W:
        the block forward and walking L positions with the Markov head, the target's verify
        forward of L + 1 tokens, acceptance and rollback. At least W + 1 entries.
    device: where and how it was measured (free text).

    Only ratios matter, so any unit works. `default()` is a measured CPU profile;
    `measure_cost_profile` measures one on the running device; `save` / `load` keep it as JSON.
    """

    step: tuple[float, ...]
    device: str = ""

    def __post_init__(self):
        self.step = tuple(float(v) for v in self.step)
        if not self.step or any(not v > 0 for v in self.step):
            raise ValueError(f"a cost profile needs positive step costs, got {self.step}")

    @classmethod
    def default(cls) -> CostProfile:
        """`measure_cost_profile` of bench's shipped model and block drafter (W = 8) on a shared
        2-core CPU (one thread, b = 1, a context of 256, temperature 1, 15 repeats; 2026-12-02),
        relative to a step that verifies nothing (23.5 ms there)."""
        return cls(step=(1.0, 1.15, 1.15, 1.15, 1.19, 1.41, 1.42, 1.42, 1.44), device="default: shared 2-core CPU")

    def choose(self, survival: torch.Tensor) -> torch.Tensor:
        """Per row the verify length L in 0..W maximising expected tokens per unit of time:
        (1 + survival[:L].sum()) / step[L]. survival: float [b, W] (non-increasing) -> int64 [b]."""
        b, w = survival.shape
        if w + 1 > len(self.step):
            raise ValueError(f"the cost profile covers verify lengths up to {len(self.step) - 1}, not {w}")
        tokens = torch.cat([survival.new_ones(b, 1), 1 + survival.float().cumsum(-1)], dim=-1)  # [b, W + 1]
        cost = torch.tensor(self.step[: w + 1], dtype=torch.float32, device=survival.device)
        return (tokens / cost).argmax(dim=-1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        return cls(**json.loads(Path(path).read_text()))


class BlockDrafter(_CachedDrafter):
    """Drafts with a `BlockDraftModel`: one drafter forward per step, k <= W tokens per row.

    The drafter's cache holds one context entry per token in the target's cache. Each
    `propose` appends the entries of the tokens the target kept last step (their hidden
    states came with the verify pass) and runs the block in the same forward; the block's
    rows are dropped again. Each row's draft then comes from walking the block with the Markov
    head (module docstring).

    Args:
        model: a `BlockDraftModel` attached to the target (`model.attach(target)`).
        adaptive: None or False: every row verifies k tokens. A `CostProfile` (True: the
            default one): each row verifies the length that profile and the confidence head's
            survival estimates make best (`CostProfile.choose`), from 0 to k; the draft then
            carries per-row `lengths` and the target runs one ragged verify pass.
        page_size: page size of the drafter's cache.
        cache_backend: the cache's write backend ("triton", "reference"; None: the cache's default).
        record: keep (predicted survival, outcome) pairs of every verified position in
            `calibration_pairs` (costs a host copy of the estimates per step).
    """

    def __init__(self, model: BlockDraftModel, adaptive: CostProfile | bool | None = None, page_size: int = 64,
                 cache_backend: str | None = None, record: bool = False):  # fmt: skip
        if not isinstance(model, BlockDraftModel):
            raise TypeError(f"model must be a BlockDraftModel, got {type(model).__name__}")
        if adaptive is True:
            adaptive = CostProfile.default()
        if adaptive is not None and adaptive is not False and not isinstance(adaptive, CostProfile):
            raise TypeError(f"adaptive must be a CostProfile, True, False or None, got {type(adaptive).__name__}")
        self.model, self.profile = model, adaptive or None
        self.page_size, self.cache_backend, self.record = page_size, cache_backend, record
        super().__init__()
        self.needs_hidden = model.config.target_layers
        self.calibration_pairs: list[tuple[float, float]] = []

    @torch.no_grad()
    def start(self, target, prompts, pending, hidden, extra_tokens, temperature, top_p, generator):
        self.model._parts()
        c = self.model.config.layers
        if target.vocab_size != c.vocab_size:
            raise ValueError(f"the drafter's vocabulary ({c.vocab_size}) differs from the target's ({target.vocab_size})")
        width = len(self.needs_hidden) * c.hidden_size
        if hidden[0].shape[-1] != width:
            raise ValueError(f"the target's hidden states are {hidden[0].shape[-1]} wide, the drafter reads {width}")
        self.sampling = (temperature, top_p, generator)
        self.regime = GREEDY if temperature == 0 else SAMPLED
        w = self.model.config.block_size
        pages = sum(-(-(len(p) + extra_tokens + w) // self.page_size) for p in prompts)
        self.cache = self.model.new_cache(pages, self.page_size, self.cache_backend)
        self.seq_ids = [self.cache.add_sequence() for _ in prompts]
        # every prompt position is in the target's cache: all of them become context entries
        self.counts = [len(p) for p in prompts]
        self.hidden = torch.nn.utils.rnn.pad_sequence(list(hidden), batch_first=True)
        self.survival = None

    @torch.no_grad()
    def propose(self, pending, k):
        w = self.model.config.block_size
        if k > w:
            raise ValueError(f"the block drafter drafts at most its block size {w} tokens per step, asked for {k}")
        model = self.model
        states = model.draft_block(model.context(self.hidden.to(model.fc.weight.dtype)), self.counts, pending,
                                   self.cache, self.seq_ids)  # fmt: skip
        self.counts = [0] * len(self.seq_ids)  # the context is in; accept brings the next
        logits = model.head(states)  # [b, W, V]
        lengths = None
        if self.profile is not None or self.record:  # fixed verify without records never reads them
            self.survival = model.survival(states, logits, self.regime)[:, :k]
        if self.profile is not None and k:
            lengths = self.profile.choose(self.survival).tolist()
        steps = k if lengths is None else max(lengths)
        hidden = model.markov_in(states[:, :steps])  # the Markov head's block-state term, all positions at once
        previous, tokens, probs = pending, [], []
        for j in range(steps):
            # the one sequential part of a step: the draft so far biases the next position
            previous, q = _choose(logits[:, j] + model.markov(previous, hidden=hidden[:, j]), *self.sampling)
            tokens.append(previous)
            probs.append(q)
        b, vocab = len(pending), logits.shape[-1]
        draft = pending.new_full((b, k), -1)
        if steps:
            draft[:, :steps] = torch.stack(tokens, dim=1)
        if lengths is not None:
            draft = draft.masked_fill(torch.arange(k, device=draft.device) >= torch.tensor(lengths, device=draft.device)[:, None], -1)
        q = None
        if self.sampling[0] > 0 and k:
            q = logits.new_zeros(b, k, vocab, dtype=torch.float32)
            if steps:
                q[:, :steps] = torch.stack(probs, dim=1)
        self.lengths = lengths if lengths is not None else [k] * b
        return Draft(draft, q, lengths=lengths)

    def accept(self, verified):
        if self.record and self.survival is not None:
            for estimates, verified_length, emitted in zip(self.survival.tolist(), self.lengths,
                                                           verified.num_emitted_host):  # fmt: skip
                for j in range(verified_length):
                    self.calibration_pairs.append((estimates[j], float(j < emitted - 1)))
        self.hidden = verified.hidden
        self.counts = list(verified.num_emitted_host)



def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_cost_profile(target, model: BlockDraftModel, temperature: float = 1.0, prompt_length: int = 256,
                         batch_size: int = 1, repeats: int = 7, page_size: int = 64) -> CostProfile:  # fmt: skip
    """Time whole speculative steps on the target's device: for L = 0 .. W, a block drafting
    step putting up L drafts, the target's verify pass of L + 1 tokens per row, acceptance
    (`rejection_sample` at `temperature`) and the rollback, over random prompts of
    `prompt_length` tokens, `batch_size` rows; the median of `repeats` runs per L, the lengths
    interleaved so a change of machine load weighs on all of them, after one untimed round: (W + 1) *
    (repeats + 1) steps."""
    lm = as_causal_lm(target)
    w = model.config.block_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(lm.vocab_size, (prompt_length,), generator=g).to(lm.device) for _ in range(batch_size)]
    generator = torch.Generator(lm.device).manual_seed(0)
    drafter = BlockDrafter(model, page_size=page_size)
    times = {n: [] for n in range(w + 1)}
    try:
        logits, hidden = lm.prefill(prompts, w + 2, return_hidden=drafter.needs_hidden)
        pending = logits.argmax(-1)
        drafter.start(lm, prompts, pending, hidden, w + 2, temperature, 1.0, generator)
        for repeat in range(repeats + 1):  # the first round warms up
            for n in range(w + 1):
                _synchronize(lm.device)
                start = time.perf_counter()
                draft = drafter.propose(pending, n)
                tokens = torch.cat([pending[:, None], draft.tokens.clamp_min(0)], dim=1)
                verify, _ = lm.forward(tokens, return_hidden=drafter.needs_hidden)
                emitted, _ = rejection_sample(verify, draft.tokens, draft.probs, temperature, 1.0, generator)
                emitted.tolist()
                lm.rollback([prompt_length] * batch_size)
                _synchronize(lm.device)
                if repeat:
                    times[n].append(time.perf_counter() - start)
    finally:
        lm.release()
        drafter.release()
    name = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return CostProfile(monotone([statistics.median(times[n]) for n in range(w + 1)]),
                       f"{name}, b={batch_size}, context {prompt_length}, temperature {temperature:g}")  # fmt: skip


def monotone(values: list[float]) -> tuple[float, ...]:
    """The non-decreasing sequence closest to `values` in squared error (pool adjacent violators).

    Verifying more tokens never costs less, but on a loaded machine the medians of a few timings
    can say otherwise (a dip at one L), and `CostProfile.choose` would then favour that L for no
    reason; pooling each dip with its neighbours keeps the measured level and drops the dip."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return tuple(total / count for total, count in blocks for _ in range(count))
