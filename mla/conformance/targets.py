"""The implementations under test ("targets"), the call forms they come in, and what they support.

Call forms (adapters):
- `FlashMLATarget`: FlashMLA's `flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
  head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False, ...)`,
  scheduled through the `get_mla_metadata` beside it in one of FlashMLA's forms:
    "old": `get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)` -> two int32 tensors
           (FlashMLA before its sparse release; dense calls). Where it names the parameters
           `num_heads_q`, `is_fp8_kvcache` and `topk` (FlashMLA's sparse release, vLLM's and
           SGLang's copies of it), they are passed too, and sparse calls without an extra cache
           are planned as vLLM plans them: `cache_seqlens` topk for every row, `topk=topk`;
    "new": `get_mla_metadata()` -> `(FlashMLASchedMeta, None)`, planned on first use (current FlashMLA);
    "none": no get_mla_metadata; the call gets `None, None`.
  A target may take both (ours does): calls the old form plans use it, the others the new.
- `PlainTarget`: a plain `fn(q, k_cache, block_table, cache_seqlens, softmax_scale, causal) -> out`
  (dense calls only, no lse; head_dim_v is whatever the function returns).

What a target supports is declared (`Capabilities`, passed to `run` or set as the function's
`conformance_capabilities` attribute) or probed: before the first case of each configuration
the suite calls the target once on tiny benign data of that configuration (same dtype, FP8,
page sizes, head dims and counts, s_q, topk, features; one row, finite values everywhere, no -1
entries). A probe that raises makes the configuration "not supported", with the error as the
reason; once a configuration is supported, a case of it that raises is a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable

import torch

from .cases import DTYPES, FEATURES, Call, Case


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a target implements; a case outside it is "not supported", never a failure.

    Attributes:
        features: of FEATURES ("dense" and "sparse" are the two call kinds; "fp8" is FlashMLA's
            656-byte "FP8 with scale" row layout, `mla.formats.Fp8Format`).
        dtypes: q dtypes (keys of DTYPES).
        page_sizes, head_dims ((d, dv) pairs), heads ((h_q, h_kv) pairs): None for any.
        rule: optional `rule(case) -> reason or None` for limits on combinations (FlashMLA's
            sparse decode, say, takes only FP8 caches with 64 or 128 query heads).
    """

    features: frozenset[str] = frozenset(FEATURES)
    dtypes: frozenset[str] = frozenset(DTYPES)
    page_sizes: frozenset[int] | None = None
    head_dims: frozenset[tuple[int, int]] | None = None
    heads: frozenset[tuple[int, int]] | None = None
    rule: Callable[[Case], str | None] | None = None

    def unsupported(self, case: Case) -> str | None:
        """Why `case` is outside these capabilities, or None."""
        if missing := case.features - self.features:
            return f"does not declare {', '.join(sorted(missing))}"
        checks = [
            (case.dtype, self.dtypes, "q dtype"), (case.page, self.page_sizes, "page size"),
            (case.extra and case.extra.page, self.page_sizes if case.extra else None, "extra page size"),
            ((case.d, case.dv), self.head_dims, "head dims (d, dv)"), ((case.h_q, case.h_kv), self.heads, "heads (h_q, h_kv)"),
        ]  # fmt: skip
        for value, allowed, what in checks:
            if allowed is not None and value not in allowed:
                return f"does not declare {what} {value}"
        return self.rule(case) if self.rule is not None else None


@dataclasses.dataclass
class Outcome:
    """What a target returned: out, lse (None for a plain callable) and the schedule it was given."""

    out: torch.Tensor
    lse: torch.Tensor | None
    schedule: tuple | None


@contextlib.contextmanager
def nan_filled_empty():
    """torch.empty / torch.empty_like return NaN-filled floats inside the block, so an output
    element an implementation allocates in Python and never writes shows as NaN instead of
    passing by luck (allocations inside C++ extensions are not reached)."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def _parameters(fn) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return []


def _takes_keyword(fn, name: str) -> bool:
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in _parameters(fn))


OLD_FORM_EXTRAS = ("num_heads_q", "is_fp8_kvcache", "topk")
"""The sparse release's additions to the old get_mla_metadata form, passed where named."""


