"""Intervals for accuracies and for differences of accuracies (no torch; numpy only).

- `wilson_interval(correct, n)`: the 95% Wilson score interval of one proportion.
- `paired_bootstrap(a, b)`: the difference of two methods scored on the SAME problems over the
  same seeds, `mean(a) - mean(b)`, with a percentile interval from a bootstrap that resamples
  problems (and seeds, as whole blocks) with replacement, keeping each problem's two scores
  together. Pairing removes the problem-to-problem spread that both methods share, so the interval
  is much narrower than two separate Wilson intervals.

For example:

    >>> from hpd.stats import paired_bootstrap, wilson_interval
    >>> [round(v, 3) for v in wilson_interval(41, 200)]
    [0.155, 0.266]
    >>> a = [[1, 1, 0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1, 1, 0]]   # seeds x problems
    >>> b = [[1, 0, 0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 1, 0, 1, 0]]
    >>> d = paired_bootstrap(a, b, n_boot=2000)
    >>> d.diff, d.n, d.seeds, d.low <= d.diff <= d.high
    (0.25, 8, 2, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpd.errors import HPDError

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion `correct / n`.

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at 0 or n correct,
    which matters for the small evaluation sets and extreme accuracies of tiny models.
    """
    if n <= 0:
        raise HPDError(f"the Wilson interval needs n >= 1 samples, got n={n}")
    if not 0 <= correct <= n:
        raise HPDError(f"correct must be in 0..n, got correct={correct}, n={n}")
    p = correct / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At 0 or n correct one bound is exactly 0 or 1; rounding would leave e.g. 3e-17 above 0.
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


@dataclass(frozen=True)
class PairedDiff:
    """`mean(a) - mean(b)` in the units of the scores, with its bootstrap percentile interval.

    n: problems per seed; seeds: seeds (S); level: the interval's coverage; n_boot: replicates.
    """

    diff: float
    low: float
    high: float
    n: int
    seeds: int
    level: float = 0.95
    n_boot: int = 10000

    def summary(self, scale: float = 100.0) -> str:
        """One line, in points for 0/1 scores: `+3.2 [-1.0, +7.5] (95%, 500 problems x 3 seeds)`."""
        return (f"{scale * self.diff:+.1f} [{scale * self.low:+.1f}, {scale * self.high:+.1f}] "
                f"({100 * self.level:g}%, {self.n} problems x {self.seeds} seed{'s' if self.seeds != 1 else ''})")


def _scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]  # one seed
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise HPDError(f"{name} must hold scores of shape (seeds, problems) with at least one of each, "
                       f"got shape {np.shape(x)}")
    if not np.isfinite(arr).all():
        raise HPDError(f"{name} holds a non-finite score; scores must be finite numbers (0/1 for accuracy)")
    return arr


def paired_bootstrap(a, b, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> PairedDiff:
    """The paired difference `mean(a) - mean(b)` with a `level` percentile bootstrap interval.

    a, b: array-likes of shape `(S, N)` (or `(N,)` for one seed): the scores (0/1 or any float) of
          two methods on the same N problems, seed i of `a` paired with seed i of `b`.
    Each of `n_boot` replicates draws N problems and S seeds with replacement (a seed is a block:
    all of its problems, in both methods) and takes the mean difference over that grid. The same
    `seed` gives the same interval.
    """
    A, B = _scores(a, "a"), _scores(b, "b")
    if A.shape != B.shape:
        raise HPDError(f"a and b must score the same seeds and problems: shapes {A.shape} and {B.shape} differ")
    if n_boot < 1:
        raise HPDError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise HPDError(f"level must be in (0, 1), got {level}")
    d = A - B  # (S, N)
    S, N = d.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    block = max(1, 2**22 // (N + S))  # replicates per block: a few (block, N) arrays of float64
    for start in range(0, n_boot, block):
        r = min(block, n_boot - start)
        # How often each problem / seed is drawn: the mean over the resampled grid is
        # sum_ij cs_i d_ij cp_j / (S N), with no (r, S, N) index array.
        cp = rng.multinomial(N, np.full(N, 1.0 / N), size=r)  # (r, N)
        cs = rng.multinomial(S, np.full(S, 1.0 / S), size=r) if S > 1 else np.ones((r, 1))  # (r, S)
        stats[start:start + r] = ((cs @ d) * cp).sum(1) / (S * N)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return PairedDiff(diff=float(d.mean()), low=float(low), high=float(high), n=N, seeds=S, level=level, n_boot=n_boot)


__all__ = ["PairedDiff", "Z_95", "paired_bootstrap", "wilson_interval"]
