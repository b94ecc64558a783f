"""`mla.v4_cache.V4Cache` and the cached path of `mla.v4_attention.V4Attention`: page bookkeeping
(all-or-nothing reserve, no leaks, entry slots), cached steps equal to the one-shot forward,
exact rollback, ragged batches, and the inputs they refuse."""

import dataclasses
import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mla.cache import CacheFullError, LatentCache
from mla.formats import Model1Format, Mxfp4KeyFormat
from mla.pages import RELEASED
from mla.v4 import CSA, HCA, SLIDING, V4Config
from mla.v4_attention import V4Attention
from mla.v4_cache import V4Cache

from .test_v4_attention import TINY  # the tiny stack (sliding, CSA m = 4, HCA m' = 8) of both files

# tiny tensors: intra-op threads only add synchronisation on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")

WIDE = dict(
    TINY,
    num_hidden_layers=4,
    layer_types=(CSA, HCA, SLIDING, CSA),
    compress_rates={CSA: 4, HCA: 16},
    head_dim=64,
    rope_dim=16,
    sliding_window=16,
    index_topk=4,
)
SEQ = 37  # TINY: 9 CSA entries (index_topk 3), 4 HCA entries, a partial window of each left open


def tiny(**changes) -> V4Config:
    return V4Config(**{**TINY, **changes})


def stack(config: V4Config, seed: int = 0) -> list[V4Attention]:
    """Every layer of config as a float64 V4Attention with random weights (sinks and gate biases
    far from 0, norm weights near 1)."""
    generator = torch.Generator().manual_seed(seed)
    layers = [V4Attention(config, i).double() for i in range(config.num_hidden_layers)]
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
                elif p.dim() == 2 and not name.endswith("position_bias"):
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[1]))
                else:
                    p.copy_(torch.randn(p.shape, generator=generator))
    return layers


def run(layers, x, cache=None, seq_ids=None) -> torch.Tensor:
    """The residual stream through the stack: h + layer(h) per layer (one-shot, or one cached step)."""
    with torch.no_grad():
        for layer in layers:
            x = x + layer(x, cache=cache, seq_ids=seq_ids)
    return x


def nan_cache(config: V4Config, num_pages: int, page_size: int, **kwargs) -> V4Cache:
    """A float64 cache whose every row starts NaN, so a row read before it is written shows
    (kwargs: max_rollback, num_entry_pages)."""
    cache = V4Cache(config, num_pages, page_size, dtype=torch.float64, **kwargs)
    for store in cache.layers:
        for t in store.tensors():
            t.fill_(math.nan)
    return cache


def decode(layers, cache, ids, x, steps) -> torch.Tensor:
    """Feed x [b, sum(steps), hidden] through the cache in steps of the given sizes."""
    outs, t = [], 0
    for s in steps:
        cache.reserve(ids, s)
        outs.append(run(layers, x[:, t : t + s], cache, ids))
        t += s
    return torch.cat(outs, dim=1)


def assert_close(actual, expected, bound=1e-10):
    assert actual.shape == expected.shape
    assert actual.isfinite().all(), f"{(~actual.isfinite()).sum().item()} non-finite values"
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"max |difference| {err:.3g} > {bound:g}"


def owned_pages(cache: V4Cache) -> list[int]:
    return [p for pages in cache._seq_pages.values() for p in pages if p != RELEASED]


