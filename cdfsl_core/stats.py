"""Statistics shared by the measurements: the one confidence-interval convention of every table
(the field's), and the Gaussian kernel with the median bandwidth that MMD uses.

Mean accuracy (or mean paired difference) over episodes with the 95% CI half-width
``1.96 * std / sqrt(n)``, ``std`` the population standard deviation (numpy's default, ddof = 0),
as the ATHA/TIR authors' and BSCD-FSL's evaluation code compute it. Every summary, accuracy table,
paired comparison and figure calls :func:`mean_ci95`; nothing else computes a CI.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["format_mean_ci", "json_number", "mean_ci95", "median_gaussian_kernel"]


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the 95% CI half-width 1.96 std / sqrt(n) with the population std (ddof = 0);
    (nan, nan) for no values, and (mean, nan) for one: a single observation says nothing about
    its spread, so its interval is undefined, not 0."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return float("nan"), float("nan")
    if array.size == 1:
        return float(array[0]), float("nan")
    return float(array.mean()), float(1.96 * array.std(ddof=0) / np.sqrt(array.size))


def json_number(value: float | None) -> float | None:
    """``value`` for a JSON file: NaN (an undefined mean or interval) becomes ``None`` (null)."""
    return None if value is None or value != value else float(value)


def format_mean_ci(mean: float | None, ci: float | None, scale: float = 100.0, digits: int = 1,
                   signed: bool = False) -> str:
    """``"72.0 +- 3.7"`` (``scale`` x the values); ``"72.0 (no CI: 1 value)"`` when the interval
    is undefined, ``"n/a"`` when the mean is."""
    if mean is None or mean != mean:
        return "n/a"
    text = f"{scale * mean:{'+' if signed else ''}.{digits}f}"
    if ci is None or ci != ci:
        return f"{text} (no CI: 1 value)"
    return f"{text} +- {scale * ci:.{digits}f}"


def median_gaussian_kernel(pooled):
    """Gaussian kernel matrix ``exp(-d^2 / (2 sigma^2))`` of the rows of ``pooled`` [N, d] (a torch
    tensor), with sigma the median pairwise distance of distinct rows (the median heuristic);
    returns (kernel [N, N], sigma). Computed in float64."""
    import torch

    pooled = pooled.double()
    squared = torch.cdist(pooled, pooled).pow(2)
    off_diagonal = ~torch.eye(len(pooled), dtype=torch.bool, device=pooled.device)
    sigma = squared[off_diagonal].sqrt().median().clamp_min(1e-12) if len(pooled) > 1 else pooled.new_tensor(1.0)
    return torch.exp(-squared / (2 * sigma**2)), float(sigma)
