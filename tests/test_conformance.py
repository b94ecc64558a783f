"""The conformance suite as a product (`mla.conformance`): the command passes the reference and
fails three broken implementations with their symptoms; adapters, capabilities and the case list.
(Our Triton kernel runs every quick case through `check_case` in tests/test_decode*.py.)"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from mla import kernels, reference
from mla.conformance import (
    CASES,
    FEATURES,
    GROUPS,
    UNSUPPORTED,
    Capabilities,
    FlashMLATarget,
    PlainTarget,
    Support,
    compare,
    load_target,
    run,
    select,
)
from mla.conformance.__main__ import main, parse_args
from mla.conformance.cases import DIMS, HEADS, PAGES

REPO = Path(__file__).resolve().parents[1]


def plain_reference(q, k_cache, block_table, cache_seqlens, softmax_scale, causal):
    """The reference as a plain callable; V is the first 64 channels (all of them when d < 64)."""
    dv = min(64, q.shape[-1])
    return reference.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv, softmax_scale=softmax_scale,
                                            causal=causal)[0]  # fmt: skip


def page64_only(q, k_cache, *args, **kwargs):
    """The reference, refusing every page size but 64."""
    if k_cache.shape[1] != 64:
        raise NotImplementedError(f"page size {k_cache.shape[1]}: only 64")
    return reference.flash_mla_with_kvcache(q, k_cache, *args, **kwargs)


class SchedMeta:
    """Stands in for FlashMLA's FlashMLASchedMeta (planned on first use)."""


def flashmla_metadata(*args, **kwargs):
    """FlashMLA's current get_mla_metadata: takes the old form's arguments and ignores them."""
    return SchedMeta(), None


def old_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
    """The old form only (FlashMLA before its sparse release)."""
    return kernels.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)


def junit_failures(path) -> list[str]:
    return [f.get("message") for f in ET.parse(path).iter("failure")]


