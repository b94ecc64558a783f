"""The decode contract (`mla.reference.contract`): every bad input raises the same error, type
and message, from the Triton launcher and from its PyTorch twin; schedules; torch.compile."""

from __future__ import annotations

import re

import pytest
import torch

from mla import kernels, reference
from mla.conformance import Case, to_fp8_cache

B, S_Q, H_Q, D, DV, PAGE = 2, 2, 4, 80, 64, 16


def dense_args():
    """A valid dense call as a dict of flash_mla_with_kvcache's arguments (fp32, lengths 20 and 5)."""
    call = Case(B, S_Q, H_Q, 1, D, DV, "fp32", PAGE, seed=0, lens=(20, 5)).build()
    return dict(q=call.q, k_cache=call.k_cache, block_table=call.block_table, cache_seqlens=call.cache_seqlens, head_dim_v=DV)


def sparse_args():
    """A valid sparse call: indices into the dense call's cache, with topk lengths, a sink and an extra cache."""
    args = dense_args()
    g = torch.Generator().manual_seed(1)
    slots = torch.tensor([0, 3, 17, -1, 5, 16], dtype=torch.int32)  # pages 0 and 1 hold data
    extra = torch.randn(3, 4, 1, D, generator=g)
    args.update(
        block_table=None, cache_seqlens=None, indices=slots.repeat(B, S_Q, 1),
        topk_length=torch.tensor([6, 2], dtype=torch.int32), attn_sink=torch.zeros(H_Q),
        extra_k_cache=extra, extra_indices_in_kvcache=torch.tensor([1, -1, 11], dtype=torch.int32).repeat(B, S_Q, 1),
        extra_topk_length=torch.tensor([3, 0], dtype=torch.int32),
    )  # fmt: skip
    args["k_cache"] = args["k_cache"].nan_to_num()
    return args


def fp8_args():
    args = dense_args()
    args["q"] = args["q"].bfloat16()
    args["k_cache"] = to_fp8_cache(args["k_cache"].bfloat16(), DV)
    return args | dict(is_fp8_kvcache=True)


def setitem(key, value):
    return lambda a: a.__setitem__(key, value(a) if callable(value) else value)


def index_at(key, where, value):
    def mutate(a):
        a[key] = a[key].clone()
        a[key][where] = value

    return mutate


def old_schedule(a):
    a["tile_scheduler_metadata"], a["num_splits"] = kernels.get_mla_metadata(T([1, 1], dtype=I32), 8, 1)


