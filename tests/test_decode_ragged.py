"""Ragged query lengths: `seqlens_q` gives each row of a padded q [b, max_s_q, h_q, d] its own
number of query tokens. A ragged call equals running each row alone; padding is never read
and comes back as out = 0, lse = +inf."""

from __future__ import annotations

import pytest
import torch

from mla.kernels import flash_mla_with_kvcache, get_mla_metadata

from .test_decode import DEVICE, assert_like_reference, check_against_reference, make_inputs, to_fp8_cache
from .test_decode_sparse import sparse_call

ROWS = [2, 0, 7, 1]
"""Query tokens per row: 0, 1, 2 and 7 in one batch, not sorted."""


def ragged_inputs(dtype, lens, seed, fp8=False, h_q=16, d=80, dv=64, page=16):
    """Dense inputs with q [4, 7, h_q, d] whose padding (past each row's count) is NaN."""
    q, k_cache, block_table, cache_seqlens = make_inputs(len(ROWS), max(ROWS), h_q, 1, d, page, lens, dtype, seed=seed)
    for i, n in enumerate(ROWS):
        q[i, n:] = float("nan")
    if fp8:
        k_cache = to_fp8_cache(k_cache, dv)
    return q, k_cache, block_table, cache_seqlens, torch.tensor(ROWS, dtype=torch.int32, device=DEVICE)


# the bf16 cache runs the split + combine path, the FP8 cache one split per row
@pytest.mark.parametrize("fp8,num_sm", [(False, 64), (True, None)], ids=["bf16-split", "fp8"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ragged_rows_equal_each_row_alone(nan_empty, causal, fp8, num_sm):
    # row 2 has 7 queries over 5 cached tokens: causal, its first two see nothing
    q, k_cache, block_table, lens, seqlens_q = ragged_inputs(torch.bfloat16, [40, 17, 5, 300], seed=int(causal), fp8=fp8)
    kw = dict(causal=causal, is_fp8_kvcache=fp8)
    splits = 2 if num_sm else 0
    out, lse = check_against_reference(q, k_cache, block_table, lens, 64, num_sm=num_sm, min_splits=splits, seqlens_q=seqlens_q, **kw)
    for i, n in enumerate(ROWS):
        assert torch.equal(out[i, n:], torch.zeros_like(out[i, n:])) and torch.isposinf(lse[i, :, n:]).all()
        if n:
            # the ragged row, held to the tolerance rule against the row run alone (s_q = n)
            alone = (q[i : i + 1, :n], k_cache, block_table[i : i + 1], lens[i : i + 1], 64)
            assert_like_reference(out[i : i + 1, :n], lse[i : i + 1, :, :n], *alone, **kw)
    blind = 2 if causal else 0  # row 2: 7 queries over 5 cached tokens; causal, query i sees j <= i - 2
    assert torch.isposinf(lse[2, :, :blind]).all() and torch.isfinite(lse[2, :, blind:7]).all()
    assert not out.isnan().any()


def test_full_rows_equal_the_plain_call(nan_empty):
    """seqlens_q equal to s_q everywhere is the plain call, bit for bit, split or not."""
    q, k_cache, block_table, lens = make_inputs(3, 3, 16, 1, 576, 64, [400, 3, 70], torch.float16, seed=5)
    full = torch.full((3,), 3, dtype=torch.int32, device=DEVICE)
    for num_sm in (None, 64):
        meta = get_mla_metadata(lens, 3 * 16, 1, num_sm=num_sm)
        plain = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, *meta, causal=True)
        ragged = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, *meta, causal=True, seqlens_q=full)
        assert torch.equal(plain[0], ragged[0]) and torch.equal(plain[1], ragged[1])


@pytest.mark.parametrize("dtype,num_sm", [("fp32", 64), ("fp8", None)], ids=["fp32-split", "fp8"])
def test_ragged_sparse_with_extra_cache_and_sink(nan_empty, dtype, num_sm):
    """Everything at once: ragged rows, slot lists with topk lengths, an extra cache, sinks,
    a split schedule; padded tokens' index entries name NaN slots and are never read."""
    args, kw = sparse_call(13, 4, 7, 16, 1, 80, 64, dtype, 40, 16, [40, 12, 0, 40], (4, 300, [300, 9, 9, 0]),
                           sink=True, rows_read=ROWS)  # fmt: skip
    seqlens_q = torch.tensor(ROWS, dtype=torch.int32, device=DEVICE)
    out, lse = check_against_reference(*args, num_sm=num_sm, min_splits=2 if num_sm else 0, seqlens_q=seqlens_q, **kw)
    for i, n in enumerate(ROWS):
        assert torch.equal(out[i, n:], torch.zeros_like(out[i, n:])) and torch.isposinf(lse[i, :, n:]).all()
    assert not out.isnan().any()
