"""Statistics shared by every chapter: intervals over the unit that varies (facts, prompts,
documents), never over tokens.

* :func:`bootstrap_ci`: mean and percentile-bootstrap interval of samples along an axis;
* :func:`wilson_interval`: interval of a rate ``k / n`` (refusals, correct answers);
* :func:`share`: the share of units for which something holds, with its Wilson interval: the one
  meaning of a "rate" in the book (chapters 5, 6 and 7);
* :func:`ratio_bootstrap`: a ratio of sums (wedding words per word) with an interval from
  resampling the units (prompts), not the words inside them (chapter 4);
* :func:`paired_difference`: how much more often one condition holds than another on the same
  units, with the exact sign-test interval (chapter 7);
* :func:`group_sums` and :func:`cluster_ratio_bootstrap`: a ratio of sums over segments (bits per
  byte of a test set, or its change) with an interval from resampling whole documents, the unit
  that varies, not the tokens or segments inside them (chapter 3).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from lmbook.core.params import ParameterError

__all__ = ["bootstrap_ci", "wilson_interval", "Share", "share", "ratio_bootstrap", "paired_difference",
           "group_sums", "cluster_ratio_bootstrap"]


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


def _exact_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of ``k`` successes in ``n`` (``n >= 1``), by bisection on the
    binomial tails (the exact sign test's interval: no approximation at small ``n``)."""
    a = (1 - level) / 2

    def tail(p: float, lo: int, hi: int) -> float:  # P(lo <= X <= hi), X ~ Binomial(n, p)
        return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(lo, hi + 1))

    def solve(f) -> float:  # f increases in p from below 0 to above 0
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return (lo + hi) / 2

    low = 0.0 if k == 0 else solve(lambda p: tail(p, k, n) - a)
    high = 1.0 if k == n else solve(lambda p: a - tail(p, 0, k))
    return min(low, k / n), max(high, k / n)


def paired_difference(kept, control, level: float = 0.95) -> tuple[float, float, float]:
    """How much more often a condition keeps the answer than a control on the *same* prompts:
    ``(mean of kept - control, low, high)`` for ``kept``/``control`` ``[n]`` bool (chapter 7: an
    edit against a control on the same prompts).

    Only the prompts where the two disagree carry information: with ``w`` where only ``kept``
    holds and ``l`` where only ``control`` does (``m = w + l``), the difference is
    ``(w - l) / n = (m / n) * (2 w / m - 1)``, and its interval maps the exact (Clopper-Pearson)
    interval of ``w / m`` the same way: it excludes 0 exactly when the two-sided sign test
    rejects "either is as likely to win" at ``1 - level``. No disagreement gives ``(0, 0, 0)``;
    no prompt gives NaNs. (A percentile bootstrap would give ``[1, 1]`` for two prompts that both
    favour ``kept``.)"""
    a = np.asarray(kept, dtype=bool).ravel()
    b = np.asarray(control, dtype=bool).ravel()
    if a.shape != b.shape:
        raise ParameterError(f"kept and control must flag the same prompts, got {a.size} and {b.size}")
    n = a.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    w, l = int((a & ~b).sum()), int((~a & b).sum())
    m = w + l
    value = (w - l) / n
    if m == 0:
        return 0.0, 0.0, 0.0
    lo, hi = _exact_interval(w, m, level)
    return value, min(value, m / n * (2 * lo - 1)), max(value, m / n * (2 * hi - 1))


def group_sums(values, groups) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``values`` (``[..., n]``, one entry per segment) over the segments of each group
    (``groups``: ``[n]`` labels, e.g. the document of each segment). Returns ``(labels [k], sums
    [..., k])`` with the labels sorted."""
    v = np.asarray(values, dtype=float)
    g = np.asarray(groups)
    if g.ndim != 1 or v.shape[-1] != g.shape[0]:
        raise ValueError(f"group_sums needs one group label per segment, got values {v.shape} and groups {g.shape}")
    labels, inv = np.unique(g, return_inverse=True)
    onehot = np.zeros((g.shape[0], len(labels)))
    onehot[np.arange(g.shape[0]), inv] = 1.0
    return labels, v @ onehot


def cluster_ratio_bootstrap(num, den, groups=None, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """``sum(num) / sum(den)`` over segments (``num``: ``[..., n]``, e.g. the change in bits of each
    test segment, or of each token class in it; ``den``: ``[n]`` or ``[..., n]``, e.g. its bytes) with
    a percentile interval from resampling whole ``groups`` (the document of each segment; ``None``:
    each segment on its own). Segments of one document, like tokens of one segment, are not
    independent, so the document is the unit resampled. Returns ``(ratio, low, high)`` as
    :func:`ratio_bootstrap` does; the interval is widened to contain the ratio."""
    num = np.asarray(num, dtype=float)
    den = np.broadcast_to(np.asarray(den, dtype=float), num.shape)
    if groups is not None:
        _, num = group_sums(num, groups)
        _, den = group_sums(den, groups)
    ratio, lo, hi = ratio_bootstrap(num, den, n_boot=n_boot, seed=seed, level=level)
    return ratio, np.minimum(lo, ratio), np.maximum(hi, ratio)
