"""The one confidence-interval convention of every table: the field's.

Mean accuracy (or mean paired difference) over episodes with the 95% CI half-width
``1.96 * std / sqrt(n)``, ``std`` the population standard deviation (numpy's default, ddof = 0),
as the ATHA/TIR authors' and BSCD-FSL's evaluation code compute it. Every summary, accuracy table,
paired comparison and figure calls :func:`mean_ci95`; nothing else computes a CI.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["mean_ci95"]


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the 95% CI half-width 1.96 std / sqrt(n) with the population std (ddof = 0);
    (nan, nan) for no values, half-width 0 for one."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(1.96 * array.std(ddof=0) / np.sqrt(array.size))
