"""Test helpers shared by the suite."""

from __future__ import annotations

import math

import pytest
import torch

from mla.conformance import Case, compare, max_error

__all__ = ["assert_close", "case_params", "max_error", "randomize_"]


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, with a report
    (`mla.conformance.compare`: inf must match inf of the same sign, NaN is never accepted; the
    message gives the count of bad elements, the worst one and its index, NaN/inf mismatches)."""
    comparison = compare(name, actual, expected, atol, rtol)
    assert comparison.ok, comparison.message


def case_params(*cases: Case) -> list:
    """pytest params of conformance cases, by their ids; slow ones marked slow."""
    return [pytest.param(case, id=case.id, marks=[pytest.mark.slow] * case.slow) for case in cases]


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter in place: unit-scale projections (so attention is far from
    uniform and scores are sensitive to every input), norm weights away from 1, unit-variance
    embeddings. Default inits (0.02 scale) would hide a wrong score behind near-uniform softmax."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(2 * noise / math.sqrt(p.shape[-1]))
    return module