OURS = [
    # the quick reference run of every feature on fp32 data, and the kernel on a few of those cases
    # from a bare environment: the command turns the Triton interpreter on for --device cpu itself
    pytest.param("mla.reference:flash_mla_with_kvcache", ["--dtypes", "fp32"], id="reference-fp32"),
    pytest.param("mla.kernels:flash_mla_with_kvcache", ["--case", "*-fp32-d80v64-topk320-lengths-extra-sink-split"],
                 id="kernel-one-case"),
    pytest.param("mla.reference:flash_mla_with_kvcache", [], id="reference", marks=pytest.mark.slow),
    pytest.param("mla.kernels:flash_mla_with_kvcache", [], id="kernel", marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.parametrize("spec,options", OURS)
def test_the_command_passes_our_implementations(spec, options, tmp_path):
    """Exit status 0, a table row per feature with every case passed, and the JUnit report."""
    junit = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "mla.conformance", spec, "--device", "cpu", *options, "--junit", str(junit)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]
    args = parse_args([spec, *options])
    chosen = select(args.full, args.features, args.dtypes, args.case)
    assert chosen
    for feature in (*FEATURES, "all"):
        count = len(chosen) if feature == "all" else sum(feature in case.features for case in chosen)
        assert count or args.case, f"no {feature} case chosen"
        row = rf"^{feature} +{count} +{count} +0 +0 +" + (r"\d" if count else "-")
        assert re.search(row, proc.stdout, flags=re.MULTILINE), f"no row {row!r} in\n{proc.stdout}"
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == (str(len(chosen)), "0", "0")


@pytest.mark.parametrize(
    "name,features,symptom",
    [
        pytest.param("scale_off_by_one_percent", "dense,causal", "softmax_scale is off by +1.00%", id="scale"),
        pytest.param("reads_one_past_the_end", "dense,causal", "the page slots past cache_seqlens", id="one-past-the-end"),
        pytest.param("reads_minus_one_entries", "sparse,sink,extra", "-1 entries of indices", id="minus-one"),
    ],
)
def test_the_command_fails_a_broken_implementation_with_its_symptom(name, features, symptom, tmp_path, capsys):
    """tests/broken_decode.py: each defect fails some case with a message that names it, and the exit status is 1."""
    junit = tmp_path / "broken.xml"
    status = main([f"tests.broken_decode:{name}", "--device", "cpu", "--dtypes", "fp32", "--features", features,
                   "--case", "*-d80v64*", "--junit", str(junit)])  # fmt: skip
    failures, printed = junit_failures(junit), capsys.readouterr().out
    assert status == 1 and failures, printed
    assert any(symptom in message for message in failures), failures
    assert f"repro: python -m mla.conformance tests.broken_decode:{name} --device cpu --case " in printed


def test_plain_callables_run_the_dense_cases_of_their_head_dim():
    report = run(load_target("tests.test_conformance:plain_reference"), dtypes=["fp32"], features=["dense", "causal"])
    ran = [r for r in report.results if r.status != UNSUPPORTED]
    assert ran and all(r.passed and r.case.dv == 64 for r in ran)
    others = [r for r in report.results if r.case.dv != 64]
    assert others and all(re.search(r"returns \d+ value channels, this case has head_dim_v", r.message) for r in others)
    assert report.exit_status == 0
    sparse = next(case for case in GROUPS["sparse"])
    assert "dense calls only" in PlainTarget(plain_reference).unsupported(sparse)


def test_load_target_finds_call_and_metadata_forms():
    forms = {}
    for spec in ("mla.kernels:flash_mla_with_kvcache", "mla.reference:flash_mla_with_kvcache"):
        target = load_target(spec)
        target.prepare("cpu")
        forms[spec] = target.forms
    assert forms == {"mla.kernels:flash_mla_with_kvcache": ("old", "new"), "mla.reference:flash_mla_with_kvcache": ("new",)}
    for get_mla_metadata, expected in ((flashmla_metadata, ("new",)), (old_metadata, ("old",)), (None, ("none",))):
        target = FlashMLATarget(reference.flash_mla_with_kvcache, get_mla_metadata)
        target.prepare("cpu")
        assert target.forms == expected, get_mla_metadata
    assert isinstance(load_target("tests.test_conformance:plain_reference"), PlainTarget)
    old_only = Support(load_target("mla.kernels:flash_mla_with_kvcache", metadata="old"), "cpu")
    assert old_only.unsupported(GROUPS["fp8"][0]) is None
    assert "old form, which does not plan sparse calls" in old_only.unsupported(GROUPS["sparse"][0])
    with pytest.raises(ValueError, match="PACKAGE.MODULE:FUNCTION"):
        load_target("mla.reference.flash_mla_with_kvcache")


def test_usage_errors_exit_2(capsys):
    reference_spec = "mla.reference:flash_mla_with_kvcache"
    for argv, text in (([reference_spec, "--features", "dense,paged"], "unknown paged; choose from dense, causal"),
                       ([reference_spec, "--dtypes", "fp64"], "unknown fp64"),
                       ([reference_spec, "--quick", "--full"], "not allowed with argument"),
                       (["mla.reference:no_such_function"], "cannot load the target mla.reference:no_such_function"),
                       (["no_such_module:f"], "ModuleNotFoundError")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and text in capsys.readouterr().err, argv
    assert main([reference_spec, "--case", "no-such-case"]) == 2
    assert "no case matches" in capsys.readouterr().err
    assert parse_args([reference_spec, "--full"]).full and not parse_args([reference_spec]).full


def test_the_sparse_release_old_form_plans_sparse_calls_as_vllm_does():
    """get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, num_heads_q, is_fp8_kvcache, topk)
    -> two tensors: sparse calls are planned with topk per row; an extra cache it cannot plan."""
    planned = []

    def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None, is_fp8_kvcache=False,
                         topk=None):  # fmt: skip
        planned.append((cache_seqlens.tolist(), num_q_tokens_per_head_k, num_heads_k, num_heads_q, is_fp8_kvcache, topk))
        return torch.zeros(1, 2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)

    def decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, **kwargs):
        return reference.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, **kwargs)

    target = FlashMLATarget(decode, get_mla_metadata)
    case = GROUPS["sparse"][0]  # b2 s_q1 h1, topk 64, no extra cache
    report = run(target, pattern=case.id, capabilities=Capabilities())
    assert target.forms == ("old",) and report.exit_status == 0, report.table()
    assert planned[-1] == ([64, 64], 1, 1, 1, False, 64)
    fp8 = next(c for c in CASES if c.sparse and c.fp8 and c.extra is None)
    target(fp8.build(), None)
    assert planned[-1][3:] == (fp8.h_q, True, fp8.topk)
    with_extra = next(c for c in GROUPS["sparse"] if c.extra is not None)
    assert "does not plan an extra cache" in Support(target, "cpu").unsupported(with_extra)


