"""Section 2 (any device): one decode step of a DeepSeek-V3.2 sparse attention layer against the
dense DeepSeek-V3 layer.

The V3.2 layer (`mla.MLAttention` with its `Indexer`) and the dense layer (the same config
without the indexer fields, sharing every parameter tensor but the indexer's) decode token s_k
over one `LatentCache` holding s_k - 1 random latents and random indexer keys: the reference
backend on the CPU, Triton on a GPU. Each row times, at b = 1:

- ms: the whole step, `MLAttention.forward` on the cache (step plan, projections, cache writes,
  for V3.2 the indexer, attention, o_proj);
- indexer_ms (V3.2 only): the indexer's projections, `StepPlan.write_index` and
  `StepPlan.select` (scores of every cached key, exact top-k);
- attention_ms: the decode attention call alone, `StepPlan.attend`, over the index_topk chosen
  slots (V3.2) or over all s_k (dense); projections and the W_UK / W_UV absorption are outside it.

Where s_k <= index_topk the indexer chooses every position, so both steps compute the same
attention: those rows carry the outputs' largest difference, and the run stops if it exceeds a
few rounding errors of the dtype, so the timings compare like with like.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from mla import LatentCache, MLAConfig, MLAttention

from .common import format_table, synchronize, time_ms_alternating
from .layer import PAGE

SPARSE, DENSE = "v3.2 sparse", "v3 dense"
# Where every position is chosen the two outputs may differ by this many rounding errors (eps of
# the dtype) of the dense output's largest value: summation order, not a missed position (which
# moves a float32 output by about 1 / index_topk of its size).
SAME_OUTPUT_EPS = 16


def _check_indexer(cfg: MLAConfig) -> None:
    if not cfg.has_indexer:
        raise ValueError("cfg has no indexer (index_topk is None): the sparse layer bench needs a DeepSeek-V3.2 config")


def _weight_bytes(layer: MLAttention) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


class SparseLayerBench:
    """One DeepSeek-V3.2 attention layer and its dense twin, with one cache for both.

    Args:
        cfg: attention dims with an indexer (e.g. `MLAConfig.deepseek_v32()`).
        device, dtype: where and in what the layers run (float32 on the CPU).
        seed: weights, cache contents and the new hidden state are drawn from it.
    """

    def __init__(self, cfg: MLAConfig, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
        _check_indexer(cfg)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        backend = "triton" if device.type == "cuda" else "reference"
        torch.manual_seed(seed)
        with torch.device(device):
            self.sparse = MLAttention(cfg, backend=backend).to(dtype).eval().requires_grad_(False)
        dense_cfg = dataclasses.replace(cfg, index_n_heads=None, index_head_dim=None, index_topk=None)
        with torch.device("meta"):  # allocates nothing: the parameters are the sparse layer's, assigned below
            self.dense = MLAttention(dense_cfg, backend=backend).eval()
        shared = {k: v for k, v in self.sparse.state_dict().items() if not k.startswith("indexer.")}
        self.dense.load_state_dict(shared, assign=True)
        self.dense.requires_grad_(False)
        self.dense.rotary = self.sparse.rotary  # its tables were made on the meta device; same dims
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(1, 1, cfg.hidden_size, generator=gen).to(device, dtype)
        self._gen = gen
        self.cache, self.s_k = None, 0

    def set_context(self, s_k: int) -> None:
        """A new cache holding s_k - 1 random latents, k_pe and indexer keys; the timed step is token s_k."""
        cfg, n = self.cfg, s_k - 1
        self.cache = None  # the previous context's pages go before the next ones are made
        rows = [torch.randn(n, dim, generator=self._gen).to(self.device, self.dtype)
                for dim in (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim)]  # fmt: skip
        self.cache = LatentCache(1, -(-s_k // PAGE), PAGE, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=self.dtype,
                                 device=self.device, index_head_dim=cfg.index_head_dim)  # fmt: skip
        self.sid = self.cache.add_sequence()
        self.cache.reserve([self.sid], n)
        self.cache.write(0, self.cache.slot_mapping([self.sid], torch.arange(n)[None]), *rows)
        self.position = torch.tensor([[n]], device=self.device)
        self.s_k = s_k

    @contextlib.contextmanager
    def new_token(self):
        """Token s_k reserved in the cache while the block runs, dropped after it."""
        self.cache.reserve([self.sid], 1)
        try:
            yield
        finally:
            self.cache.truncate(self.sid, self.s_k - 1)

    def step(self, layer: MLAttention) -> torch.Tensor:
        """[1, 1, hidden]: one decode step of `layer` (self.sparse or self.dense)."""
        with self.new_token():
            return layer(self.x, self.position, self.cache, [self.sid])

    def parts(self):
        """(indexer, sparse attention, dense attention): the timed parts of the two steps as
        functions, on the plans of a step whose token is reserved (call this and them inside
        `new_token`). The token's latent is written once here; the indexer rewrites its key."""
        m, cfg, layer = self.sparse, self.cfg, self.sparse.layer_idx
        plan = self.cache.plan([self.sid], 1, cfg, rotary=m.rotary, backend=m.backend)
        dense_plan = self.cache.plan([self.sid], 1, self.dense.config, rotary=m.rotary, backend=m.backend)
        q_nope, q_pe, latent, k_pe, q_resid = m._project(self.x, plan.cos, plan.sin)
        plan.write(layer, latent[0], k_pe[0])
        w_uk, _ = m.absorbed_weights()
        q = torch.cat([torch.einsum("bshd,hdr->bshr", q_nope, w_uk), q_pe], dim=-1)  # [1, 1, h, r + dr]

        def indexer() -> torch.Tensor:
            q_index, k_index, weights = m.indexer(self.x, q_resid, plan.cos, plan.sin)
            plan.write_index(layer, k_index[0])
            return plan.select(layer, q_index, weights, cfg.index_topk, as_slots=True)[0]

        chosen = indexer()
        return (indexer, lambda: plan.attend(layer, q, m.softmax_scale, chosen),
                lambda: dense_plan.attend(layer, q, m.softmax_scale))  # fmt: skip