T = torch.tensor
I32 = torch.int32
DENSE_CASES = [
    pytest.param(setitem("q", lambda a: a["q"][0]), ValueError, r"q must be \[b, s_q, h_q, d\]", id="q-rank"),
    pytest.param(setitem("q", lambda a: a["q"].flatten(0, 1)), ValueError, "pass seqlens_q", id="q-packed"),
    pytest.param(setitem("k_cache", lambda a: a["k_cache"][0]), ValueError, "k_cache must be", id="cache-rank"),
    pytest.param(setitem("q", lambda a: a["q"].to(torch.float8_e4m3fn)), TypeError, "q must be", id="q-fp8"),
    pytest.param(setitem("q", "not a tensor"), TypeError, "q must be a torch.Tensor", id="q-str"),
    pytest.param(setitem("k_cache", lambda a: a["k_cache"].half()), TypeError, "k_cache dtype", id="cache-dtype"),
    pytest.param(setitem("block_table", lambda a: a["block_table"].long()), TypeError, "block_table", id="table-int64"),
    pytest.param(setitem("cache_seqlens", lambda a: a["cache_seqlens"].long()), TypeError, "cache_seqlens", id="lens-int64"),
    pytest.param(setitem("cache_seqlens", lambda a: a["cache_seqlens"][:1]), ValueError, "batch mismatch", id="lens-batch"),
    pytest.param(setitem("k_cache", lambda a: a["k_cache"][..., :48]), ValueError, r"k_cache must be \[num_pages", id="cache-head-dim"),
    pytest.param(setitem("k_cache", lambda a: a["k_cache"].expand(-1, -1, 3, -1)), ValueError, "multiple", id="h_q-mod-h_kv"),
    pytest.param(setitem("k_cache", lambda a: a["k_cache"].to("meta")), ValueError, "k_cache is on", id="device"),
    pytest.param(setitem("head_dim_v", 96), ValueError, "head_dim_v", id="dv-gt-d"),
    pytest.param(setitem("head_dim_v", 0), ValueError, "head_dim_v", id="dv-zero"),
    pytest.param(setitem("softmax_scale", "0.1"), TypeError, "softmax_scale", id="scale-str"),
    pytest.param(setitem("causal", 1), TypeError, "causal", id="causal-int"),
    pytest.param(setitem("cache_seqlens", T([20, -1], dtype=I32)), ValueError, ">= 0", id="negative-len"),
    pytest.param(setitem("cache_seqlens", T([33, 5], dtype=I32)), ValueError, "columns", id="table-narrow"),
    pytest.param(index_at("block_table", (1, 0), 999), ValueError, r"block_table\[1, 0\] = 999", id="table-entry-range"),
    pytest.param(setitem("block_table", lambda a: a["block_table"].tolist()), TypeError, "block_table must be a torch.Tensor", id="table-list"),
    pytest.param(setitem("seqlens_q", T([1, 2])), TypeError, "seqlens_q must be an int32", id="seqlens_q-int64"),
    pytest.param(setitem("seqlens_q", T([0, 1, 3], dtype=I32)), ValueError, "not cumulative", id="seqlens_q-cumulative"),
    pytest.param(setitem("seqlens_q", T([2, 3], dtype=I32)), ValueError, r"seqlens_q\[1\] = 3 is outside \[0, s_q = 2\]", id="seqlens_q-range"),
    pytest.param(setitem("attn_sink", torch.zeros(3)), ValueError, "one value per query head", id="sink-length"),
    pytest.param(setitem("attn_sink", torch.zeros(H_Q, dtype=torch.float64)), TypeError, "attn_sink must be a float32", id="sink-dtype"),
    pytest.param(setitem("topk_length", T([1, 1], dtype=I32)), ValueError, "topk_length is given without indices", id="topk-length-dense"),
    pytest.param(setitem("extra_k_cache", lambda a: a["k_cache"]), ValueError, "pass both or neither", id="extra-alone"),
]  # fmt: skip
SPARSE_CASES = [
    pytest.param(setitem("indices", lambda a: a["indices"].long()), TypeError, "indices must be an int32", id="indices-int64"),
    pytest.param(setitem("indices", lambda a: a["indices"][0]), TypeError, r"indices must be an int32 tensor \[b, s_q, topk\]", id="indices-rank"),
    pytest.param(setitem("indices", lambda a: a["indices"][:, :1]), ValueError, r"indices must be \[b=2, s_q=2", id="indices-shape"),
    pytest.param(setitem("causal", True), ValueError, "causal must be False with indices", id="causal-with-indices"),
    pytest.param(index_at("indices", (1, 0, 1), 96), ValueError, r"indices\[1, 0, 1\] = 96 is outside \[0, 96\)", id="index-past-cache"),
    pytest.param(index_at("indices", (0, 1, 2), -2), ValueError, r"indices\[0, 1, 2\] = -2", id="index-negative"),
    pytest.param(setitem("topk_length", T([7, 0], dtype=I32)), ValueError, r"topk_length\[0\] = 7 is outside \[0, topk = 6\]", id="topk-length-long"),
    pytest.param(setitem("topk_length", T([7, 0])), TypeError, "topk_length must be an int32", id="topk-length-int64"),
    pytest.param(setitem("topk_length", T([1], dtype=I32)), ValueError, r"topk_length must be \[b=2\]", id="topk-length-batch"),
    pytest.param(index_at("extra_indices_in_kvcache", (0, 0, 2), 12), ValueError, r"extra_indices_in_kvcache\[0, 0, 2\] = 12 is outside \[0, 12\)", id="extra-index-range"),
    pytest.param(setitem("extra_topk_length", T([4, 0], dtype=I32)), ValueError, r"extra_topk_length\[0\] = 4", id="extra-topk-length-long"),
    pytest.param(setitem("extra_k_cache", lambda a: a["extra_k_cache"].expand(-1, -1, 2, -1)), ValueError, "extra_k_cache has h_kv = 2", id="extra-h_kv"),
    pytest.param(setitem("extra_k_cache", lambda a: a["extra_k_cache"].half()), TypeError, "extra_k_cache dtype", id="extra-format"),
    pytest.param(setitem("extra_indices_in_kvcache", None), ValueError, "pass both or neither", id="extra-indices-missing"),
    pytest.param(old_schedule, ValueError, "plans dense calls only", id="old-schedule-sparse"),
]  # fmt: skip
FP8_CASES = [
    pytest.param(setitem("q", lambda a: a["q"].to(torch.float8_e4m3fn)), TypeError, "q must be", id="fp8-q"),
    pytest.param(setitem("k_cache", lambda a: torch.nn.functional.pad(a["k_cache"], (0, 4))), ValueError, r"k_cache must be \[num_pages, page_size, h_kv, 100\]", id="byte-width"),
    pytest.param(setitem("k_cache", lambda a: a["k_cache"][..., :99]), ValueError, "k_cache must be", id="byte-width-short"),
    pytest.param(setitem("head_dim_v", 66), ValueError, "head_dim_v=66 with d=80 is not a valid FP8 cache row", id="latent-not-4-aligned"),
    pytest.param(setitem("head_dim_v", 80), ValueError, "rope_dim", id="fp8-without-rope"),
    pytest.param(setitem("is_fp8_kvcache", False), TypeError, "is_fp8_kvcache=False", id="bytes-without-flag"),
    pytest.param(setitem("k_cache", lambda a: torch.nn.functional.pad(a["k_cache"], (0, 1))[..., :100]), ValueError, "multiples of 4 bytes", id="misaligned-strides"),
]  # fmt: skip