def test_each_metadata_form_schedules_the_kernel():
    """The old form's tensors, the new form's FlashMLASchedMeta, and none at all."""
    case = min((c for c in GROUPS["dense-sweep"] if c.num_sm and c.dtype == "fp32"), key=lambda c: c.h_q * c.d)
    for forms in (("old",), ("new",), ("none",)):
        target = FlashMLATarget(kernels.flash_mla_with_kvcache, kernels.get_mla_metadata, forms=forms)
        report = run(target, pattern=case.id)
        assert report.exit_status == 0, report.table()


def test_declared_capabilities_decide_support_and_a_raise_is_then_a_failure():
    target = FlashMLATarget(page64_only, reference.get_mla_metadata)
    selection = dict(dtypes=["fp32"], features=["dense", "causal"], pattern="*-d80v64*")  # pages of 1, 16 and 64
    declared = Capabilities(features=frozenset({"dense", "causal"}), page_sizes=frozenset({64}))
    honest = run(target, capabilities=declared, **selection)
    assert honest.exit_status == 0 and not honest.probed
    assert {r.message for r in honest.results if r.status == UNSUPPORTED} == {"does not declare page size 1",
                                                                               "does not declare page size 16"}
    page64_only.conformance_capabilities = declared  # the attribute form of the same declaration
    try:
        assert [r.status for r in run(target, **selection).results] == [r.status for r in honest.results]
    finally:
        del page64_only.conformance_capabilities
    probed = run(target, **selection)
    assert probed.probed and probed.exit_status == 0
    assert [r.status for r in probed.results] == [r.status for r in honest.results]
    assert all("raised on a tiny call" in r.message for r in probed.results if r.status == UNSUPPORTED)
    boastful = run(target, capabilities=Capabilities(), **selection)
    assert boastful.exit_status == 1
    assert {r.message for r in boastful.results if not r.passed} == {"raised NotImplementedError: page size 1: only 64",
                                                                      "raised NotImplementedError: page size 16: only 64"}


def test_capabilities_name_what_a_case_needs_beyond_them():
    """A sparse-only kernel's declaration: FP8 rows of 576/512 on pages of 64, 64 or 128 query heads, a rule on topk."""
    sparse_decode = Capabilities(
        features=frozenset({"sparse", "fp8", "sink", "extra"}), dtypes=frozenset({"bf16"}), page_sizes=frozenset({64}),
        head_dims=frozenset({(576, 512)}), heads=frozenset({(64, 1), (128, 1)}),
        rule=lambda case: None if case.topk % 64 == 0 else f"topk {case.topk} is not a multiple of 64",
    )  # fmt: skip
    deepseek = GROUPS["deepseek-sparse"][1]  # h128, FP8, topk 128, an extra cache of pages of 64, sinks
    assert sparse_decode.unsupported(deepseek) is None
    for change, reason in (
        (dict(fp8=False), None),  # a bf16 cache: fewer features, nothing undeclared
        (dict(dtype="fp16"), "does not declare q dtype fp16"),
        (dict(extra=dataclasses.replace(deepseek.extra, page=16)), "does not declare extra page size 16"),
        (dict(d=80, dv=64), "does not declare head dims (d, dv) (80, 64)"),
        (dict(h_q=16), "does not declare heads (h_q, h_kv) (16, 1)"),
        (dict(topk=100), "topk 100 is not a multiple of 64"),
        (dict(topk=None, lens=(5, 9)), "does not declare dense"),
    ):
        assert sparse_decode.unsupported(dataclasses.replace(deepseek, **change)) == reason, change


