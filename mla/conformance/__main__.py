"""`python -m mla.conformance PACKAGE.MODULE:FUNCTION [options]`: the conformance suite as a command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from .cases import DTYPES, FEATURES
from .runner import FAILED, PASSED, run
from .targets import load_target

MARKS = {PASSED: ".", FAILED: "F"}


def _names(allowed) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names from `allowed`."""

    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        if unknown := [name for name in names if name not in allowed]:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return names

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mla.conformance",
        description="Run the mla-latent conformance cases through a flash_mla_with_kvcache and a float64 oracle; "
        "print per feature how many cases passed, failed or are not supported. Exit status 0 only when no "
        "supported case failed (and at least one ran).",
    )  # fmt: skip
    parser.add_argument("target", help="PACKAGE.MODULE:FUNCTION, e.g. flash_mla:flash_mla_with_kvcache; its module's "
                        "get_mla_metadata schedules the calls")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available). On cpu TRITON_INTERPRET=1 is set before "
                        "the target is imported, so Triton kernels run under the interpreter")  # fmt: skip
    parser.add_argument("--dtypes", type=_names(tuple(DTYPES)), default=list(DTYPES),
                        help=f"q dtypes, comma-separated (default: all of {', '.join(DTYPES)})")  # fmt: skip
    parser.add_argument("--features", type=_names(FEATURES), default=list(FEATURES),
                        help="run the cases whose every feature is listed (default: all of "
                        f"{', '.join(FEATURES)}); every case is dense or sparse")  # fmt: skip
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="full", action="store_false", help="the quick cases (default)")
    size.add_argument("--full", dest="full", action="store_true", help="also the cartesian sweeps")
    parser.set_defaults(full=False)
    parser.add_argument("--case", metavar="PATTERN", help="only the cases whose id matches this fnmatch pattern")
    parser.add_argument("--metadata", choices=("auto", "old", "new", "none"), default="auto",
                        help="get_mla_metadata form: old (tensors from cache_seqlens), new (FlashMLASchedMeta), "
                        "none (pass None); auto finds out (default)")  # fmt: skip
    parser.add_argument("--junit", metavar="PATH", help="also write a JUnit XML report there")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # before the target's module is imported: Triton reads it when a kernel is defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        args.target = load_target(args.target, args.metadata)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        parser.error(f"cannot load the target {args.target}: {type(e).__name__}: {e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    target = args.target

    def progress(result):
        print(MARKS.get(result.status, "s"), end="", flush=True)

    report = run(target, args.device, full=args.full, features=args.features, dtypes=args.dtypes, pattern=args.case,
                 progress=progress)  # fmt: skip
    if not report.results:
        print(f"no case matches --features {','.join(args.features)} --dtypes {','.join(args.dtypes)} --case {args.case}",
              file=sys.stderr)  # fmt: skip
        return 2
    how = "probed" if report.probed else "declared"
    print(f"\n{target.name} on {args.device}, {'full' if args.full else 'quick'}, capabilities {how}, "
          f"metadata form {'/'.join(target.forms) or '-'}\n")  # fmt: skip
    print(report.table())
    if args.junit:
        report.write_junit(args.junit)
    return report.exit_status


if __name__ == "__main__":
    sys.exit(main())
