"""Statistics shared by every chapter: intervals over the unit that varies (facts, prompts,
documents), never over tokens.

* :func:`bootstrap_ci`: mean and percentile-bootstrap interval of samples along an axis;
* :func:`wilson_interval`: interval of a rate ``k / n`` (refusals, correct answers).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["bootstrap_ci", "wilson_interval"]


def bootstrap_ci(samples, n_boot: int = 1000, seed: int = 0, axis: int = 0, level: float = 0.95):
    """Mean and percentile-bootstrap interval of ``samples`` along ``axis``.

    Returns ``(mean, low, high)`` arrays with ``axis`` removed.
    """
    x = np.asarray(samples, dtype=float)
    x = np.moveaxis(x, axis, 0)
    n = x.shape[0]
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one sample")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = x[idx].mean(axis=1)
    a = (1 - level) / 2
    return x.mean(0), np.quantile(means, a, axis=0), np.quantile(means, 1 - a, axis=0)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (``(nan, nan)`` for ``n = 0``); it
    always contains ``k / n``."""
    if n == 0:
        return float("nan"), float("nan")
    from statistics import NormalDist

    if not (isinstance(k, int) and isinstance(n, int)) or n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs whole numbers 0 <= k <= n, got k={k!r}, n={n!r}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At k = 0 or k = n the bound equals the estimate in exact arithmetic; float error can put it a
    # hair outside, so the interval is clipped to contain the estimate exactly.
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))