def test_a_run_where_nothing_ran_fails():
    def refuses(*args, **kwargs):
        raise NotImplementedError("nothing")

    report = run(FlashMLATarget(refuses, forms=("none",)), features=["dense"], dtypes=["fp32"])
    assert report.results and all(r.status == UNSUPPORTED for r in report.results) and report.exit_status == 1


def test_compare_reports_each_kind_of_mismatch():
    expected = torch.tensor([1.0, 2.0, float("inf"), 0.5])
    assert compare("x", expected.clone(), expected, atol=0.0).ok, "atol = 0 asks for exact equality, and gets it"
    off = compare("x", torch.tensor([1.0, 2.5, float("inf"), 0.5]), expected, atol=0.0)
    assert off.message == "x: 1/4 elements exceed atol=0 rtol=0; max error 0.5, worst at (1,): 2.5 vs 2" and off.ratio == math.inf
    nan = compare("x", torch.tensor([1.0, float("nan"), float("-inf"), 0.5]), expected, atol=1.0)
    assert "NaN in actual at 1 places" in nan.nan and "first (2,): -inf vs inf" in nan.inf and nan.ratio == math.inf
    close = compare("x", torch.tensor([1.0, 2.1, float("inf"), 0.5]), expected, atol=0.2)
    assert close.ok and close.ratio == pytest.approx(0.5) and close.error == pytest.approx(0.1)


def test_case_ids_are_unique_and_every_case_has_a_group():
    assert len({case.id for case in CASES}) == len(CASES) == sum(len(group) for group in GROUPS.values())


def test_quick_cases_cover_every_feature_and_axis():
    quick = select()
    for feature in FEATURES:
        assert sum(feature in case.features for case in quick) >= 6, feature
    dense, sparse = [c for c in quick if not c.sparse], [c for c in quick if c.sparse]
    assert {(c.h_q, c.h_kv) for c in dense} >= set(HEADS) and {c.page for c in dense} >= set(PAGES)
    assert {(c.d, c.dv) for c in dense} >= set(DIMS) and {(c.d, c.dv) for c in sparse} >= set(DIMS)
    assert {c.h_q for c in sparse} >= {1, 3, 16, 64, 128} and {c.page for c in sparse} >= set(PAGES)
    for cases in (dense, sparse):
        assert {c.dtype for c in cases} == {"bf16", "fp16", "fp32"} and any(c.fp8 for c in cases)
        assert any(c.seqlens_q for c in cases) and any(c.num_sm for c in cases) and any(c.extra for c in cases)


def test_select_takes_cases_whose_every_feature_is_listed():
    assert {case.features for case in select(features=["dense"])} == {frozenset({"dense"})}
    assert all(case.dtype == "fp16" for case in select(dtypes=["fp16"]))
    slow = next(case for case in CASES if case.slow)
    assert select(full=True, pattern=slow.id) == [slow] and select(pattern=slow.id) == []
    assert len(select(full=True)) == len(CASES)
    with pytest.raises(ValueError, match="unknown features"):
        select(features=["dense", "paged"])


def test_a_probe_is_one_benign_row_of_the_same_configuration():
    for case in select():
        probe = case.probe()
        assert (probe.b, probe.benign) == (1, True) and probe.features == case.features
        call = probe.build()
        tensors = [call.q, call.k_cache, *call.kwargs.values()]
        floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.element_size() > 1]
        assert all(t.isfinite().all() for t in floats), "FP8 bytes aside (quantized from finite values)"
        assert all((call.kwargs[name] >= 0).all() for name in ("indices", "extra_indices_in_kvcache") if name in call.kwargs)


def test_the_package_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "mla.conformance" in packages
