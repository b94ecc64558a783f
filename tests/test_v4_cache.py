"""`mla.v4_cache.V4Cache`: page bookkeeping (all-or-nothing reserve, no leaks, entry slots), and
the configurations it refuses."""

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mla.cache import CacheFullError
from mla.v4 import CSA, HCA, SLIDING, V4Config
from mla.v4_cache import V4Cache

TINY = dict(
    num_hidden_layers=3,
    layer_types=(SLIDING, CSA, HCA),
    compress_rates={CSA: 4, HCA: 8},
    head_dim=32,
    rope_dim=8,
    num_heads=4,
    sliding_window=8,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=3,
    hidden_size=48,
    q_lora_rank=24,
    o_groups=2,
    o_lora_rank=16,
    compress_rope_theta=40000.0,
    rope_scaling={"factor": 4, "original_max_position_embeddings": 16},
)


def tiny(**changes) -> V4Config:
    return V4Config(**{**TINY, **changes})


def owned_pages(cache: V4Cache) -> list[int]:
    return [p for pages in cache._pages.values() for p in pages]


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
        before = {s: list(p) for s, p in self.cache._pages.items()}
        if need > self.cache.num_free_pages:
            with pytest.raises(CacheFullError, match="free or truncate"):
                self.cache.reserve(ids, counts)
            assert self.cache._pages == before
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
            assert len(self.cache._pages[sid]) == -(-length // self.cache.page_size)


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
        assert per_page == max(1, page_size // m)
        table = cache.entry_table(layer, ids)
        every = []
        for row, sid in enumerate(ids):
            n = cache.length(sid) // m
            slots = cache.entry_slots(layer, sid, 0, n)
            w = torch.arange(n)
            assert torch.equal(slots, table[row, w // per_page].long() * per_page + w % per_page)
            # an entry lives in the page of its window's first token
            assert torch.equal(slots // per_page, cache.slots(sid, 0, n * m)[::m] // page_size)
            every += slots.tolist()
        assert len(set(every)) == len(every)


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


def test_begin_step_counts_each_layer_separately():
    cache = V4Cache(tiny(), num_pages=4, page_size=4)
    sid = cache.add_sequence()
    cache.reserve([sid], 5)
    assert cache.begin_step(0, [sid], 3) == [0]
    assert cache.begin_step(0, [sid], 2) == [3]
    assert cache.begin_step(1, [sid], 5) == [0]
    with pytest.raises(ValueError, match="layer 0 holds 5 tokens of sequence 0, which has 5 reserved: 1 new"):
        cache.begin_step(0, [sid], 1)
    cache.truncate(sid, 2)
    assert (cache.written(0, sid), cache.written(1, sid), cache.written(2, sid)) == (2, 2, 0)


def test_bytes_per_token_counts_every_tensor():
    c = tiny()
    cache = V4Cache(c, num_pages=2, page_size=8, dtype=torch.bfloat16)
    d, D = c.head_dim, c.index_head_dim
    sliding = d
    csa = d + 2 * 2 * d + 2 * 2 * D + (d + D) / 4
    hca = d + 2 * d + d / 8
    assert cache.bytes_per_token == 2 * (sliding + csa + hca)


@pytest.mark.parametrize(
    "make, error, match",
    [
        pytest.param(lambda: V4Cache(TINY, 4, 4), TypeError, "V4Config.*dict", id="config-dict"),
        pytest.param(lambda: V4Cache(tiny(), 4, 6), ValueError, "page_size 6 and the .*compressed_sparse.* rate 4",
                     id="page6-rate4"),
        pytest.param(lambda: V4Cache(tiny(compress_rates={CSA: 4, HCA: 12}), 4, 8), ValueError,
                     "page_size 8 and the heavily.*rate 12", id="page8-rate12"),
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
    with pytest.raises(ValueError, match="n must be >= 0.*-1"):
        cache.reserve([sid], -1)
    with pytest.raises(ValueError, match="2 counts for 1 sequences"):
        cache.reserve([sid], [1, 2])
    with pytest.raises(ValueError, match="unknown sequence id 7"):
        cache.reserve([7], 1)
    assert cache.length(sid) == 0 and cache.num_free_pages == 4
