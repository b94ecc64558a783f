"""Whether one call's (out, lse) keeps the contract, and if not, what the symptom is.

The oracle is `mla.reference.flash_mla_with_kvcache` run in float64 (it also dequantizes FP8
rows exactly). The tolerance is relative to PyTorch's own error (flash-attention's rule): the
same reference run in q's dtype shows how far an honest low-precision computation lands from
the oracle, and an implementation may land at most FACTOR times as far, plus FLOOR:

    out: |out - oracle| <= FACTOR * max|out_low - oracle| + FLOOR + eps(q dtype) * |oracle|
    lse: |lse - oracle| <= FACTOR * max|lse_low - oracle| + FLOOR

(out is rounded to q's dtype like the oracle's, so the two may sit one rounding step apart on
top of the arithmetic error: that is the eps term.) Exact, not within tolerance: no NaN where
the oracle is finite, and a query that sees no key gives out = 0 and lse = +inf.

A failure names its symptom: NaN traced to what the query could have read that the contract
says is never read (page slots past cache_seqlens, -1 entries, entries past topk_length,
padding queries), lse finite for a query that sees nothing (or +inf for one that sees keys),
and errors that fit a wrong softmax scale.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from mla import reference

from .cases import Call

FACTOR = 2.0
"""An implementation may be this many times as far from the oracle as PyTorch in q's dtype."""

