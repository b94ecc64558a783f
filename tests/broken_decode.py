"""Deliberately broken `flash_mla_with_kvcache`s, each the reference with one classic defect,
that the conformance suite must catch (tests/test_conformance.py). Run one as
`python -m mla.conformance tests.broken_decode:scale_off_by_one_percent` from the repository root."""

from __future__ import annotations

from mla import reference
from mla.reference import get_mla_metadata  # noqa: F401 - the schedule the command finds beside each target


def scale_off_by_one_percent(q, k_cache, block_table, cache_seqlens, head_dim_v, *args, softmax_scale=None, **kwargs):
    """Scores scaled by 1.01 times the softmax scale."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return reference.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, *args,
                                            softmax_scale=1.01 * scale, **kwargs)  # fmt: skip


def reads_one_past_the_end(q, k_cache, block_table, cache_seqlens, head_dim_v, *args, **kwargs):
    """Attends one slot past each sequence's end (an off-by-one length)."""
    lengths = None if cache_seqlens is None else cache_seqlens + 1
    return reference.flash_mla_with_kvcache(q, k_cache, block_table, lengths, head_dim_v, *args, **kwargs)


def reads_minus_one_entries(q, k_cache, block_table, cache_seqlens, head_dim_v, *args, **kwargs):
    """Reads -1 slot-list entries as slots (PyTorch indexing: the cache's last slot) instead of skipping them."""
    for name, cache in (("indices", k_cache), ("extra_indices_in_kvcache", kwargs.get("extra_k_cache"))):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name].where(kwargs[name] != -1, cache.shape[0] * cache.shape[1] - 1)
    return reference.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, *args, **kwargs)
