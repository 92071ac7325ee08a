"""Confidence intervals for evaluation figures: one bootstrap, used by every task's evaluator.

A figure measured on 20 photos or 11 recordings moves by several points when one item
changes; reporting its 95 % interval beside it keeps a one-photo difference from being read
as progress. The percentile bootstrap resamples the *items* (relations, images,
utterances) with replacement and recomputes the figure from the resampled items, so
ratio figures (precision, WER) are resampled as ratios, not as means of per-item ratios.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

__all__ = ["bootstrap_ci"]

Item = TypeVar("Item")

#: Resamples per interval: the interval's ends move by < 0.005 between seeds at this count
#: on the shared data's sizes, and it costs well under a second for every task's figures.
DEFAULT_RESAMPLES = 2000


def bootstrap_ci(
    items: Sequence[Item],
    statistic: Callable[[Sequence[Item]], float],
    *,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic(items)``.

    ``statistic`` is called on resampled lists of ``items``; resamples where it is
    undefined (it returns NaN, e.g. precision with no detection) are left out. A fixed
    ``seed`` makes the interval reproducible run to run. Returns ``(nan, nan)`` for fewer
    than two items, where no interval can be estimated.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    n = len(items)
    if n < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        picks = rng.integers(0, n, size=n)
        value = float(statistic([items[i] for i in picks]))
        if not np.isnan(value):
            values.append(value)
    if not values:
        return (float("nan"), float("nan"))
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return (float(low), float(high))
