"""The bootstrap interval every evaluator reports beside its figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctxtask.stats import bootstrap_ci


def mean(xs: list[float]) -> float:
    return float(np.mean(xs))


def test_interval_of_a_mean_matches_the_normal_approximation() -> None:
    rng = np.random.default_rng(1)
    xs = list(rng.normal(10.0, 2.0, size=400))
    low, high = bootstrap_ci(xs, mean)
    half = 1.96 * np.std(xs) / math.sqrt(len(xs))
    assert low < np.mean(xs) < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)


def test_a_ratio_is_resampled_as_a_ratio_and_undefined_resamples_are_left_out() -> None:
    # (hits, attempts) per item; the figure is sum(hits)/sum(attempts), undefined with none.
    items = [(1, 1)] * 8 + [(0, 1)] * 2 + [(0, 0)] * 5

    def ratio(picked: list[tuple[int, int]]) -> float:
        attempts = sum(a for _, a in picked)
        return sum(h for h, _ in picked) / attempts if attempts else float("nan")

    low, high = bootstrap_ci(items, ratio)
    assert 0.4 < low < 0.8 <= high <= 1.0


def test_reproducible_and_degenerate_cases() -> None:
    xs = [0.1, 0.5, 0.2, 0.9]
    assert bootstrap_ci(xs, mean) == bootstrap_ci(xs, mean)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0], mean))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(xs, mean, confidence=1.0)
