"""A conformance suite for any `flash_mla_with_kvcache`: `python -m mla.conformance PACKAGE.MODULE:FUNCTION`.

Runs our adversarial cases (`cases`) through an implementation (a `targets` adapter for its
call form) and through the float64 oracle (`mla.reference` in float64), holds every result to
the contract with a tolerance relative to PyTorch's own low-precision error (`check`), and
reports per feature (`runner`). Our own tests draw their decode cases and tolerance from here.

No pytest needed: the engine is a loop over data; pytest only parametrizes our own tests over
the same `CASES`.
"""

from .cases import CASES, DTYPES, FEATURES, GROUPS, Call, Case, Extra, select, to_fp8_cache
from .check import FACTOR, FLOOR, Comparison, Verdict, check_outputs, compare, max_error, oracle
from .runner import FAILED, PASSED, UNSUPPORTED, Report, Result, check_case, run
from .targets import Capabilities, FlashMLATarget, Outcome, PlainTarget, Support, load_target, nan_filled_empty

__all__ = [
    "CASES", "DTYPES", "FEATURES", "GROUPS", "Call", "Case", "Extra", "select", "to_fp8_cache",
    "FACTOR", "FLOOR", "Comparison", "Verdict", "check_outputs", "compare", "max_error", "oracle",
    "FAILED", "PASSED", "UNSUPPORTED", "Report", "Result", "check_case", "run",
    "Capabilities", "FlashMLATarget", "Outcome", "PlainTarget", "Support", "load_target", "nan_filled_empty",
]  # fmt: skip