FLOOR = 1e-5
"""Absolute slack on top, for outputs PyTorch happens to compute almost exactly."""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """`compare`'s findings. Each text is empty when that check passed.

    Attributes:
        name: what was compared.
        nan: NaN in actual or expected, with counts.
        inf: inf that does not match an inf of the same sign, with the first place.
        exceed: elements over the tolerance, with the worst one.
        ratio: the largest error / allowed error over elements finite on both sides (0 if none);
            inf when a NaN or inf check failed, so that a worst-error column never shows such a
            result as close.
        error, allowed: the error and the allowed error at that element.
    """

    name: str
    nan: str
    inf: str
    exceed: str
    ratio: float
    error: float
    allowed: float

    @property
    def ok(self) -> bool:
        return not (self.nan or self.inf or self.exceed)

    @property
    def message(self) -> str:
        return f"{self.name}: " + "; ".join(p for p in (self.nan, self.inf, self.exceed) if p)


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> Comparison:
    """|actual - expected| <= atol + rtol * |expected| elementwise; inf must match inf of the
    same sign and NaN is never accepted. Both tensors of one shape, any float dtypes."""
    if actual.shape != expected.shape:
        return Comparison(name, "", "", f"shape {tuple(actual.shape)} != {tuple(expected.shape)}", math.inf, math.inf, 0.0)
    a, e = actual.double(), expected.double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    nan = f"NaN in actual at {nan_a.sum().item()} places, in expected at {nan_e.sum().item()}" if (nan_a | nan_e).any() else ""
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    inf_mismatch = (inf_a | inf_e) & ~(inf_a & inf_e & (torch.sign(a) == torch.sign(e)))
    inf = ""
    if inf_mismatch.any():
        idx = _first(inf_mismatch)
        inf = f"inf mismatch at {inf_mismatch.sum().item()} places, first {idx}: {a[idx].item()} vs {e[idx].item()}"
    finite = ~(nan_a | nan_e | inf_a | inf_e)
    err = torch.where(finite, (a - e).abs(), 0.0)
    bound = atol + rtol * torch.where(finite, e.abs(), 0.0)
    ratio = torch.where(err == 0, 0.0, err / bound)  # atol = rtol = 0 asks for exact equality: 0 / 0 is no error
    exceed, worst, error, allowed = "", 0.0, 0.0, atol
    if finite.any():
        idx = _first(ratio == ratio.max())
        worst, error, allowed = ratio[idx].item(), err[idx].item(), bound[idx].item()
        bad = err > bound
        if bad.any():
            exceed = (
                f"{bad.sum().item()}/{bad.numel()} elements exceed atol={atol:.3g} rtol={rtol:.3g}; "
                f"max error {err.max().item():.4g}, worst at {idx}: {a[idx].item():.6g} vs {e[idx].item():.6g}"
            )
    if nan or inf:
        worst = math.inf
    return Comparison(name, nan, inf, exceed, worst, error, allowed)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest finite absolute difference (0 when nothing is finite on both sides)."""
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(a) & torch.isfinite(e)
    return (a - e).abs()[finite].max().item() if finite.any() else 0.0


def oracle(call: Call, compute_dtype: torch.dtype = torch.float64, **override) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (out, lse) for `call` (keywords replaced by `override`), computed in compute_dtype."""
    return reference.flash_mla_with_kvcache(*call.args, **(call.kwargs | override), compute_dtype=compute_dtype)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Attributes: passed; message (the symptoms, "" when passed); ratio, error, allowed: the
    worst error / allowed error over out and lse, and the two at that element."""

    passed: bool
    message: str
    ratio: float
    error: float
    allowed: float


def check_outputs(call: Call, out, lse=None) -> Verdict:
    """Hold (out, lse) of `call` to the contract: shapes and dtypes, the exact rules, the
    tolerance. lse None: the implementation returns no lse (only out is held)."""
    q = call.q
    b, s_q, h_q, _ = q.shape
    want = {"out": ((b, s_q, h_q, call.head_dim_v), q.dtype), "lse": ((b, h_q, s_q), torch.float32)}
    for name, value in (("out", out), ("lse", lse)):
        if name == "lse" and lse is None:
            continue
        shape, dtype = want[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
            got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            return Verdict(False, f"{name} is {got}, expected {dtype} {list(shape)}", math.inf, math.inf, 0.0)
    out_ref, lse_ref = oracle(call)
    out_low, lse_low = oracle(call, q.dtype)
    out, lse = out.to(out_ref.device), None if lse is None else lse.to(out_ref.device)
    problems = [_nan_symptom(call, out, lse, out_ref)]
    blind = torch.isposinf(lse_ref)  # [b, h_q, s_q]: queries that see no key
    if lse is not None:
        problems.append(_empty_row_symptom(lse, lse_ref, blind))
    leaked = blind.transpose(1, 2)[..., None] & (out != 0) & ~out.isnan()
    if leaked.any():
        i, t, h, c = _first(leaked)
        problems.append(f"out[{i}, {t}, {h}, {c}] = {out[i, t, h, c].item():.4g} but query ({i}, {t}) sees no key: "
                        "out must be exactly 0 there")  # fmt: skip
    comparisons = [compare("out", out, out_ref, FACTOR * max_error(out_low, out_ref) + FLOOR, torch.finfo(q.dtype).eps)]
    if lse is not None:
        comparisons.append(compare("lse", lse, lse_ref, FACTOR * max_error(lse_low, lse_ref) + FLOOR))
    # NaN and lse's +inf have their own symptoms above; any other inf mismatch is reported as is
    problems += [f"{c.name}: {c.inf}" for c in comparisons if c.inf and not (c.name == "lse" and problems[1])]
    exceeded = [c for c in comparisons if c.exceed]
    problems += [f"{c.name}: {c.exceed}" for c in exceeded]
    if exceeded:
        got, ref_value = (lse, lse_ref) if lse is not None else (out, out_ref)
        problems.append(_scale_symptom(call, got, ref_value, lse is not None))
    worst = max(comparisons, key=lambda c: c.ratio)
    message = "; ".join(p for p in problems if p)
    return Verdict(not message, message, worst.ratio, worst.error, worst.allowed)


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.nonzero(mask)[0].tolist())


def _nan_symptom(call: Call, out, lse, out_ref) -> str:
    """NaN in out (or lse) where the oracle is finite: what the query could have read that the
    contract says is never read."""
    bad = out.isnan() & ~out_ref.isnan()
    name, count = "out", int(bad.sum())
    if count:
        i, t, h, c = _first(bad)
        where = f"out[{i}, {t}, {h}, {c}]"
    elif lse is not None and lse.isnan().any():
        i, h, t = _first(lse.isnan())
        name, count, where = "lse", int(lse.isnan().sum()), f"lse[{i}, {h}, {t}]"
    else:
        return ""
    sources = _never_read(call, i, t)
    read = f"read what the contract never reads: {' or '.join(sources)}" if sources else "read NaN from outside its keys"
    return (f"{name} is NaN at {count} places where the oracle is finite, first {where}: query ({i}, {t}) {read} "
            "(all NaN-poisoned), or an output element was never written (torch.empty is NaN-filled during the call)")  # fmt: skip


def _never_read(call: Call, i: int, t: int) -> list[str]:
    """What query token t of row i may not read, among what this call holds as NaN."""
    kw = call.kwargs
    if "seqlens_q" in kw and t >= (n := int(kw["seqlens_q"][i])):
        return [f"its own q, a padding token (token {t} >= seqlens_q[{i}] = {n})"]
    sources = []
    if "indices" in kw:
        sources += _list_sources("indices", kw["indices"], "topk_length", kw.get("topk_length"), i, t)
    else:
        length, page = int(call.cache_seqlens[i]), call.k_cache.shape[1]
        pages = -(-length // page)
        if length % page:
            tokens = f"{length % page} token" + "s" * (length % page > 1)
            sources.append(f"the page slots past cache_seqlens[{i}] = {length} (its last page holds {tokens})")
        if call.block_table.shape[1] > pages:
            sources.append(f"block_table[{i}, {pages}:], past the sequence's {pages} pages")
    if "extra_k_cache" in kw:
        sources += _list_sources("extra_indices_in_kvcache", kw["extra_indices_in_kvcache"], "extra_topk_length",
                                 kw.get("extra_topk_length"), i, t)  # fmt: skip
    return sources


def _list_sources(name: str, indices, length_name: str, lengths, i: int, t: int) -> list[str]:
    topk = indices.shape[-1]
    used = topk if lengths is None else int(lengths[i])
    sources = []
    holes = int((indices[i, t, :used] == -1).sum())
    if holes:
        sources.append(f"the {holes} -1 entries of {name}[{i}, {t}] (a -1 skips an entry)")
    if used < topk:
        sources.append(f"{name}[{i}, {t}, {used}:], past {length_name}[{i}] = {used}")
    return sources


def _empty_row_symptom(lse, lse_ref, blind) -> str:
    """lse finite for a query that sees no key, or +inf for one that sees keys."""
    texts = []
    for mask, what in ((blind & ~torch.isposinf(lse) & ~lse.isnan(), "sees no key (oracle +inf): a query that sees "
                        "nothing must give lse = +inf and out = 0"),
                       (~blind & torch.isposinf(lse), "sees keys: lse = +inf marks a query that sees nothing")):  # fmt: skip
        if mask.any():
            i, h, t = _first(mask)
            texts.append(f"lse[{i}, {h}, {t}] = {lse[i, h, t].item():.6g} at {int(mask.sum())} places although query "
                         f"({i}, {t}) {what}")  # fmt: skip
    return "; ".join(texts)


def _scale_symptom(call: Call, got, ref_value, is_lse: bool) -> str:
    """Whether the error fits the oracle with a softmax scale off by a factor (1 + delta): a
    least-squares fit of got - oracle on d(oracle)/d(log scale); a good fit names delta."""
    step = 1e-3
    shifted = oracle(call, softmax_scale=call.softmax_scale * (1 + step))[1 if is_lse else 0]
    slope = (shifted - ref_value) / step
    delta = got.double() - ref_value
    usable = torch.isfinite(delta) & torch.isfinite(slope)
    delta, slope = delta[usable], slope[usable]
    if not usable.any() or slope.norm() == 0 or delta.norm() == 0:
        return ""
    fit = ((delta * slope).sum() / (slope * slope).sum()).item()
    residual = ((delta - fit * slope).norm() / delta.norm()).item()
    if residual > 0.25 or abs(fit) < 1e-4:
        return ""
    return (f"the errors fit scores scaled by {1 + fit:.4f} (residual {residual:.0%}): softmax_scale is off by "
            f"{fit:+.2%} (default d ** -0.5 with d = q.shape[-1], {call.q.shape[-1]} here)")  # fmt: skip