def outcome(fn, args):
    try:
        fn(**args)
    except Exception as e:  # noqa: BLE001 - the comparison is the point
        return type(e), str(e)
    return None, None


def assert_same_error(args, error, match):
    got = outcome(kernels.flash_mla_with_kvcache, args)
    assert got[0] is error, f"kernel raised {got}"
    assert re.search(match, got[1]), f"kernel message {got[1]!r} does not match {match!r}"
    assert outcome(reference.flash_mla_with_kvcache, args) == got, "the reference must raise the kernel's error"


@pytest.mark.parametrize("mutate,error,match", DENSE_CASES)
def test_dense_bad_input_raises_the_same_error_in_both(mutate, error, match):
    args = dense_args()
    mutate(args)
    assert_same_error(args, error, match)


@pytest.mark.parametrize("mutate,error,match", SPARSE_CASES)
def test_sparse_bad_input_raises_the_same_error_in_both(mutate, error, match):
    args = sparse_args()
    mutate(args)
    assert_same_error(args, error, match)


@pytest.mark.parametrize("mutate,error,match", FP8_CASES)
def test_fp8_bad_input_raises_the_same_error_in_both(mutate, error, match):
    args = fp8_args()
    mutate(args)
    assert_same_error(args, error, match)


def test_only_the_reference_takes_a_float64_query():
    """The one documented difference: float64 q (over an FP8 cache) is exact ground truth."""
    args = fp8_args()
    args["q"] = args["q"].double()
    assert outcome(kernels.flash_mla_with_kvcache, args) == (
        TypeError, "q must be bfloat16, float16 or float32 (the reference also takes float64), got torch.float64"
    )
    out, lse = reference.flash_mla_with_kvcache(**args, compute_dtype=torch.float64)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32


def test_plain_cache_with_the_fp8_flag_is_rejected():
    args = dense_args() | dict(is_fp8_kvcache=True)
    args["q"] = args["q"].bfloat16()
    assert_same_error(args, TypeError, "uint8 or float8_e4m3fn")


@pytest.mark.parametrize("make", [dense_args, sparse_args, fp8_args], ids=["dense", "sparse", "fp8"])
def test_valid_calls_pass_both(make):
    args = make()
    assert outcome(kernels.flash_mla_with_kvcache, args) == (None, None)
    assert outcome(reference.flash_mla_with_kvcache, args) == (None, None)