def sparse_rows(cfg: MLAConfig, s_k_list, device: torch.device, dtype=torch.float32, progress=None,
                model: str = "DeepSeek-V3.2") -> list[dict]:  # fmt: skip
    """Time the sparse and the dense step, and their parts, at each context length.

    Returns rows {"impl" (SPARSE or DENSE), "model", b=1, s_k, h_q, s_q=1, topk (index_topk; None
    for DENSE), attended (min(topk, s_k) or s_k), ms, indexer_ms (None for DENSE), attention_ms,
    bytes, gbps, speedup_vs_dense, max_abs_diff}. bytes is what the step must read at least: the
    layer's weights, the attended latent rows and (SPARSE) every cached indexer key, at the
    cache's bytes per row; gbps is bytes over ms. max_abs_diff: the outputs' largest difference
    where s_k <= topk (else None); RuntimeError if it exceeds SAME_OUTPUT_EPS rounding errors.
    The two steps take turns in their timing (`common.time_ms_alternating`), as do the parts.
    """
    _check_indexer(cfg)
    topk = cfg.index_topk
    if not any(s_k <= topk for s_k in s_k_list):
        raise ValueError(
            f"s_k_list {tuple(s_k_list)} needs a context <= index_topk = {topk}, where the sparse step must "
            "equal the dense one (the check that the two compute the same thing)"
        )
    bench = SparseLayerBench(cfg, device, dtype)
    rows = []
    for s_k in progress(s_k_list) if progress else s_k_list:
        bench.set_context(s_k)
        diff = None
        if s_k <= topk:
            sparse_out, dense_out = bench.step(bench.sparse).float(), bench.step(bench.dense).float()
            diff = (sparse_out - dense_out).abs().max().item()
            tol = SAME_OUTPUT_EPS * torch.finfo(dtype).eps * dense_out.abs().max().item()
            if not diff <= tol:
                raise RuntimeError(
                    f"at s_k={s_k} <= index_topk={topk} the sparse step must equal the dense one, but they differ "
                    f"by {diff:.3e} (tolerance {tol:.3e}): the timings would not compare the same attention"
                )
        dense_ms, sparse_ms = time_ms_alternating([lambda: bench.step(bench.dense), lambda: bench.step(bench.sparse)],
                                                  device)  # fmt: skip
        with bench.new_token():
            indexer, attention, dense_attention = bench.parts()
            dense_attention_ms, indexer_ms, attention_ms = time_ms_alternating([dense_attention, indexer, attention],
                                                                               device)  # fmt: skip
        synchronize(device)
        latent_row, key_row = bench.cache.format.bytes_per_token, bench.cache.index_format.bytes_per_token
        attended = min(topk, s_k)
        sparse_bytes = _weight_bytes(bench.sparse) + s_k * key_row + attended * latent_row
        dense_bytes = _weight_bytes(bench.dense) + s_k * latent_row
        shared = {"model": model, "b": 1, "s_k": s_k, "h_q": cfg.num_heads, "s_q": 1, "max_abs_diff": diff}
        rows.append({"impl": SPARSE, **shared, "topk": topk, "attended": attended, "ms": sparse_ms,
                     "indexer_ms": indexer_ms, "attention_ms": attention_ms, "bytes": sparse_bytes,
                     "gbps": sparse_bytes / sparse_ms / 1e6, "speedup_vs_dense": dense_ms / sparse_ms})  # fmt: skip
        rows.append({"impl": DENSE, **shared, "topk": None, "attended": s_k, "ms": dense_ms, "indexer_ms": None,
                     "attention_ms": dense_attention_ms, "bytes": dense_bytes, "gbps": dense_bytes / dense_ms / 1e6,
                     "speedup_vs_dense": 1.0})  # fmt: skip
    return rows


def format_sparse_table(rows: list[dict]) -> str:
    columns = [
        ("impl", "impl", ""), ("s_k", "s_k", "d"), ("attended", "attended", "d"), ("ms", "ms", ".2f"),
        ("indexer ms", "indexer_ms", ".2f"), ("attention ms", "attention_ms", ".2f"),
        ("x faster than dense", "speedup_vs_dense", ".2f"), ("eff. GB/s", "gbps", ".1f"),
        ("max |diff| vs dense", "max_abs_diff", ".1e"),
    ]  # fmt: skip
    return format_table(columns, rows)
