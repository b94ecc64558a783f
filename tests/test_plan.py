"""The step plan and the custom ops: built once per forward, refilled in place, compiled without
graph breaks, checked by torch.library.opcheck, and (on a GPU) captured in a CUDA graph."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mla
import mla.ops  # noqa: F401  (registers torch.ops.mla.*)
from mla.formats import Fp8Format, Mxfp4KeyFormat

from .utils import randomize_

INTERPRET = mla.backend.interpreting()
CUDA = torch.cuda.is_available() and not INTERPRET
CONFIG = mla.MLAConfig(
    hidden_size=64, num_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, vocab_size=64, num_hidden_layers=2, intermediate_size=96,
)  # fmt: skip
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": "fp8"}
# DeepSeek-V3.2's sparse layers: an indexer choosing 4 of the cached tokens
SPARSE = dataclasses.replace(CONFIG, q_lora_rank=24, index_n_heads=2, index_head_dim=16, index_topk=4)


def prefilled(backend, cache_dtype, device="cpu", lengths=(12, 5), page_size=8, config=CONFIG):
    """A small random model and a cache holding prompts of `lengths`."""
    model = randomize_(mla.MLAForCausalLM(config, backend=backend), seed=0).eval().to(device)
    cache = model.new_cache(32, page_size, dtype=cache_dtype)
    ids = [cache.add_sequence() for _ in lengths]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for sid, n in zip(ids, lengths):
            model.prefill(torch.randint(0, 64, (1, n), generator=g).to(device), cache, [sid])
    return model, cache, ids


def test_plan_tables():
    model, cache, ids = prefilled("reference", torch.float32, lengths=(12, 5))
    cache.reserve(ids, 2)
    plan = model.model.plan(cache, ids, 2)
    assert plan.seq_ids == tuple(ids) and plan.num_new_tokens == 2 and plan.max_seqlen == 14
    assert plan.positions.tolist() == [[12, 13], [5, 6]]
    assert plan.seqlens.dtype == torch.int32 and plan.seqlens.tolist() == [14, 7]
    assert plan.block_table.dtype == torch.int32 and plan.block_table.tolist() == cache.block_table(ids).tolist()
    assert plan.slots.tolist() == cache.slot_mapping(ids, plan.positions).tolist()
    cos, sin = model.model.rotary(plan.positions)
    assert torch.equal(plan.cos, cos) and torch.equal(plan.sin, sin)
    assert plan.backend == "reference" and plan.absorbed and plan.schedule is None


@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(lambda m, c, i: m.model.plan(c, [i[0], i[0]], 1), ValueError, "more than once", id="duplicate"),
        pytest.param(lambda m, c, i: m.model.plan(c, [i[0], 99], 1), ValueError, "unknown sequence id 99",
                     id="unknown"),
        pytest.param(lambda m, c, i: m.model.plan(c, i, 6), ValueError, r"\(id, length\) \[\(1, 5\)\] hold fewer",
                     id="not-reserved"),
        pytest.param(lambda m, c, i: m.model.plan(c, i, 0), ValueError, "num_new_tokens >= 1", id="zero-tokens"),
        pytest.param(lambda m, c, i: c.plan(i, 1, m.config, backend="cuda"), ValueError, "backend must be one of",
                     id="backend"),
    ],
)  # fmt: skip
def test_plan_rejects(call, error, match):
    model, cache, ids = prefilled("reference", torch.float32)
    with pytest.raises(error, match=match):
        call(model, cache, ids)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_refilled_plan_keeps_its_tensors_and_matches_a_fresh_one(backend):
    """What CUDA-graph replay needs: a plan refilled in place for the next step holds that step's
    values in the same tensors, and the step computes what a freshly built plan computes."""
    model, cache, ids = prefilled(backend, torch.float32)
    with torch.no_grad():
        cache.reserve(ids, 1)
        plan = model.model.plan(cache, ids, 1, table_width=8)
        tensors = [plan.positions, plan.slots, plan.block_table, plan.seqlens, plan.cos, plan.sin]
        first = model.model.step(torch.tensor([[3], [4]]), plan)
        cache.reserve(ids, 1)
        refilled = model.model.plan(cache, ids, 1, out=plan)
        kept = [plan.positions, plan.slots, plan.block_table, plan.seqlens, plan.cos, plan.sin]
        assert refilled is plan and all(a is b for a, b in zip(tensors, kept))
        fresh = model.model.plan(cache, ids, 1)
        assert plan.block_table.shape[1] == 8 and torch.equal(plan.block_table[:, :2], fresh.block_table)
        assert torch.equal(plan.positions, fresh.positions) and torch.equal(plan.slots, fresh.slots)
        second = model.model.step(torch.tensor([[5], [6]]), plan)
        for sid in ids:
            cache.truncate(sid, cache.length(sid) - 1)
        cache.reserve(ids, 1)
        again = model.model.step(torch.tensor([[5], [6]]), model.model.plan(cache, ids, 1))
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, again, rtol=0, atol=0)


def test_refill_rejects_another_shape():
    model, cache, ids = prefilled("reference", torch.float32)
    cache.reserve(ids, 2)
    plan = model.model.plan(cache, ids, 1)
    with pytest.raises(ValueError, match=r"planned for 2 sequences of 1 new tokens \(uniform\), not 2 of 2"):
        model.model.plan(cache, ids, 2, out=plan)
    cache.reserve(ids, 16)
    with pytest.raises(ValueError, match="block table has 2 columns, this step needs 4"):
        model.model.plan(cache, ids, 1, out=plan)


@pytest.mark.parametrize(
    "config, cache_dtype",
    [pytest.param(CONFIG, dtype, id=name) for name, dtype in CACHE_DTYPES.items()]
    + [pytest.param(SPARSE, "fp8", id="v3.2-fp8")],
)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_decode_step_compiles_without_graph_breaks(backend, config, cache_dtype):
    """torch.compile traces a whole decode step (embedding, every layer's projections, cache
    write and absorbed attention, for V3.2 also the indexer's key write, scores and top-k and
    the sparse attention, the norm) as one graph, and computes what eager computes."""
    model, cache, ids = prefilled(backend, cache_dtype, config=config)
    cache.reserve(ids, 1)
    plan = model.model.plan(cache, ids, 1)
    tokens = torch.tensor([[7], [9]])
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model.model.step)(tokens, plan)
        assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]
        eager = model.model.step(tokens, plan)
        compiled = torch.compile(model.model.step, fullgraph=True, backend="aot_eager")(tokens, plan)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def op_samples():
    g = torch.Generator().manual_seed(0)
    r, dr, page = 32, 8, 4
    slots = torch.tensor([5, 0, 9], dtype=torch.int64)
    latent, k_pe = torch.randn(3, r, generator=g), torch.randn(3, dr, generator=g)
    fp8 = Fp8Format(r, dr)
    table = torch.tensor([[2, 0], [1, 0]], dtype=torch.int32)
    lens = torch.tensor([5, 3], dtype=torch.int32)
    q = torch.randn(2, 2, 4, r + dr, generator=g)
    fp4 = Mxfp4KeyFormat(r)
    return {
        "write_latent": (torch.ops.mla.write_latent, (torch.zeros(3, page, 1, r + dr), slots, latent, k_pe)),
        "write_latent_fp8": (torch.ops.mla.write_latent_fp8, (fp8.allocate(3, page, "cpu"), slots, latent, k_pe)),
        "decode": (torch.ops.mla.decode, (q, torch.randn(3, page, 1, r + dr, generator=g), table, lens,
                                          *_schedule(lens, 2 * 4), r, 0.25, True, False)),
        "sparse_decode": (torch.ops.mla.sparse_decode, (q, torch.randn(3, page, 1, r + dr, generator=g),
                                                        torch.tensor([[[8, 0, -1]] * 2, [[4, -1, -1]] * 2],
                                                                     dtype=torch.int32), r, 0.25, False)),
        "index_scores": (torch.ops.mla.index_scores, (torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3),
                                                      torch.randn(3, page, 1, 16, generator=g), table, lens, 6,
                                                      None, False)),
        "index_scores_fp4": (torch.ops.mla.index_scores, (torch.randn(2, 2, 3, r, generator=g), torch.randn(2, 2, 3),
                                                          fp4.pack(torch.randn(3, page, 1, r, generator=g)), table,
                                                          lens, 6, None, False, True)),
        "index_topk": (torch.ops.mla.index_topk, (torch.randn(2, 2, 6, generator=g), 3, table, page)),
    }  # fmt: skip


def _schedule(lens, rows):
    from mla.kernels import get_mla_metadata

    return get_mla_metadata(lens, rows, 1, num_sm=4)


@pytest.mark.skipif(not (INTERPRET or CUDA), reason="the ops run Triton kernels: a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", ["write_latent", "write_latent_fp8", "decode", "sparse_decode", "index_scores",
                                  "index_scores_fp4", "index_topk"])
def test_custom_ops_pass_opcheck(name):
    op, args = op_samples()[name]
    torch.library.opcheck(op, args)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("cache_dtype", ["bf16", "fp8"])
def test_decode_step_is_sync_free_and_replays_in_a_cuda_graph(cache_dtype):
    """On CUDA: planning and running a decode step never synchronises with the device, and the
    step captured once in a CUDA graph replays later steps from a plan refilled in place."""
    model, cache, ids = prefilled(None, CACHE_DTYPES[cache_dtype], device="cuda")
    model = model.to(torch.bfloat16)
    tokens = torch.tensor([[3], [4]], device="cuda")
    with torch.no_grad():
        cache.reserve(ids, 1)
        torch.cuda.set_sync_debug_mode("error")
        try:
            plan = model.model.plan(cache, ids, 1, table_width=16)
            model.model.step(tokens, plan)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model.model.step(tokens, plan)
        for step in range(3):
            cache.reserve(ids, 1)
            model.model.plan(cache, ids, 1, out=plan)
            tokens.copy_(torch.tensor([[5 + step], [6 + step]]))
            graph.replay()
            eager = model.model.step(tokens, model.model.plan(cache, ids, 1))
            torch.testing.assert_close(captured, eager, rtol=0, atol=0)


@pytest.mark.skipif(not (INTERPRET or CUDA), reason="compares the Triton kernels: a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("cache_dtype", ["fp32", "fp8"])
def test_narrow_latent_runs_on_both_backends(cache_dtype):
    """kv_lora_rank 8 (below tl.dot's 16) is a valid config: both backends decode it and agree;
    nothing about it fails only on the Triton path."""
    import dataclasses

    config = dataclasses.replace(CONFIG, kv_lora_rank=8, qk_rope_head_dim=4)
    logits = []
    for backend in ("triton", "reference"):
        model = randomize_(mla.MLAForCausalLM(config, backend=backend), seed=0).eval()
        cache = model.new_cache(8, 4, dtype=CACHE_DTYPES[cache_dtype])
        ids = [cache.add_sequence(), cache.add_sequence()]
        with torch.no_grad():
            model.prefill(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]), cache, ids)
            logits.append(model.decode_step(torch.tensor([[11, 12], [13, 14]]), cache, ids))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