class FlashMLATarget:
    """A `flash_mla_with_kvcache` in FlashMLA's form, with its `get_mla_metadata` (or None).

    forms: metadata forms it takes, of ("old", "new", "none") (module docstring); None: found
    on first use by calling get_mla_metadata both ways on a one-row input.
    """

    def __init__(self, fn, get_mla_metadata=None, forms: tuple[str, ...] | None = None, name: str | None = None):
        if forms is not None and (not forms or set(forms) - {"old", "new", "none"}):
            raise ValueError(f"forms must be a non-empty tuple of 'old', 'new', 'none', got {forms!r}")
        if forms is not None and "none" not in forms and get_mla_metadata is None:
            raise ValueError(f"forms {forms} need a get_mla_metadata")
        self.fn, self.get_mla_metadata, self.forms = fn, get_mla_metadata, forms
        self.name = name or f"{fn.__module__}:{fn.__qualname__}"
        self.takes_num_sm = get_mla_metadata is not None and _takes_keyword(get_mla_metadata, "num_sm")
        # named parameters only: a get_mla_metadata(*args, **kwargs) need not know these
        named = {p.name for p in _parameters(get_mla_metadata)} if get_mla_metadata is not None else set()
        self.old_extras = tuple(name for name in OLD_FORM_EXTRAS if name in named)

    def prepare(self, device) -> None:
        """Find the metadata forms, if not given."""
        if self.forms is None:
            self.forms = self._detect_forms(device)

    def _detect_forms(self, device) -> tuple[str, ...]:
        if self.get_mla_metadata is None:
            return ("none",)
        forms = []
        with contextlib.suppress(Exception):
            old = self.get_mla_metadata(torch.ones(1, dtype=torch.int32, device=device), 1, 1)
            if isinstance(old, tuple) and len(old) == 2 and all(isinstance(t, torch.Tensor) for t in old):
                forms.append("old")
        with contextlib.suppress(Exception):
            new = self.get_mla_metadata()
            if isinstance(new, tuple) and len(new) == 2 and new[1] is None and not isinstance(new[0], torch.Tensor):
                forms.append("new")
        return tuple(forms) or ("none",)

    def _old_form_plans(self, sparse: bool, extra: bool) -> bool:
        return not extra and (not sparse or "topk" in self.old_extras)

    def unsupported(self, case: Case) -> str | None:
        if self.forms == ("old",) and not self._old_form_plans(case.sparse, case.extra is not None):
            what = "an extra cache" if case.extra is not None else "sparse calls (it takes no topk)"
            return f"get_mla_metadata has only the old form, which does not plan {what}"
        return None

    def probe_reason(self, case: Case, outcome: Outcome) -> str | None:
        return None

    def _schedule(self, call: Call, num_sm: int | None) -> tuple:
        kw = call.kwargs
        hint = {"num_sm": num_sm} if num_sm and self.takes_num_sm else {}
        if "old" in self.forms and self._old_form_plans("indices" in kw, "extra_k_cache" in kw):
            b, s_q, h_q, _ = call.q.shape
            h_kv = call.k_cache.shape[2]
            topk = kw["indices"].shape[-1] if "indices" in kw else None
            lengths = call.cache_seqlens if topk is None else torch.full((b,), topk, dtype=torch.int32, device=call.q.device)
            given = {"num_heads_q": h_q, "is_fp8_kvcache": kw.get("is_fp8_kvcache", False), "topk": topk}
            extras = {name: given[name] for name in self.old_extras}
            return self.get_mla_metadata(lengths, s_q * h_q // h_kv, h_kv, **extras, **hint)
        if "new" in self.forms:
            return self.get_mla_metadata(**hint)
        return None, None

    def __call__(self, call: Call, num_sm: int | None = None) -> Outcome:
        schedule = self._schedule(call, num_sm)
        result = self.fn(*call.args, *schedule, **call.kwargs)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(f"returned {type(result).__name__}, expected the tuple (out, lse)")
        return Outcome(result[0], result[1], schedule)


class PlainTarget:
    """A plain `fn(q, k_cache, block_table, cache_seqlens, softmax_scale, causal) -> out`: dense
    calls only (plain cache, no sink, extra cache or ragged rows), out only."""

    forms = ()

    def __init__(self, fn, name: str | None = None):
        self.fn = fn
        self.name = name or f"{fn.__module__}:{fn.__qualname__}"

    def prepare(self, device) -> None:
        pass

    def unsupported(self, case: Case) -> str | None:
        if extra := case.features - {"dense", "causal"}:
            return f"a plain callable takes dense calls only (this case uses {', '.join(sorted(extra))})"
        return None

    def probe_reason(self, case: Case, outcome: Outcome) -> str | None:
        """head_dim_v is not an argument here: a case whose dv the function does not return is unsupported."""
        width = outcome.out.shape[-1] if isinstance(outcome.out, torch.Tensor) and outcome.out.dim() else None
        return None if width == case.dv else f"returns {width} value channels, this case has head_dim_v = {case.dv}"

    def __call__(self, call: Call, num_sm: int | None = None) -> Outcome:
        q, k_cache, block_table, cache_seqlens, _ = call.args
        return Outcome(self.fn(q, k_cache, block_table, cache_seqlens, call.softmax_scale, call.kwargs["causal"]), None, None)


Target = FlashMLATarget | PlainTarget
PLAIN_PARAMETERS = ("q", "k_cache", "block_table", "cache_seqlens", "softmax_scale", "causal")


def load_target(spec: str, metadata: str = "auto") -> Target:
    """Import "PACKAGE.MODULE:FUNCTION" and wrap it in its call form: plain when its parameters
    are PLAIN_PARAMETERS, FlashMLA's otherwise, with the module's get_mla_metadata (forms: found
    on first use for "auto", else just `metadata`)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"target must be PACKAGE.MODULE:FUNCTION, got {spec!r}")
    module = importlib.import_module(module_name)
    fn = functools.reduce(getattr, attr.split("."), module)
    if not callable(fn):
        raise TypeError(f"{spec} is a {type(fn).__name__}, not a function")
    try:
        names = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = ()
    if names == PLAIN_PARAMETERS:
        return PlainTarget(fn, name=spec)
    forms = None if metadata == "auto" else (metadata,)
    return FlashMLATarget(fn, getattr(module, "get_mla_metadata", None), forms=forms, name=spec)


OWN_IMPLEMENTATIONS = ("mla.kernels.decode.flash_mla_with_kvcache", "mla.reference.decode.flash_mla_with_kvcache")
"""This library's implementations claim the whole interface: on a case of theirs a raise is a
failure (a regression), never "not supported"."""


def declared_capabilities(fn) -> Capabilities | None:
    """fn's `conformance_capabilities` attribute; everything for OWN_IMPLEMENTATIONS; else None."""
    declared = getattr(fn, "conformance_capabilities", None)
    if declared is None and f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}" in OWN_IMPLEMENTATIONS:
        return Capabilities()
    return declared


class Support:
    """Decides, per case, "supported" or the reason not: the call form's limits, then the
    declared capabilities or, without a declaration, one probe per configuration (cached)."""

    def __init__(self, target: Target, device, capabilities: Capabilities | None = None):
        self.target, self.device = target, device
        self.declared = capabilities or declared_capabilities(target.fn)
        self._probes: dict[Case, str | None] = {}
        target.prepare(device)

    def unsupported(self, case: Case) -> str | None:
        if reason := self.target.unsupported(case):
            return reason
        if self.declared is not None:
            return self.declared.unsupported(case)
        probe = case.probe()
        if probe not in self._probes:
            self._probes[probe] = self._probe(probe)
        return self._probes[probe]

    def _probe(self, probe: Case) -> str | None:
        try:
            outcome = self.target(probe.build(self.device))
        except Exception as e:  # noqa: BLE001 - any error of a tiny benign call means "not supported"
            return f"raised on a tiny call of this configuration: {type(e).__name__}: {first_line(e)}"
        return self.target.probe_reason(probe, outcome)


def first_line(e: BaseException) -> str:
    """An exception's message, its first line only: a report line per case."""
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