def page_bound(cache: V4Cache, s: int) -> int:
    """The most token pages a sequence of a compact cache holds after a step of s tokens."""
    return -(-(cache.keep + cache.max_rollback + s) // cache.page_size) + 1


class V4CacheMachine(RuleBasedStateMachine):
    """Random add / reserve / truncate / free against a model of lengths: pages are never lost
    or shared, a sequence owns exactly ceil(length / page_size) pages, and a refused
    reservation changes nothing."""

    @initialize(num_pages=st.integers(1, 12), page_size=st.sampled_from([2, 4, 8, 16]))
    def build(self, num_pages, page_size):
        self.cache = V4Cache(tiny(), num_pages, page_size)
        self.lengths: dict[int, int] = {}

    @rule()
    def add(self):
        self.lengths[self.cache.add_sequence()] = 0

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def reserve(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.lengths)), min_size=1, unique=True))
        counts = data.draw(st.lists(st.integers(0, 20), min_size=len(ids), max_size=len(ids)))
        size = self.cache.page_size
        need = sum(-(-(self.lengths[s] + n) // size) - -(-self.lengths[s] // size) for s, n in zip(ids, counts))
        before = {s: list(p) for s, p in self.cache._seq_pages.items()}
        if need > self.cache.num_free_pages:
            with pytest.raises(CacheFullError, match="free or truncate"):
                self.cache.reserve(ids, counts)
            assert self.cache._seq_pages == before
            return
        self.cache.reserve(ids, counts)
        for sid, n in zip(ids, counts):
            self.lengths[sid] += n

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def truncate(self, data):
        sid = data.draw(st.sampled_from(sorted(self.lengths)))
        new_length = data.draw(st.integers(0, self.lengths[sid]))
        self.cache.truncate(sid, new_length)
        self.lengths[sid] = new_length

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.lengths)))
        self.cache.free(sid)
        del self.lengths[sid]

    @invariant()
    def pages_are_accounted_for(self):
        owned = owned_pages(self.cache)
        assert len(set(owned)) == len(owned)
        assert sorted(owned + self.cache._free) == list(range(self.cache.num_pages))
        for sid, length in self.lengths.items():
            assert self.cache.length(sid) == length
            assert len(self.cache._seq_pages[sid]) == -(-length // self.cache.page_size)


TestV4CacheMachine = V4CacheMachine.TestCase
TestV4CacheMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


@pytest.mark.parametrize("page_size", [2, 4, 8, 16], ids=lambda p: f"page{p}")
def test_entry_slots_are_distinct_and_follow_the_entry_table(page_size):
    cache = V4Cache(tiny(), num_pages=40, page_size=page_size)
    ids = [cache.add_sequence() for _ in range(3)]
    cache.reserve(ids, [37, 21, 8])
    for layer, kind in ((1, CSA), (2, HCA)):
        m = tiny().compress_rates[kind]
        per_page = cache.layers[layer].entries.shape[1]
        assert per_page == page_size
        table = cache.entry_table(layer, ids)
        every = []
        for row, sid in enumerate(ids):
            n = cache.length(sid) // m
            slots = cache.entry_slots(layer, sid, 0, n)
            w = torch.arange(n)
            assert torch.equal(slots, table[row, w // per_page].long() * per_page + w % per_page)
            every += slots.tolist()
        # the kind's own pool: the entries of all sequences at distinct slots of its pages
        assert len(set(every)) == len(every)
        assert {s // per_page for s in every} <= set(range(cache.layers[layer].entries.shape[0]))


def test_truncate_and_free_return_pages():
    cache = V4Cache(tiny(), num_pages=6, page_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve([a, b], [9, 7])  # 3 + 2 pages
    assert cache.num_free_pages == 1
    with pytest.raises(CacheFullError, match="needs 2 new pages, only 1 of 6"):
        cache.reserve([a, b], [4, 4])
    assert (cache.length(a), cache.length(b), cache.num_free_pages) == (9, 7, 1)
    cache.truncate(a, 8)
    assert cache.num_free_pages == 2
    cache.free(b)
    assert cache.num_free_pages == 4
    with pytest.raises(ValueError, match="sequence 1 was already freed"):
        cache.length(b)
    cache.truncate(a, 0)
    assert cache.num_free_pages == 6


def test_step_starts_count_each_layer_separately():
    cache = V4Cache(tiny(), num_pages=4, page_size=4)
    sid = cache.add_sequence()
    cache.reserve([sid], 5)
    assert cache.step_starts(0, [sid], 3) == ([0], [0])
    cache.advance(0, [sid], 3)
    assert cache.step_starts(0, torch.tensor([sid]), 2) == ([0], [3])
    cache.advance(0, [sid], 2)
    assert cache.step_starts(1, (sid,), 5) == ([0], [0])
    cache.advance(1, [sid], 5)
    with pytest.raises(ValueError, match="layer 0 holds 5 tokens of sequence 0, which has 5 reserved: 1 new"):
        cache.step_starts(0, [sid], 1)
    cache.truncate(sid, 2)
    assert (cache.written(0, sid), cache.written(1, sid), cache.written(2, sid)) == (2, 2, 0)


def test_deepseek_v4_bytes_per_token_as_documented():
    """The figures of mla.v4_cache's docstring (bfloat16, bytes per token over all layers), with
    entry pools sized to the token pool's entries (128 pages of 128 tokens: 32 CSA pages, 1 HCA)."""
    pools = {CSA: 32, HCA: 1}
    for config, expected in ((V4Config.deepseek_v4_flash(), 199_392), (V4Config.deepseek_v4_pro(), 289_400)):
        cache = V4Cache(config, 128, 128, dtype=torch.bfloat16, device="meta", num_entry_pages=pools)
        assert cache.bytes_per_token == expected


@pytest.mark.parametrize("dtype, entry_bytes", [(torch.bfloat16, 6880), ("fp8", 21 * (585 + 68) / 4 + 20 * 585 / 128)],
                         ids=["bf16", "fp8"])  # fmt: skip
def test_deepseek_v4_flash_compact_bytes_at_1m_tokens(dtype, entry_bytes):
    """The module docstring's figures (meta tensors, nothing allocated): after a step at 1M
    tokens a sequence with max_rollback 0 and page_size 64 holds its entries and 2 token pages
    (tokens from 2^20 - 1 - keep 127, down to a page). Entries per token: CSA (512 + 128) * 2 / 4,
    HCA 1024 / 128 in bfloat16; FP8: CSA (585 + 68) / 4 (64-entry MODEL1 pages, 37440 B, and
    MXFP4 index keys), HCA 585 / 128."""
    n, config = 1 << 20, V4Config.deepseek_v4_flash()
    cache = V4Cache(config, n // 64, 64, dtype=dtype, device="meta", max_rollback=0)
    sid = cache.add_sequence()
    for s in (n - 1, 1):
        cache.reserve([sid], s)
        for layer in range(len(cache.layers)):
            cache.advance(layer, [sid], s)
    raw = 21 * (2 * 1024 + 2 * 256) * 2 + 20 * 2 * 512 * 2  # CSA kv / gate rows and the indexer's, HCA's
    kv = 1024 if dtype == torch.bfloat16 else 37440 // 64  # a 64-row MODEL1 page: 65 runs of 576 B
    rows = raw + 43 * kv  # token row bytes over the 43 layers
    assert cache.held_pages(sid) == 2
    assert cache.held_bytes(sid) == 2 * 64 * rows + entry_bytes * n


def test_bytes_per_token_counts_every_tensor():
    c = tiny()
    # 64 tokens: 16 CSA entries (2 pages of 8), 8 HCA entries (1 page)
    cache = V4Cache(c, num_pages=8, page_size=8, dtype=torch.bfloat16, num_entry_pages={CSA: 2, HCA: 1})
    d, D = c.head_dim, c.index_head_dim
    sliding = d
    csa = d + 2 * 2 * d + 2 * 2 * D + (d + D) / 4
    hca = d + 2 * d + d / 8
    assert cache.bytes_per_token == 2 * (sliding + csa + hca)


@pytest.mark.parametrize(
    "make, error, match",
    [
        pytest.param(lambda: V4Cache(TINY, 4, 4), TypeError, "V4Config.*dict", id="config-dict"),
        pytest.param(lambda: V4Cache(tiny(), 4, 4, dtype="fp8"), ValueError, "head_dim=512 with rope_dim=64.*"
                     "head_dim=32, rope_dim=8", id="fp8-head32"),
        pytest.param(lambda: V4Cache(tiny(), 4, 4, max_rollback=-1), ValueError, "max_rollback must be None or >= 0",
                     id="rollback-negative"),
        pytest.param(lambda: V4Cache(tiny(), 4, 4, max_rollback=1.5), TypeError, "max_rollback must be an integer",
                     id="rollback-float"),
        pytest.param(lambda: V4Cache(tiny(), 4, 4, num_entry_pages=0), ValueError,
                     "num_entry_pages must be positive, got 0", id="no-entry-pages"),
        pytest.param(lambda: V4Cache(tiny(), 4, 4, num_entry_pages={CSA: 2}), ValueError,
                     "num_entry_pages must give pages for each compressed layer kind", id="entry-pages-missing-kind"),
        pytest.param(lambda: V4Cache(tiny(layer_types=(SLIDING, CSA, CSA)), 4, 4, num_entry_pages={CSA: 2, HCA: 2}),
                     ValueError, "only those: .'compressed_sparse_attention'.,", id="entry-pages-extra-kind"),
        pytest.param(lambda: V4Cache(tiny(), 0, 4), ValueError, "num_pages must be positive, got 0", id="no-pages"),
        pytest.param(lambda: V4Cache(tiny(), 4, 4, dtype=torch.int8), TypeError, "dtype.*int8", id="int8"),
    ],
)  # fmt: skip
def test_bad_config(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "layer, config, match",
    [
        pytest.param(0, tiny(sliding_window=16), "sliding_window=8, layer 0 has 16", id="window"),
        pytest.param(1, tiny(compress_rates={CSA: 8, HCA: 8}), "compress rate of 4, layer 1 has 8", id="csa-rate"),
        pytest.param(2, tiny(compress_rates={CSA: 4, HCA: 16}), "compress rate of 8, layer 2 has 16", id="hca-rate"),
        pytest.param(1, tiny(index_head_dim=32), "index_head_dim=16, layer 1 has 32", id="index-dim"),
        pytest.param(1, tiny(layer_types=(SLIDING, HCA, CSA)), "layer 1 is heavily.*holds a compressed_sparse",
                     id="kind"),
    ],
)  # fmt: skip
def test_check_fits_names_the_mismatch(layer, config, match):
    with pytest.raises(ValueError, match=match):
        V4Cache(tiny(), 4, 4).check_fits(layer, config)


def test_reserve_rejects_bad_counts():
    cache = V4Cache(tiny(), 4, 4)
    sid = cache.add_sequence()
    with pytest.raises(ValueError, match="n must be >= 0, got -1 for sequence 0"):
        cache.reserve([sid], -1)
    with pytest.raises(ValueError, match="2 counts for 1 sequences"):
        cache.reserve([sid], [1, 2])
    with pytest.raises(ValueError, match="unknown sequence id 7"):
        cache.reserve([7], 1)
    assert cache.length(sid) == 0 and cache.num_free_pages == 4


STEPS = {
    "single-tokens": [1] * SEQ,
    "prefill13-then-mixed": [13, 1, 3, 4, 1, 8, 7],
    "prefill-all": [SEQ],
    "steps-of-3": [3] * 12 + [1],
}


@pytest.mark.parametrize("steps", STEPS.values(), ids=STEPS.keys())
@pytest.mark.parametrize("page_size", [2, 4, 16], ids=lambda p: f"page{p}")
def test_cached_steps_equal_one_shot(steps, page_size):
    config = tiny()
    layers = stack(config)
    x = torch.randn(2, SEQ, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cache = nan_cache(config, num_pages=2 * (-(-SEQ // page_size)), page_size=page_size)
    ids = [cache.add_sequence(), cache.add_sequence()]
    assert_close(decode(layers, cache, ids, x, steps), run(layers, x))


@pytest.mark.parametrize("steps", [[5, 1, 1, 9, 3, 1, 16, 8], [40, 1, 1, 1, 1]], ids=["mixed", "prefill40"])
def test_cached_steps_equal_one_shot_wide(steps):
    config = V4Config(**WIDE)
    layers = stack(config, seed=3)
    x = torch.randn(1, sum(steps), config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cache = nan_cache(config, num_pages=6, page_size=8)
    assert_close(decode(layers, cache, [cache.add_sequence()], x, steps), run(layers, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_cache_within_twice_the_one_shot_error(dtype):
    """A float32 / bfloat16 model with a cache of its dtype: the cached steps' error against the
    same weights in float64 is at most twice the one-shot forward's own error (the reference
    backend: the interpreter computes bfloat16 wrongly, and the kernels are compared with it
    in test_triton_backend_equals_the_reference)."""
    config = tiny()
    layers = [layer.to(dtype) for layer in stack(config)]
    for layer in layers:
        layer.backend = "reference"
    x = torch.randn(2, SEQ, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    cache = V4Cache(config, num_pages=20, page_size=4, dtype=dtype)
    ids = [cache.add_sequence(), cache.add_sequence()]
    got = decode(layers, cache, ids, x, STEPS["prefill13-then-mixed"]).double()
    one_shot = run(layers, x).double()
    truth = run([layer.double() for layer in layers], x.double())
    assert got.isfinite().all()
    assert (got - truth).abs().max() <= 2 * (one_shot - truth).abs().max()


@pytest.mark.parametrize("max_rollback", [None, 0, 9], ids=["keep-all", "rollback0", "rollback9"])
@pytest.mark.parametrize("cut", range(11, 29), ids=lambda c: f"cut{c}")
def test_truncate_then_continue_equals_fresh_prefill(cut, max_rollback):
    """A 20-token prefill, a 9-token speculative step, rollback to `cut` (every offset inside the
    windows of 4 and 8 and across their boundaries 12, 16, 20, 24, 28), then 2 more steps. A
    compact cache (keep 7) takes the cuts its rows allow: with max_rollback 9 it released only
    tokens 0 ... 3 (before 20 - 9 - 7), so every cut; with 0 tokens 0 ... 11 (before 20 - 7,
    down to a page), so cuts from 19 on (a step at 19 reads from 12), and refuses the others."""
    config = tiny()
    layers = stack(config)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 29, config.hidden_size, dtype=torch.float64, generator=generator)
    more = torch.randn(1, 6, config.hidden_size, dtype=torch.float64, generator=generator)
    rolled = nan_cache(config, num_pages=10, page_size=4, max_rollback=max_rollback)
    sid = rolled.add_sequence()
    decode(layers, rolled, [sid], x, [20, 9])
    if max_rollback is not None:
        assert rolled.first_held(sid) == (4 if max_rollback else 12)
    if max_rollback == 0 and cut < 19:
        free = rolled.num_free_pages
        with pytest.raises(ValueError, match=f"sequence 0 can roll back at most 10 tokens \\(to length 19.*"
                                             f"before 12.*truncating to {cut} needs rows from token {cut - 7}"):
            rolled.truncate(sid, cut)
        assert (rolled.length(sid), rolled.num_free_pages, rolled.written(1, sid)) == (29, free, 29)
        return
    rolled.truncate(sid, cut)
    fresh = nan_cache(config, num_pages=10, page_size=4)
    fid = fresh.add_sequence()
    decode(layers, fresh, [fid], x[:, :cut], [cut])
    if max_rollback is None:
        assert rolled.num_free_pages == fresh.num_free_pages
    expected = decode(layers, fresh, [fid], more, [1, 5])
    assert_close(decode(layers, rolled, [sid], more, [1, 5]), expected)
    assert_close(expected, run(layers, torch.cat([x[:, :cut], more], dim=1))[:, cut:])


def test_ragged_batch_equals_one_shot_per_sequence():
    """Sequences holding 13, 5 and 0 tokens take steps together (one s per call)."""
    config = tiny()
    layers = stack(config)
    generator = torch.Generator().manual_seed(5)
    prompts = [13, 5, 0]
    total = [p + 1 + 3 + 4 for p in prompts]
    xs = [torch.randn(1, n, config.hidden_size, dtype=torch.float64, generator=generator) for n in total]
    cache = nan_cache(config, num_pages=12, page_size=4)
    ids = [cache.add_sequence() for _ in prompts]
    for sid, x, p in zip(ids, xs, prompts):
        if p:
            decode(layers, cache, [sid], x, [p])
    outs, t = [], list(prompts)
    for s in (1, 3, 4):
        cache.reserve(ids, s)
        outs.append(run(layers, torch.cat([x[:, i : i + s] for x, i in zip(xs, t)]), cache, ids))
        t = [i + s for i in t]
    got = torch.cat(outs, dim=1)
    for row, (x, p) in enumerate(zip(xs, prompts)):
        assert_close(got[row : row + 1], run(layers, x)[:, p:])


def test_a_refused_step_changes_nothing():
    layer = V4Attention(tiny(), 2).double()
    cache = V4Cache(tiny(), 4, 4, dtype=torch.float64)
    sid = cache.add_sequence()
    cache.reserve([sid], 2)
    x = torch.randn(1, 2, 48, dtype=torch.float64)
    with pytest.raises(ValueError, match="positions"):
        layer(x, torch.tensor([[1, 2]]), cache=cache, seq_ids=[sid])
    assert cache.written(2, sid) == 0
    with torch.no_grad():
        assert_close(layer(x, cache=cache, seq_ids=[sid]), layer(x))


def test_cache_keeps_no_graph():
    layer = V4Attention(tiny(), 1).double()
    cache = V4Cache(tiny(), 4, 4, dtype=torch.float64)
    sid = cache.add_sequence()
    cache.reserve([sid], 5)
    out = layer(torch.randn(1, 5, 48, dtype=torch.float64), cache=cache, seq_ids=[sid])
    assert out.requires_grad
    assert not any(t.requires_grad for store in cache.layers for t in store.tensors())


def cached_call(config=None, reserve=2, s=2, **kwargs):
    """Call layer 2 (HCA) of tiny() with a cache for `config` holding one sequence with
    `reserve` tokens reserved, on s new tokens."""
    layer = V4Attention(tiny(), 2).double()
    cache = V4Cache(config or tiny(), 4, 4, dtype=torch.float64)
    sid = cache.add_sequence()
    cache.reserve([sid], reserve)
    return layer(torch.randn(1, s, 48, dtype=torch.float64), **{"cache": cache, "seq_ids": [sid], **kwargs})


@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(lambda: cached_call(cache=LatentCache(3, 4, 4, 24, 8)), TypeError,
                     "V4Cache, got LatentCache.*V3", id="v3-cache"),
        pytest.param(lambda: cached_call(tiny(compress_rates={CSA: 4, HCA: 16})), ValueError,
                     "compress rate of 16, layer 2 has 8", id="hca-rate"),
        pytest.param(lambda: cached_call(tiny(sliding_window=16)), ValueError, "sliding_window=16, layer 2 has 8",
                     id="window"),
        pytest.param(lambda: cached_call(reserve=1), ValueError, "holds 0 tokens of sequence 0, which has 1 reserved",
                     id="unreserved"),
        pytest.param(lambda: cached_call(seq_ids=[0, 1]), ValueError, r"one sequence id per row.*\(1\).*\[0, 1\]",
                     id="ids-per-row"),
        pytest.param(lambda: cached_call(seq_ids=[5]), ValueError, "unknown sequence id 5", id="unknown-id"),
        pytest.param(lambda: cached_call(positions=torch.tensor([[1, 2]])), ValueError,
                     r"indices 0 \.\.\. 1.*\[\[1, 2\]\]", id="hca-positions"),
        pytest.param(lambda: V4Attention(tiny(), 0)(torch.randn(1, 2, 48), seq_ids=[0]), ValueError,
                     "seq_ids without a cache", id="ids-no-cache"),
    ],
)  # fmt: skip
def test_cached_forward_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_compact_pool_is_reused_by_a_long_decode():
    """With max_rollback, a pool of page_bound pages carries one sequence through a decode far
    longer than the pool holds, every step equal (bitwise: same float64 arithmetic) to the
    keep-all cache's, and the sequence never holds more than the bound."""
    config = tiny()
    layers = stack(config)
    x = torch.randn(1, 70, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    steps = [5] + [1] * 35 + [3] * 5 + [2] * 5 + [1] * 5
    compact = nan_cache(config, num_pages=6, page_size=2, max_rollback=0, num_entry_pages=40)
    every = nan_cache(config, num_pages=35, page_size=2)
    assert page_bound(compact, 3) == compact.num_pages
    ids, full_ids = [compact.add_sequence()], [every.add_sequence()]
    t = 0
    for s in steps:
        compact.reserve(ids, s)
        assert compact.held_pages(ids[0]) <= min(page_bound(compact, s), compact.num_pages)
        every.reserve(full_ids, s)
        assert torch.equal(run(layers, x[:, t : t + s], compact, ids), run(layers, x[:, t : t + s], every, full_ids))
        t += s
    assert t == 70 > compact.num_pages * compact.page_size
    assert compact.first_held(ids[0]) == 62  # the last step starts at 69: 69 - keep 7
    compact.free(ids[0])
    assert compact.num_free_pages == 6 and all(len(p.free) == 40 for p in compact.pools.values())


@pytest.mark.parametrize("max_rollback", [0, 2, 5], ids=lambda r: f"rollback{r}")
@pytest.mark.parametrize("steps", [STEPS["prefill13-then-mixed"], STEPS["steps-of-3"]], ids=["mixed", "steps-of-3"])
def test_compact_steps_equal_keep_all(steps, max_rollback):
    config = tiny()
    layers = stack(config)
    x = torch.randn(2, SEQ, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    compact = nan_cache(config, num_pages=20, page_size=4, max_rollback=max_rollback)
    every = nan_cache(config, num_pages=20, page_size=4)
    ids, full_ids = [compact.add_sequence(), compact.add_sequence()], [every.add_sequence(), every.add_sequence()]
    t = 0
    for s in steps:
        compact.reserve(ids, s)
        every.reserve(full_ids, s)
        assert all(compact.held_pages(sid) <= page_bound(compact, s) for sid in ids)
        assert torch.equal(run(layers, x[:, t : t + s], compact, ids), run(layers, x[:, t : t + s], every, full_ids))
        t += s
    assert compact.num_free_pages > every.num_free_pages


def test_compact_ragged_batch_equals_keep_all():
    """Sequences of 13, 5 and 0 tokens stepping together, each releasing on its own schedule."""
    config = tiny()
    layers = stack(config)
    generator = torch.Generator().manual_seed(5)
    prompts = [13, 5, 0]
    xs = [torch.randn(1, p + 12, config.hidden_size, dtype=torch.float64, generator=generator) for p in prompts]
    caches = [nan_cache(config, 21, 2, max_rollback=1), nan_cache(config, 40, 2)]
    outs = []
    for cache in caches:
        ids = [cache.add_sequence() for _ in prompts]
        for sid, x, p in zip(ids, xs, prompts):
            if p:
                decode(layers, cache, [sid], x, [p])
        got, t = [], list(prompts)
        for s in (1, 3, 4, 1, 1, 2):
            cache.reserve(ids, s)
            got.append(run(layers, torch.cat([x[:, i : i + s] for x, i in zip(xs, t)]), cache, ids))
            t = [i + s for i in t]
        outs.append(torch.cat(got, dim=1))
    assert torch.equal(*outs)
    # lengths 23, 15, 10 before the last step, minus max_rollback 1 and keep 7, down to a page
    assert [caches[0].first_held(sid) for sid in range(3)] == [14, 6, 2]


def test_compact_rollback_within_the_last_reservation_with_max_rollback_0():
    """Speculative decoding's pattern: reserve k + 1, run, keep the accepted prefix; any cut at or
    past the length before the reservation works with R = 0, the compact cache equals the
    keep-all one through the same operations, and that one (up to the step shapes' summation
    order) a cache that never saw the rejected tokens."""
    config = tiny()
    layers = stack(config)
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(1, 60, config.hidden_size, dtype=torch.float64, generator=generator)
    compact = nan_cache(config, num_pages=8, page_size=2, max_rollback=0, num_entry_pages=20)
    every, clean = nan_cache(config, num_pages=40, page_size=2), nan_cache(config, num_pages=40, page_size=2)
    sid, fid, cid = compact.add_sequence(), every.add_sequence(), clean.add_sequence()
    for cache, i in ((compact, sid), (every, fid), (clean, cid)):
        decode(layers, cache, [i], x, [9])
    length = 9
    for accepted in (0, 3, 1, 5, 2, 0, 4):
        draft = torch.randn(1, 5, config.hidden_size, dtype=torch.float64, generator=generator)
        draft[:, :accepted] = x[:, length : length + accepted]
        for cache, i in ((compact, sid), (every, fid)):
            decode(layers, cache, [i], draft, [5])
            cache.truncate(i, length + accepted)
        assert compact.held_pages(sid) <= page_bound(compact, 5)
        if accepted:
            decode(layers, clean, [cid], x[:, length : length + accepted], [accepted])
        length += accepted
    nxt = x[:, length : length + 2]
    expected = decode(layers, every, [fid], nxt, [1, 1])
    assert torch.equal(decode(layers, compact, [sid], nxt, [1, 1]), expected)
    assert_close(expected, decode(layers, clean, [cid], nxt, [1, 1]))


def test_compact_refusals_change_nothing():
    cache = V4Cache(tiny(), num_pages=6, page_size=2, max_rollback=0, num_entry_pages={CSA: 1, HCA: 6})
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve([a], 10)
    for layer in range(3):
        cache.advance(layer, [a], 10)

    def state():
        return (
            {s: list(p) for s, p in cache._seq_pages.items()}, list(cache._free), cache.length(a),
            {k: ({s: list(t) for s, t in p.tables.items()}, list(p.free)) for k, p in cache.pools.items()},
        )  # fmt: skip

    before = state()
    # 6 token pages: 1 free + 2 that this reservation would release (tokens 0 ... 3 < 10 - 7 rounded)
    with pytest.raises(CacheFullError, match=r"needs 4 new pages, only 1 of 6 are free \(\+1 this reservation"):
        cache.reserve([a, b], [6, 1])
    assert state() == before and cache.first_held(a) == 0
    # the token pages fit (2 + 1 of 1 free + 1 released), the CSA pool (two entries per page, a's
    # 2 entries in its only page) does not: 12 tokens have 3 entries
    with pytest.raises(CacheFullError, match="needs 1 new compressed_sparse_attention entry pages, only 0 of 1"):
        cache.reserve([a, b], [2, 1])
    assert state() == before
    cache.reserve([b], 1)
    cache.reserve([a], 1)  # fits only with the page it releases (tokens 0, 1)
    assert cache.first_held(a) == 2 and cache.num_free_pages == 0
    with pytest.raises(ValueError, match=r"tokens 0 \.\.\. 3 of sequence 0: its rows before token 2 were released"):
        cache.slots(a, 0, 4)
    with pytest.raises(ValueError, match=r"not within sequence 0's 11 reserved tokens"):
        cache.slots(a, 10, 13)
    assert cache.slots(a, 2, 3).tolist() == [cache._seq_pages[a][1] * 2]
    # the layers wrote 10 tokens: a step at 9 reads from 2 (held), one at 8 from 1 (released)
    with pytest.raises(ValueError, match=r"sequence 0 can roll back at most 2 tokens \(to length 9"):
        cache.truncate(a, 8)
    cache.truncate(a, 9)
    cache.truncate(a, 0)  # no rows needed: always exact
    assert cache.first_held(a) == 0 and cache.num_free_pages == 5


class CompactV4CacheMachine(V4CacheMachine):
    """The same rules on a compact cache whose layers write what is reserved: truncation is
    refused (changing nothing) exactly when the rows it needs were released, entries keep their
    own pages, and a sequence holds at most page_bound token pages."""

    @initialize(num_pages=st.integers(1, 12), page_size=st.sampled_from([2, 4, 8]), max_rollback=st.integers(0, 6))
    def build(self, num_pages, page_size, max_rollback):
        self.cache = V4Cache(tiny(), num_pages, page_size, max_rollback=max_rollback, num_entry_pages=12)
        self.lengths = {}
        self.step = {}

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def reserve(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.lengths)), min_size=1, unique=True))
        counts = data.draw(st.lists(st.integers(0, 20), min_size=len(ids), max_size=len(ids)))
        before = {s: list(p) for s, p in self.cache._seq_pages.items()}
        try:
            self.cache.reserve(ids, counts)
        except CacheFullError:
            assert self.cache._seq_pages == before
            return
        for sid, n in zip(ids, counts):
            self.step[sid] = (self.lengths[sid], n)
            self.lengths[sid] += n
            for layer in range(3):
                self.cache.advance(layer, [sid], n)

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def truncate(self, data):
        sid = data.draw(st.sampled_from(sorted(self.lengths)))
        new_length = data.draw(st.integers(0, self.lengths[sid]))
        start, step = self.step.get(sid, (0, 0))
        try:
            self.cache.truncate(sid, new_length)
        except ValueError as error:
            assert "can roll back at most" in str(error)
            assert new_length < start - self.cache.max_rollback and new_length > 0
            assert self.cache.length(sid) == self.lengths[sid]
            return
        self.lengths[sid] = new_length
        self.step[sid] = (min(start, new_length), step)  # truncation never holds more pages

    @invariant()
    def pages_are_accounted_for(self):
        cache = self.cache
        owned = owned_pages(cache)
        assert len(set(owned)) == len(owned)
        assert sorted(owned + cache._free) == list(range(cache.num_pages))
        for sid, length in self.lengths.items():
            pages = cache._seq_pages[sid]
            assert cache.length(sid) == length and len(pages) == -(-length // cache.page_size)
            released = cache.first_held(sid) // cache.page_size
            assert pages[:released] == [RELEASED] * released and RELEASED not in pages[released:]
            assert cache.held_pages(sid) <= page_bound(cache, self.step.get(sid, (0, 0))[1])
        for pool in cache.pools.values():
            taken = [p for sid in self.lengths for p in pool.tables[sid]]
            assert sorted(taken + pool.free) == list(range(pool.num_pages))
            for sid, length in self.lengths.items():
                assert len(pool.tables[sid]) == pool.pages_for(length)


TestCompactV4CacheMachine = CompactV4CacheMachine.TestCase
TestCompactV4CacheMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


MODEL1 = Model1Format()
FP8_CONFIG = dict(
    TINY, head_dim=512, rope_dim=64, num_heads=2, index_n_heads=2, index_head_dim=64, hidden_size=64, q_lora_rank=32
)  # MODEL1 rows are 512 wide with 64 roped channels


def model1_rounded(rows: torch.Tensor) -> torch.Tensor:
    """What a MODEL1 page gives back for float rows [n, 512]."""
    return MODEL1.unpack(*MODEL1.pack(rows))


class Model1RoundedCache(V4Cache):
    """A float32 cache holding exactly the values an FP8 one holds: kv and entries rounded
    through MODEL1, index keys through MXFP4, raw compressor rows in bfloat16."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, dtype=torch.float32, **kwargs)
        names = ("raw", "index_raw")
        self.layers = tuple(
            dataclasses.replace(store, **{n: t.bfloat16() for n in names if (t := getattr(store, n)) is not None})
            for store in self.layers
        )

    def write(self, layer, name, slots, rows):
        if name in ("kv", "entries"):
            rows = model1_rounded(rows.detach().reshape(-1, 512).float())
        if name == "index_keys":
            fp4 = Mxfp4KeyFormat(self.config.index_head_dim)
            rows = fp4.unpack(fp4.pack(rows.detach().reshape(-1, self.config.index_head_dim).float()))
        super().write(layer, name, slots, rows)


def test_fp8_layout_and_round_trip():
    """MODEL1 pages of page_size rows for kv and entries, MXFP4 index keys, bfloat16 raw rows; write /
    read is Model1Format's pack / unpack (float64 through float32); kvcache is the MODEL1 view
    over the same bytes."""
    config = V4Config(**FP8_CONFIG)
    cache = V4Cache(config, num_pages=3, page_size=8, dtype="fp8", num_entry_pages=5)
    csa, hca = cache.layers[1], cache.layers[2]
    assert cache.dtype == torch.float8_e4m3fn and cache.is_fp8
    assert csa.kv.dtype == torch.uint8 and tuple(csa.kv.shape) == (3, MODEL1.page_bytes(8))
    assert tuple(csa.entries.shape) == tuple(hca.entries.shape) == (5, MODEL1.page_bytes(8))
    assert csa.raw.dtype == csa.index_raw.dtype == hca.raw.dtype == torch.bfloat16
    fp4 = Mxfp4KeyFormat(config.index_head_dim)  # 64-dim keys: 32 code bytes + 2 scales
    assert csa.index_keys.dtype == torch.uint8 and tuple(csa.index_keys.shape) == (5, 8, 1, fp4.bytes_per_token)
    generator = torch.Generator().manual_seed(9)
    scales = torch.logspace(-3, 3, 6, dtype=torch.float64)[:, None]  # tiles far from 1 both ways
    rows = torch.randn(6, 512, dtype=torch.float64, generator=generator) * scales
    targets = [(0, "kv", [23, 0, 9, 8, 15, 1]), (1, "entries", [9, 0, 3, 4, 7, 2]), (2, "entries", [4, 0, 2, 1, 3])]
    for layer, name, where in targets:
        slots = torch.tensor(where)
        cache.write(layer, name, slots, rows[: len(where)])
        got = cache.read(layer, name, slots)
        assert got.dtype == torch.float32 and torch.equal(got, model1_rounded(rows[: len(where)].float()))
        assert torch.equal(cache.read(layer, name, slots, dtype=torch.bfloat16), got.bfloat16())
    bf16 = torch.randn(2, 512, generator=generator).bfloat16()
    cache.write(0, "kv", torch.tensor([3, 4]), bf16)
    assert torch.equal(cache.read(0, "kv", torch.tensor([3, 4])), model1_rounded(bf16))
    view = cache.kvcache(0)
    assert tuple(view.shape) == (3, 8, 1, 584) and view.data_ptr() == cache.layers[0].kv.data_ptr()
    assert tuple(cache.kvcache(1, "entries").shape) == (5, 8, 1, 584)
    assert cache.kvcache(1, "index_keys") is csa.index_keys
    keys = torch.randn(3, config.index_head_dim, generator=generator)
    cache.write(1, "index_keys", torch.tensor([7, 0, 12]), keys)
    assert torch.equal(cache.read(1, "index_keys", torch.tensor([7, 0, 12]))[:, 0], fp4.unpack(fp4.pack(keys)))


def test_plain_kvcache_is_a_view():
    cache = V4Cache(tiny(), num_pages=3, page_size=8, dtype=torch.bfloat16)
    kv, entries = cache.kvcache(1), cache.kvcache(1, "entries")
    assert tuple(kv.shape) == (3, 8, 1, 32) and tuple(entries.shape) == (3, 8, 1, 32)
    kv[2, 5, 0] = 3.0
    assert torch.equal(cache.read(1, "kv", torch.tensor([21])), torch.full((1, 32), 3.0, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="kvcache takes 'kv', 'entries' or 'index_keys', got 'raw'"):
        cache.kvcache(1, "raw")
    with pytest.raises(ValueError, match="layer 0 is a sliding layer: it has no compressed entries"):
        cache.entry_slots(0, 0, 0, 1)


@pytest.mark.parametrize("max_rollback", [None, 0], ids=["keep-all", "rollback0"])
def test_fp8_cache_equals_its_rounding(max_rollback):
    """A float32 model over an FP8 cache gives exactly what it gives over a float32 cache holding
    the MODEL1-rounded rows (and bfloat16 raw rows and keys), compact or not; and it stays within
    FP8 rounding of the float32 cache (reference backend: the kernels are held to it below)."""
    config = V4Config(**FP8_CONFIG)
    layers = [layer.float() for layer in stack(config, seed=4)]
    for layer in layers:
        layer.backend = "reference"
    x = torch.randn(2, 20, config.hidden_size, generator=torch.Generator().manual_seed(10))
    steps = [5, 1, 3, 4, 1, 6]
    outs = []
    for cache in (
        V4Cache(config, 12, 4, dtype="fp8", max_rollback=max_rollback),
        Model1RoundedCache(config, 12, 4),
        V4Cache(config, 12, 4, dtype=torch.float32),
    ):
        ids = [cache.add_sequence(), cache.add_sequence()]
        outs.append(decode(layers, cache, ids, x, steps) - x)  # the layers' share of the residual stream
    fp8, rounded, fp32 = outs
    assert torch.equal(fp8, rounded)
    # e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4 per value)
    assert (fp8 - fp32).abs().max() <= 2**-4 * fp32.abs().max()


def test_triton_backend_equals_the_reference():
    """backend="triton" (the interpreter here) over a float32 cache: the sparse decode kernel,
    the indexer kernels and the compressor kernel give the reference backend's outputs, for a
    prefill, single-token steps and multi-token (verify-sized) steps of a batch of two."""
    config = tiny(num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA))
    layers = [layer.float() for layer in stack(config)]
    x = torch.randn(2, 21, config.hidden_size, generator=torch.Generator().manual_seed(1))
    outs = []
    for backend in ("reference", "triton"):
        for layer in layers:
            layer.backend = backend
        cache = V4Cache(config, num_pages=24, page_size=4, dtype=torch.float32)
        ids = [cache.add_sequence(), cache.add_sequence()]
        outs.append(decode(layers, cache, ids, x, [9, 1, 3, 1, 1, 6]))
    assert_close(outs[1], outs[0], 1e-5)
    assert_close(outs[0], run(layers, x), 1e-5)


def test_triton_backend_over_an_fp8_cache_equals_the_reference():
    """backend="triton" over MODEL1 pages: the compressor kernel quantizes entries on write and
    the sparse decode kernel reads MODEL1 window rows and entries; the reference backend writes
    through Model1Format and dequantizes. Same bytes, so outputs agree to float32 rounding."""
    config = V4Config(**FP8_CONFIG)
    layers = [layer.float() for layer in stack(config, seed=4)]
    x = torch.randn(1, 11, config.hidden_size, generator=torch.Generator().manual_seed(10))
    outs = []
    for backend in ("reference", "triton"):
        for layer in layers:
            layer.backend = backend
        cache = V4Cache(config, 6, 4, dtype="fp8", max_rollback=0)
        outs.append(decode(layers, cache, [cache.add_sequence()], x, [8, 1, 2]) - x)
    assert (outs[1] - outs[0]).abs().max() <= 1e-5 * outs[0].abs().max()
