"""Statistics shared by every chapter: intervals over the unit that varies (facts, prompts,
documents), never over tokens.

* :func:`bootstrap_ci`: mean and percentile-bootstrap interval of samples along an axis;
* :func:`wilson_interval`: interval of a rate ``k / n`` (refusals, correct answers);
* :func:`share`: the share of units for which something holds, with its Wilson interval: the one
  meaning of a "rate" in the book (chapters 5, 6 and 7);
* :func:`ratio_bootstrap`: a ratio of sums (wedding words per word) with an interval from
  resampling the units (prompts), not the words inside them (chapter 4).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["bootstrap_ci", "wilson_interval", "Share", "share", "ratio_bootstrap"]


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


class Share(NamedTuple):
    """The share of units for which something holds, with its Wilson interval (:func:`share`)."""

    rate: float
    low: float
    high: float
    k: int
    n: int


def share(flags, level: float = 0.95) -> Share:
    """The share of units for which ``flags`` (booleans, one per unit) holds, as
    ``Share(rate, low, high, k, n)`` with the Wilson interval; NaN rate and bounds for no units.
    A tuple, so ``np.array([share(a), share(b)])[:, :3]`` stacks rates and bounds."""
    x = np.asarray(flags, dtype=bool).ravel()
    k, n = int(x.sum()), int(x.size)
    lo, hi = wilson_interval(k, n, level)
    return Share(k / n if n else float("nan"), lo, hi, k, n)


def ratio_bootstrap(num, den, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """``sum(num) / sum(den)`` along the last axis (the units, e.g. prompts), with a percentile
    interval from resampling the units. ``num``/``den``: ``[..., n]``. Returns ``(ratio, low, high)``
    arrays of shape ``[...]``; a zero denominator counts as 1 (a ratio of 0)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if num.shape != den.shape or num.shape[-1] == 0:
        raise ValueError(f"ratio_bootstrap needs num and den of one shape with at least one unit, got "
                         f"{num.shape} and {den.shape}")
    n = num.shape[-1]
    ratio = num.sum(-1) / np.maximum(den.sum(-1), 1)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = num[..., idx].sum(-1) / np.maximum(den[..., idx].sum(-1), 1)  # [..., n_boot]
    a = (1 - level) / 2
    return ratio, np.quantile(boot, a, axis=-1), np.quantile(boot, 1 - a, axis=-1)
