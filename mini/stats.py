"""Uncertainty of accuracies on a finite prompt set (pure numpy).

* wilson_interval: 95% interval for one method's success rate (k of n);
  unlike the normal approximation it stays inside [0, 1] and is sensible at
  rates near 0 or 1 and for small n.
* paired_bootstrap: interval for the difference between two methods scored on
  the same prompts. Resampling prompts (not the two methods separately) keeps
  the pairing, so prompt difficulty shared by both methods cancels out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # standard normal quantile at 0.975


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes/n."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


@dataclass(frozen=True)
class PairedDiff:
    diff: float  # mean(a) - mean(b) on the prompts as given
    lo: float  # percentile bootstrap interval of that difference
    hi: float
    n: int  # prompts
    resamples: int


def paired_bootstrap(a, b, resamples: int = 10000, level: float = 0.95, seed: int = 0) -> PairedDiff:
    """Bootstrap interval for mean(a) - mean(b), a and b scored on the same n prompts.

    a, b: per-prompt scores (booleans or numbers), aligned by prompt. Each
    resample draws n prompt indices with replacement and uses them for both.
    Deterministic in seed.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-d and aligned, got shapes {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one prompt")
    d = a - b
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return PairedDiff(float(d.mean()), float(lo), float(hi), n, resamples)
