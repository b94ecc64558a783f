"""Ragged query lengths: `seqlens_q` gives each row of a padded q [b, max_s_q, h_q, d] its own
number of query tokens. A ragged call equals running each row alone; padding is never read
and comes back as out = 0, lse = +inf. The cases and their tolerance are the conformance
suite's (`mla.conformance`): rows of 2, 0, 7 and 1 query tokens, NaN padding."""

from __future__ import annotations

import pytest
import torch

from mla.conformance import GROUPS, Call, Case, check_outputs
from mla.conformance.cases import RAGGED_ROWS
from mla.kernels import flash_mla_with_kvcache, get_mla_metadata

from .test_decode import DEVICE, run_kernel, splits
from .utils import case_params


def assert_padding_is_empty(out: torch.Tensor, lse: torch.Tensor) -> None:
    for i, n in enumerate(RAGGED_ROWS):
        assert torch.equal(out[i, n:], torch.zeros_like(out[i, n:])) and torch.isposinf(lse[i, :, n:]).all()


# the plain cache runs the split + combine path, the FP8 cache one split per row
@pytest.mark.parametrize("case", case_params(*GROUPS["ragged-dense"]))
def test_ragged_rows_equal_each_row_alone(case):
    result = run_kernel(case)
    out, lse = result.outcome.out, result.outcome.lse
    assert_padding_is_empty(out, lse)
    call = case.build(DEVICE)
    for i, n in enumerate(RAGGED_ROWS):
        if n:
            # the ragged row, held to the tolerance rule against the row run alone (s_q = n)
            kwargs = {k: v for k, v in call.kwargs.items() if k != "seqlens_q"}
            alone = Call(call.q[i : i + 1, :n], call.k_cache, call.block_table[i : i + 1], call.cache_seqlens[i : i + 1],
                         call.head_dim_v, kwargs)  # fmt: skip
            verdict = check_outputs(alone, out[i : i + 1, :n], lse[i : i + 1, :, :n])
            assert verdict.passed, f"row {i}: {verdict.message}"
    blind = 2 if case.causal else 0  # row 2: 7 queries over 5 cached tokens; causal, query i sees j <= i - 2
    assert torch.isposinf(lse[2, :, :blind]).all() and torch.isfinite(lse[2, :, blind:7]).all()
    assert not case.num_sm or splits(result) >= 2, "the schedule did not split as intended"


def test_full_rows_equal_the_plain_call(nan_empty):
    """seqlens_q equal to s_q everywhere is the plain call, bit for bit, split or not."""
    q, k_cache, block_table, lens, _ = Case(3, 3, 16, 1, 576, 512, "fp16", 64, seed=5, lens=(400, 3, 70)).build(DEVICE).args
    full = torch.full((3,), 3, dtype=torch.int32, device=DEVICE)
    for num_sm in (None, 64):
        meta = get_mla_metadata(lens, 3 * 16, 1, num_sm=num_sm)
        plain = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, *meta, causal=True)
        ragged = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, *meta, causal=True, seqlens_q=full)
        assert torch.equal(plain[0], ragged[0]) and torch.equal(plain[1], ragged[1])


@pytest.mark.parametrize("case", case_params(*GROUPS["ragged-sparse"]))
def test_ragged_sparse_with_extra_cache_and_sink(case):
    """Everything at once: ragged rows, slot lists with topk lengths, an extra cache, sinks,
    a split schedule; padded tokens' index entries name NaN slots and are never read."""
    result = run_kernel(case)
    assert_padding_is_empty(result.outcome.out, result.outcome.lse)
    assert not case.num_sm or splits(result) >= 2, "the schedule did not split as intended"
