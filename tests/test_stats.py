"""hpd.stats: the paired bootstrap on hand-checkable examples, and against the normal approximation."""

from __future__ import annotations

import numpy as np
import pytest

from hpd.errors import HPDError
from hpd.stats import PairedDiff, paired_bootstrap, wilson_interval


def test_identical_scores_give_zero_difference_and_a_zero_interval():
    a = np.random.default_rng(0).integers(0, 2, (3, 50))
    d = paired_bootstrap(a, a.copy(), n_boot=500)
    assert (d.diff, d.low, d.high, d.n, d.seeds) == (0.0, 0.0, 0.0, 50, 3)


def test_a_constant_shift_is_the_difference_and_the_whole_interval():
    """b = a - 1 on every problem and seed: every resample sees the same shift."""
    a = np.random.default_rng(1).integers(1, 3, (2, 40)).astype(float)
    d = paired_bootstrap(a, a - 1, n_boot=300)
    assert d.diff == d.low == d.high == 1.0


def test_hand_checkable_single_problem_difference():
    """One seed, four problems; a wins problem 0 only: diff 1/4. A resample's mean difference is
    (times problem 0 is drawn)/4 with that count Binomial(4, 1/4): P(0) = 0.316 > 2.5%, and
    P(<= 2) = 0.949 < 97.5% < P(<= 3) = 0.996, so the interval is [0, 3/4]."""
    d = paired_bootstrap([[1, 1, 0, 0]], [[0, 1, 0, 0]], n_boot=20000, seed=3)
    assert d.diff == 0.25 and d.seeds == 1 and d.n == 4
    assert (d.low, d.high) == (0.0, 0.75)


def test_the_interval_covers_the_difference_and_matches_the_normal_approximation():
    """Many problems, one seed: the bootstrap half-width is about 1.96 sd(a - b) / sqrt(N)."""
    rng = np.random.default_rng(2)
    N = 2000
    b = (rng.random(N) < 0.4).astype(float)
    a = np.where(rng.random(N) < 0.2, 1 - b, b)  # disagree on about 20% of problems
    d = paired_bootstrap(a, b, n_boot=4000, seed=0)
    assert d.low < d.diff < d.high
    half = 1.959964 * (a - b).std() / np.sqrt(N)
    assert (d.high - d.low) / 2 == pytest.approx(half, rel=0.1)
    assert d.diff == pytest.approx((a - b).mean(), abs=1e-15)


def test_seeds_are_resampled_as_blocks():
    """Two seeds that disagree by a constant: resampling seeds widens the interval to both seed means."""
    a = np.array([[1.0] * 30, [0.0] * 30])
    b = np.zeros((2, 30))
    d = paired_bootstrap(a, b, n_boot=4000, seed=0)
    assert d.diff == 0.5
    # Each replicate draws seed 0 zero, one or two times: means 0, 0.5, 1, with probabilities 1/4, 1/2, 1/4.
    assert (d.low, d.high) == (0.0, 1.0)
    pairs_only = paired_bootstrap(a[:1], b[:1], n_boot=200)  # S = 1 works too
    assert (pairs_only.diff, pairs_only.low, pairs_only.high, pairs_only.seeds) == (1.0, 1.0, 1.0, 1)


def test_deterministic_for_a_seed_and_seed_dependent():
    rng = np.random.default_rng(4)
    a, b = rng.random((3, 60)), rng.random((3, 60))  # float scores: quantiles off a coarse grid
    first, again = paired_bootstrap(a, b, seed=7, n_boot=1000), paired_bootstrap(a, b, seed=7, n_boot=1000)
    assert first == again
    assert paired_bootstrap(a, b, seed=8, n_boot=1000) != first
    assert isinstance(first, PairedDiff) and first.summary().endswith("(95%, 60 problems x 3 seeds)")


def test_one_dimensional_scores_are_one_seed():
    d = paired_bootstrap([1, 0, 1, 1], [0, 0, 1, 0], n_boot=100)
    assert (d.diff, d.seeds, d.n) == (0.5, 1, 4)


@pytest.mark.parametrize("a,b,kw,match", [
    ([[1, 0]], [[1, 0, 1]], {}, r"shapes \(1, 2\) and \(1, 3\) differ"),
    ([[]], [[]], {}, "at least one of each"),
    ([[1, float("nan")]], [[1, 0]], {}, "non-finite"),
    ([[1, 0]], [[1, 0]], {"level": 1.0}, r"level must be in \(0, 1\)"),
    ([[1, 0]], [[1, 0]], {"n_boot": 0}, "n_boot must be >= 1"),
])
def test_bad_input_says_what_is_wrong(a, b, kw, match):
    with pytest.raises(HPDError, match=match):
        paired_bootstrap(a, b, **kw)


def test_wilson_interval_is_one_function_reexported_by_evaluate():
    from hpd.apps import evaluate

    assert evaluate.wilson_interval is wilson_interval