def test_value_checks_skip_unread_entries():
    """Only entries a call reads are checked: index entries past topk_length or of padded
    query tokens, and block-table columns past a sequence's pages, may hold anything."""
    args = sparse_args()
    args["indices"] = args["indices"].clone()
    args["indices"][1, :, 2:] = 10**6  # row 1 reads 2 entries
    args["seqlens_q"] = T([2, 1], dtype=I32)
    args["indices"][1, 1] = -7  # row 1's second query is padding
    assert outcome(kernels.flash_mla_with_kvcache, args) == (None, None)
    assert outcome(reference.flash_mla_with_kvcache, args) == (None, None)


def schedule_config_cases():
    """One call's arguments changed in each field a schedule records."""
    return [
        pytest.param("b", lambda a: a.update(q=a["q"][:1], indices=a["indices"][:1], topk_length=a["topk_length"][:1], extra_indices_in_kvcache=a["extra_indices_in_kvcache"][:1], extra_topk_length=a["extra_topk_length"][:1]), id="b"),
        pytest.param("s_q", lambda a: a.update(q=a["q"][:, :1], indices=a["indices"][:, :1], extra_indices_in_kvcache=a["extra_indices_in_kvcache"][:, :1]), id="s_q"),
        pytest.param("h_q", lambda a: a.update(q=a["q"][:, :, :2], attn_sink=None), id="h_q"),
        pytest.param("page_block_size", lambda a: a.update(k_cache=a["k_cache"].reshape(-1, 8, 1, D)), id="page"),
        pytest.param("h_k", lambda a: a.update(k_cache=a["k_cache"].expand(-1, -1, 2, -1), extra_k_cache=a["extra_k_cache"].expand(-1, -1, 2, -1)), id="h_k"),
        pytest.param("topk", lambda a: a.update(indices=a["indices"][..., :5], topk_length=None), id="topk"),
        pytest.param("extra_page_block_size", lambda a: a.update(extra_k_cache=a["extra_k_cache"].reshape(-1, 2, 1, D)), id="extra-page"),
        pytest.param("extra_topk", lambda a: a.update(extra_indices_in_kvcache=a["extra_indices_in_kvcache"][..., :2], extra_topk_length=None), id="extra-topk"),
    ]  # fmt: skip


