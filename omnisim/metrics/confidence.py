"""Confidence intervals for a statistic of a sample, e.g. a policy's p99 TTFT across seeds."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

_MAX_DRAWS_PER_CHUNK = 2_000_000  # bounds memory when the sample itself is large


class Interval(NamedTuple):
    estimate: float
    low: float
    high: float
    level: float


def confidence_interval(values, level: float = 0.95, statistic: str = "mean", n_resamples: int = 10_000,
                        seed: int = 0) -> Interval:
    """Seeded percentile-bootstrap interval for ``statistic`` of ``values``.

    ``statistic`` is "mean", "median" or "pQ" for the Q-th percentile (e.g. "p99"). The estimate is the statistic
    of the sample itself; low/high are the (1-level)/2 and (1+level)/2 quantiles of the statistic over
    ``n_resamples`` resamples drawn with replacement. With one value there is no spread to resample: low and high
    are NaN. Percentile bootstraps are a little narrow for very small samples (a handful of seeds): read them as
    a guide, and prefer more seeds to a cleverer interval.
    """
    sample = np.asarray(values, dtype=np.float64).ravel()
    if sample.size == 0:
        raise ValueError("confidence_interval: values is empty")
    if np.isnan(sample).any():
        raise ValueError("confidence_interval: values contain NaN (drop undefined entries first)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence_interval: level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"confidence_interval: n_resamples must be >= 1, got {n_resamples}")
    reduce = _statistic(statistic)
    estimate = float(reduce(sample[np.newaxis, :])[0])
    if sample.size == 1:
        return Interval(estimate, float("nan"), float("nan"), level)

    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // sample.size)
    stats = np.concatenate([
        reduce(sample[rng.integers(0, sample.size, size=(min(chunk, n_resamples - start), sample.size))])
        for start in range(0, n_resamples, chunk)])
    low, high = np.quantile(stats, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(estimate, float(low), float(high), level)


def _statistic(name: str):
    """A function reducing each row of a 2-D array to one number."""
    if name == "mean":
        return lambda rows: rows.mean(axis=1)
    if name == "median":
        return lambda rows: np.median(rows, axis=1)
    if isinstance(name, str) and name.startswith("p"):
        try:
            q = float(name[1:])
        except ValueError:
            q = -1.0
        if 0.0 <= q <= 100.0:
            return lambda rows: np.percentile(rows, q, axis=1)
    raise ValueError(f"confidence_interval: statistic must be 'mean', 'median' or 'pQ' (0 <= Q <= 100), got {name!r}")
