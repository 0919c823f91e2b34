"""The book's one plotting style. Introduced in chapter 1.

``use_style()`` sets matplotlib's defaults once per chapter; ``model_color(name)`` gives each
model the same colour in every figure; ``bootstrap_ci`` gives the 95% intervals the figures draw.
"""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from lmbook.core.stats import bootstrap_ci

__all__ = ["use_style", "model_color", "integer_ticks", "plot_band", "plt"]

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
_FIXED = {"gemma-3-270m": _PALETTE[0], "smollm2-135m-instruct": _PALETTE[1]}


def use_style() -> None:
    """Small, legible figures that stay well under a megabyte per notebook."""
    matplotlib.rcParams.update(
        {
            "figure.figsize": (7.0, 3.6),
            "figure.dpi": 90,
            "savefig.dpi": 90,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "font.size": 10,
        }
    )


def integer_ticks(ax, axis: str = "x") -> None:
    """Whole-number ticks on a layer (or step) axis."""
    from matplotlib.ticker import MaxNLocator

    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))


def model_color(name: str) -> str:
    """A stable colour per model name (the packaged models have fixed ones)."""
    if name in _FIXED:
        return _FIXED[name]
    return _PALETTE[2 + sum(map(ord, name)) % (len(_PALETTE) - 2)]


def plot_band(ax, x, samples, label: str, color=None, n_boot: int = 1000, seed: int = 0, **kwargs):
    """Plot the mean of ``samples`` (``[n, len(x)]``, NaN ignored per column) against ``x`` with a
    shaded 95% bootstrap interval; returns the mean."""
    s = np.asarray(samples, dtype=float)
    mean = np.full(s.shape[1], np.nan)
    lo, hi = mean.copy(), mean.copy()
    for j in range(s.shape[1]):
        col = s[:, j][~np.isnan(s[:, j])]
        if len(col):
            mean[j], lo[j], hi[j] = (float(v) for v in bootstrap_ci(col, n_boot=n_boot, seed=seed))
    line, = ax.plot(x, mean, label=label, color=color, **kwargs)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    return mean
