"""Does the additive model hold? Predicted (sum of per-layer sensitivities) against measured
divergence of whole mixed configs, on the same calibration data: Spearman rank correlation and
relative error. The search trusts the sum; this says how far to trust it."""

from __future__ import annotations

import numpy as np

WEAK_CORRELATION = 0.9


def _ranks(values: list[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    array = np.asarray(values, dtype=float)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array))
    ranks[order] = np.arange(1, len(array) + 1)
    for value in np.unique(array):
        tied = array == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or len(a) < 3:
        raise ValueError("spearman needs two equally long lists of 3 or more values")
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def additivity_check(predicted: list[float], measured: list[float], same_units: bool = True) -> dict:
    """Spearman correlation and (when both are in the same units) median relative error of
    predicted against measured."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured) if m > 0] if same_units else []
    if len(predicted) < 3:  # a rank correlation of two points says nothing (a search over one or two formats)
        return {"configs": len(predicted), "spearman": None,
                "median_relative_error": float(np.median(errors)) if errors else None, "weak": None}
    rho = spearman(predicted, measured)
    return {"configs": len(predicted), "spearman": rho, "median_relative_error": float(np.median(errors)) if errors else None,
            "weak": not rho >= WEAK_CORRELATION}
