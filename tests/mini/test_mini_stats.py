"""Tests for mini/stats.py: Wilson intervals and the paired bootstrap."""

import numpy as np
import pytest

from mini.stats import paired_bootstrap, wilson_interval


def test_wilson_matches_known_values():
    # Reference values of the Wilson score interval at 95% (z = 1.96).
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(108, 120) == pytest.approx((0.8333, 0.9419), abs=1e-4)  # by hand: centre 0.8876, half 0.0543


def test_wilson_contains_the_rate_and_narrows_with_n():
    for k, n in [(1, 3), (38, 120), (119, 120), (3, 1000)]:
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    assert np.diff(wilson_interval(90, 100)) > np.diff(wilson_interval(900, 1000))
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_paired_bootstrap_basic_cases():
    a = np.array([1, 0, 1, 1, 0, 1] * 20, bool)
    same = paired_bootstrap(a, a)
    assert (same.diff, same.lo, same.hi) == (0.0, 0.0, 0.0)
    ones, zeros = np.ones(50), np.zeros(50)
    d = paired_bootstrap(ones, zeros)
    assert (d.diff, d.lo, d.hi, d.n) == (1.0, 1.0, 1.0, 50)
    # Deterministic in its seed.
    rng = np.random.default_rng(1)
    x, y = rng.random(120) < 0.8, rng.random(120) < 0.7
    assert paired_bootstrap(x, y, seed=3) == paired_bootstrap(x, y, seed=3)
    r = paired_bootstrap(x, y)
    assert r.lo <= r.diff <= r.hi
    with pytest.raises(ValueError):
        paired_bootstrap(x, y[:-1])


def test_pairing_removes_shared_prompt_difficulty():
    # b is a with 6 of 120 prompts flipped from right to wrong: the paired interval
    # is tight around +5 points, far tighter than two independent Wilson intervals.
    rng = np.random.default_rng(0)
    a = rng.random(120) < 0.6
    b = a.copy()
    b[np.flatnonzero(a)[:6]] = False
    d = paired_bootstrap(a, b)
    assert d.diff == pytest.approx(6 / 120)
    assert 0 < d.lo <= d.hi < 0.1
    wa, wb = wilson_interval(int(a.sum()), 120), wilson_interval(int(b.sum()), 120)
    assert wa[0] < wb[1]  # the unpaired intervals overlap
