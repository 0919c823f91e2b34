"""Intervals (lmbook.core.stats)."""

import math

import numpy as np
import pytest
import torch

from lmbook import ParameterError
from lmbook.core.stats import bootstrap_ci, paired_difference, ratio_bootstrap, share, wilson_interval


def test_wilson_interval():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_bootstrap_ci_contains_the_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small, big = rng.normal(size=20), rng.normal(size=2000)
    m, lo, hi = bootstrap_ci(small)
    assert lo < m < hi
    _, lo2, hi2 = bootstrap_ci(big)
    assert hi2 - lo2 < hi - lo
    m, lo, hi = bootstrap_ci(np.ones((5, 3)))
    assert np.allclose(m, 1) and np.allclose(lo, 1) and np.allclose(hi, 1)


@pytest.mark.parametrize("n", [1, 2, 5, 24, 40, 50, 1000])
def test_wilson_interval_contains_the_estimate_for_every_k(n):
    for k in range(n + 1):
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def test_wilson_interval_rejects_impossible_counts():
    for k, n in [(3, 2), (-1, 5), (1.5, 3)]:
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson_interval(k, n)


def test_share():
    s = share([True, False, True, True])
    assert (s.k, s.n, s.rate) == (3, 4, 0.75)
    assert (s.low, s.high) == wilson_interval(3, 4)
    assert np.array([s, s])[:, :3].tolist() == [[0.75, s.low, s.high]] * 2
    assert math.isnan(share([]).rate)


def test_ratio_bootstrap_resamples_units():
    hits = np.array([[1, 0, 3, 0], [0, 0, 0, 0]])
    words = np.array([[10, 10, 10, 10], [5, 5, 0, 5]])
    r, lo, hi = ratio_bootstrap(hits, words, seed=0)
    np.testing.assert_allclose(r, [4 / 40, 0.0])
    assert lo[0] <= r[0] <= hi[0] and lo[0] < hi[0]
    assert lo[1] == hi[1] == 0.0
    # one unit: no spread
    r1, lo1, hi1 = ratio_bootstrap([[2]], [[8]])
    assert r1[0] == lo1[0] == hi1[0] == 0.25


def test_paired_difference():


    x = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    assert paired_difference(x, x) == (0.0, 0.0, 0.0)  # a condition against itself: exactly zero
    v, lo, hi = paired_difference([True, True], [False, False])
    assert v == 1.0 and lo < 0 < hi  # two prompts do not separate (sign test: p = 0.5)
    kept = torch.zeros(35, dtype=torch.bool)
    ctrl = torch.zeros(35, dtype=torch.bool)
    kept[:10] = True  # ten prompts only the condition keeps, two only the control keeps, 23 agree
    ctrl[10:12] = True
    v, lo, hi = paired_difference(kept, ctrl)
    assert v == pytest.approx(8 / 35) and 0 < lo <= v <= hi
    v, lo, hi = paired_difference(ctrl, kept)
    assert lo <= v <= hi < 0
    assert all(map(math.isnan, paired_difference([], [])))
    with pytest.raises(ParameterError, match="same prompts"):
        paired_difference([True], [True, False])


def test_paired_interval_excludes_zero_exactly_when_the_sign_test_rejects():


    for w in range(0, 13):
        for l in range(0, 13 - w):
            m = w + l
            if m == 0:
                continue
            k = min(w, l)  # two-sided exact sign test
            p = min(1.0, 2 * sum(math.comb(m, j) for j in range(k + 1)) / 2 ** m)
            kept = [True] * w + [False] * l + [True] * 3  # three prompts where both keep the answer
            ctrl = [False] * w + [True] * l + [True] * 3
            _, lo, hi = paired_difference(kept, ctrl)
            assert (lo > 0 or hi < 0) == (p < 0.05), (w, l, p, lo, hi)