@pytest.mark.parametrize("impl", [kernels, reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("field,change", schedule_config_cases())
def test_schedule_reused_with_another_configuration_names_the_field(impl, field, change):
    meta, none = impl.get_mla_metadata()
    assert isinstance(meta, reference.FlashMLASchedMeta) and none is None
    args = sparse_args() | dict(tile_scheduler_metadata=meta)
    impl.flash_mla_with_kvcache(**args)
    assert meta.have_initialized and meta.config.topk == 6
    change(args)
    with pytest.raises(ValueError, match=f"planned for {field}="):
        impl.flash_mla_with_kvcache(**args)


@pytest.mark.parametrize(
    "field,change",
    [
        pytest.param("causal", lambda a: a.update(causal=True), id="causal"),
        pytest.param("is_fp8_kvcache", lambda a: a.update(is_fp8_kvcache=True, q=a["q"].bfloat16(), k_cache=to_fp8_cache(a["k_cache"].bfloat16(), DV)), id="fp8"),
    ],
)  # fmt: skip
def test_dense_schedule_reuse_checks_causal_and_fp8(field, change):
    meta, _ = kernels.get_mla_metadata()
    args = dense_args() | dict(tile_scheduler_metadata=meta)
    kernels.flash_mla_with_kvcache(**args)
    planned = meta.tile_scheduler_metadata
    change(args)
    with pytest.raises(ValueError, match=f"planned for {field}="):
        kernels.flash_mla_with_kvcache(**args)
    assert meta.tile_scheduler_metadata is planned, "a rejected call leaves the schedule as it was"


def test_schedule_argument_errors():
    args = dense_args()
    meta, splits = kernels.get_mla_metadata(args["cache_seqlens"], S_Q * H_Q, 1)
    cases = [
        (dict(tile_scheduler_metadata=meta[:1], num_splits=splits), ValueError, "tile_scheduler_metadata must be int32"),
        (dict(tile_scheduler_metadata=meta, num_splits=splits.long()), ValueError, "num_splits must be int32"),
        (dict(tile_scheduler_metadata=meta), ValueError, "or neither"),
        (dict(num_splits=splits), ValueError, "or neither"),
        (dict(tile_scheduler_metadata=kernels.get_mla_metadata()[0], num_splits=splits), ValueError, "num_splits must be None"),
        (dict(tile_scheduler_metadata=[1, 2]), TypeError, "tile_scheduler_metadata must be a FlashMLASchedMeta"),
    ]  # fmt: skip
    for extra, error, match in cases:
        assert_same_error(args | extra, error, match)
    with pytest.raises(TypeError, match="cache_seqlens"):
        kernels.get_mla_metadata(args["cache_seqlens"].long(), 4, 1)
    with pytest.raises(TypeError, match="only num_sm"):
        kernels.get_mla_metadata(num_splits=3)


PREFILL_CASES = [
    pytest.param(setitem("q", lambda a: a["q"][0]), ValueError, r"q must be \[s_q, h_q, d\]", id="q-rank"),
    pytest.param(setitem("kv", lambda a: a["kv"].half()), TypeError, "kv dtype", id="kv-dtype"),
    pytest.param(setitem("kv", lambda a: a["kv"][..., :40]), ValueError, "kv head dim 40", id="kv-head-dim"),
    pytest.param(setitem("indices", lambda a: a["indices"][:, :1]), ValueError, r"indices must be \[s_q=3, h_kv=2", id="indices-shape"),
    pytest.param(setitem("indices", lambda a: a["indices"].long()), TypeError, "indices must be an int32", id="indices-int64"),
    pytest.param(setitem("d_v", 81), ValueError, "d_v must be", id="dv-gt-d"),
    pytest.param(setitem("sm_scale", None), TypeError, "sm_scale", id="scale-none"),
    pytest.param(setitem("attn_sink", torch.zeros(4)), ValueError, "one value per query head", id="sink-length"),
    pytest.param(setitem("topk_length", T([1, 2, 6], dtype=I32)), ValueError, r"topk_length\[2\] = 6 is outside \[0, topk = 5\]", id="topk-length-long"),
    pytest.param(setitem("topk_length", T([1, 2], dtype=I32)), ValueError, r"topk_length must be \[s_q=3\]", id="topk-length-shape"),
]  # fmt: skip


@pytest.mark.parametrize("mutate,error,match", PREFILL_CASES)
def test_sparse_prefill_bad_input_raises_the_same_error_in_both(mutate, error, match):
    g = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(3, 6, D, generator=g), kv=torch.randn(9, 2, D, generator=g),
        indices=torch.randint(-1, 12, (3, 2, 5), generator=g, dtype=I32), sm_scale=0.1, d_v=DV,
    )  # fmt: skip
    assert outcome(kernels.flash_mla_sparse_fwd, args) == outcome(reference.flash_mla_sparse_fwd, args) == (None, None)
    mutate(args)
    got = outcome(kernels.flash_mla_sparse_fwd, args)
    assert got[0] is error and re.search(match, got[1]), f"kernel raised {got}"
    assert outcome(reference.flash_mla_sparse_fwd, args) == got


@pytest.mark.parametrize("make", [dense_args, sparse_args], ids=["dense", "sparse"])
def test_reference_compiles_without_graph_breaks(make):
    """The reference traces whole under torch.compile (fullgraph: a graph break is an error);
    the value checks, which read tensors on the host, are skipped while tracing."""
    torch._dynamo.reset()
    args = make()
    args.update(causal="indices" not in args, seqlens_q=T([2, 1], dtype=I32))
    compiled = torch.compile(reference.flash_mla_with_kvcache, fullgraph=True, backend="eager")
    out, lse = compiled(**args)
    expected = reference.flash_mla_with_kvcache(**args)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
