"""Run cases through a target and report: per case a `Result`, per run a `Report` (table,
JUnit XML, exit status)."""

from __future__ import annotations

import dataclasses
import math
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable

from .cases import DTYPES, FEATURES, Case, select
from .check import check_outputs
from .targets import Capabilities, Outcome, Support, Target, first_line, nan_filled_empty

PASSED, FAILED, UNSUPPORTED = "passed", "failed", "not supported"


@dataclasses.dataclass
class Result:
    """One case's result.

    Attributes:
        case: the case.
        status: PASSED, FAILED or UNSUPPORTED.
        message: the symptoms (failed) or the reason (not supported); "" when passed.
        ratio, error, allowed: worst error / allowed error, and the two there (0 when not run).
        seconds: the target call and the checks.
        outcome: what the target returned (kept by `check_case`; `run` drops it to save memory).
    """

    case: Case
    status: str
    message: str = ""
    ratio: float = 0.0
    error: float = 0.0
    allowed: float = 0.0
    seconds: float = 0.0
    outcome: Outcome | None = None

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def check_case(target: Target, case: Case, device="cpu") -> Result:
    """Build `case` on `device`, call `target` (torch.empty NaN-filled meanwhile), and hold the
    result to the contract (`check.check_outputs`). An exception is a failure: call this only
    for cases the target supports."""
    start = time.perf_counter()
    call = case.build(device)
    try:
        with nan_filled_empty():
            outcome = target(call, case.num_sm)
    except Exception as e:  # noqa: BLE001 - a supported call that raises fails, whatever it raised
        return Result(case, FAILED, f"raised {type(e).__name__}: {first_line(e)}", math.inf, seconds=time.perf_counter() - start)
    verdict = check_outputs(call, outcome.out, outcome.lse)
    return Result(case, PASSED if verdict.passed else FAILED, verdict.message, verdict.ratio, verdict.error,
                  verdict.allowed, time.perf_counter() - start, outcome)  # fmt: skip


@dataclasses.dataclass
class Report:
    """A run's results, in case order, and how it was run."""

    target: str
    device: str
    full: bool
    probed: bool
    features: tuple[str, ...]
    results: list[Result]

    @property
    def exit_status(self) -> int:
        """0 when no supported case failed and at least one case ran; 1 otherwise."""
        ran = [r for r in self.results if r.status != UNSUPPORTED]
        return 0 if ran and all(r.passed for r in ran) else 1

    def by_feature(self) -> dict[str, list[Result]]:
        """The results of the cases that use each selected feature (a case counts under each)."""
        return {f: [r for r in self.results if f in r.case.features] for f in self.features}

    def table(self) -> str:
        """Feature rows: cases, passed, failed, not supported, the worst error against the
        allowed error, the first failing case; then each first failure's symptoms and a
        reproduction, and each feature's first reason for "not supported"."""
        head = ("feature", "cases", "passed", "failed", "not supported", "worst err/allowed", "first failure")
        rows, failures, unsupported = [head], {}, []
        groups = self.by_feature() | {"all": self.results}
        for feature, results in groups.items():
            count = {s: sum(r.status == s for r in results) for s in (PASSED, FAILED, UNSUPPORTED)}
            ran = [r for r in results if r.status != UNSUPPORTED]
            worst = max(ran, key=lambda r: r.ratio, default=None)
            first = next((r for r in results if r.status == FAILED), None)
            rows.append((feature, str(len(results)), str(count[PASSED]), str(count[FAILED]), str(count[UNSUPPORTED]),
                         _ratio(worst), first.case.id if first else "-"))  # fmt: skip
            if first is not None:
                failures.setdefault(first.case.id, first)
            if feature != "all" and (reason := next((r for r in results if r.status == UNSUPPORTED), None)):
                unsupported.append(f"  {feature}: {count[UNSUPPORTED]} not supported, e.g. {reason.case.id}: {reason.message}")
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) if i in (0, 6) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in rows]  # fmt: skip
        lines = [line.rstrip() for line in lines]
        for result in failures.values():
            lines += ["", f"FAILED {result.case.id}: {result.message}", f"  repro: {self.repro(result.case)}"]
        if unsupported:
            lines += ["", "not supported:", *unsupported]
        return "\n".join(lines)

    def repro(self, case: Case) -> str:
        """One line: the command that reruns `case` alone, and its shapes and seed."""
        full = " --full" * case.slow
        return f"python -m mla.conformance {self.target} --device {self.device}{full} --case {case.id}  # {case.describe()}"

    def write_junit(self, path) -> None:
        """JUnit XML: one testcase per case (classname mla.conformance.<dense|sparse>), failures
        with their symptoms and reproduction, unsupported cases skipped with the reason."""
        count = {s: sum(r.status == s for r in self.results) for s in (FAILED, UNSUPPORTED)}
        suite = ET.Element("testsuite", name=f"mla.conformance {self.target}", tests=str(len(self.results)),
                           failures=str(count[FAILED]), skipped=str(count[UNSUPPORTED]), errors="0",
                           time=f"{sum(r.seconds for r in self.results):.3f}")  # fmt: skip
        for result in self.results:
            kind = "sparse" if result.case.sparse else "dense"
            node = ET.SubElement(suite, "testcase", classname=f"mla.conformance.{kind}", name=result.case.id,
                                 time=f"{result.seconds:.3f}")  # fmt: skip
            if result.status == FAILED:
                ET.SubElement(node, "failure", message=result.message).text = self.repro(result.case)
            elif result.status == UNSUPPORTED:
                ET.SubElement(node, "skipped", message=f"not supported: {result.message}")
        tree = ET.ElementTree(ET.Element("testsuites"))
        tree.getroot().append(suite)
        ET.indent(tree)
        tree.write(path, encoding="utf-8", xml_declaration=True)


def _ratio(result: Result | None) -> str:
    if result is None:
        return "-"
    if math.isinf(result.ratio):
        return "inf"
    return f"{result.ratio:.2f} ({result.error:.1e}/{result.allowed:.1e})"


def run(
    target: Target,
    device="cpu",
    *,
    full: bool = False,
    features: Iterable[str] = FEATURES,
    dtypes: Iterable[str] = tuple(DTYPES),
    pattern: str | None = None,
    capabilities: Capabilities | None = None,
    progress: Callable[[Result], None] | None = None,
) -> Report:
    """Run the selected cases (`cases.select`) through `target` on `device`.

    capabilities: what the target supports; None: its function's `conformance_capabilities`
    attribute, else probed. progress: called with each result as it comes."""
    features = tuple(f for f in FEATURES if f in set(features))
    cases = select(full, features, dtypes, pattern)
    support = Support(target, device, capabilities)
    results = []
    for case in cases:
        reason = support.unsupported(case)
        result = Result(case, UNSUPPORTED, reason) if reason else dataclasses.replace(check_case(target, case, device), outcome=None)
        results.append(result)
        if progress is not None:
            progress(result)
    return Report(target.name, str(device), full, support.declared is None, features, results)
