"""Test helpers shared by the suite."""

from __future__ import annotations

import math

import torch


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, with a report.

    inf must match inf of the same sign and NaN is never accepted. On failure the message
    gives the count of bad elements, the worst one and its index, and NaN/inf mismatches.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    problems = []
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if nan_a.any() or nan_e.any():
        problems.append(f"NaN in actual at {nan_a.sum().item()} places, in expected at {nan_e.sum().item()}")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    inf_mismatch = (inf_a | inf_e) & ~(inf_a & inf_e & (torch.sign(a) == torch.sign(e)))
    if inf_mismatch.any():
        idx = tuple(torch.nonzero(inf_mismatch)[0].tolist())
        problems.append(f"inf mismatch at {inf_mismatch.sum().item()} places, first {idx}: {a[idx].item()} vs {e[idx].item()}")
    finite = ~(nan_a | nan_e | inf_a | inf_e)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bound = atol + rtol * e.abs().where(finite, torch.zeros_like(e))
    bad = err > bound
    if bad.any():
        excess = torch.where(bad, err - bound, torch.zeros_like(err))
        idx = tuple(torch.nonzero(excess == excess.max())[0].tolist())
        problems.append(
            f"{bad.sum().item()}/{bad.numel()} elements exceed atol={atol:.3g} rtol={rtol:.3g}; "
            f"max error {err.max().item():.4g}, worst at {idx}: {a[idx].item():.6g} vs {e[idx].item():.6g}"
        )
    assert not problems, f"{name}: " + "; ".join(problems)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest finite absolute difference (0 when nothing is finite on both sides)."""
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(a) & torch.isfinite(e)
    return (a - e).abs()[finite].max().item() if finite.any() else 0.0


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
