"""A piecewise-constant rate multiplier over time (ramps, bursts, pauses, day/night steps)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class RateSteps:
    """Steps ``[[start_s, multiplier], ...]``: from ``start_s`` on, the arrival rate is ``rate * multiplier``.

    The first step starts at 0, starts increase, multipliers are >= 0 (0 pauses arrivals) and the last one is > 0.
    A renewal process generated at the base rate is time-warped through the inverse of the cumulative multiplier,
    so Poisson stays Poisson (now inhomogeneous) and Gamma keeps its burstiness within each step.
    """

    def __init__(self, steps: Sequence[Sequence[float]]) -> None:
        try:
            pairs = [(float(start), float(multiplier)) for start, multiplier in steps]
        except (TypeError, ValueError):
            raise ValueError(f"workload.rate_steps must be a list of [start_s, multiplier] pairs, got "
                             f"{steps!r}") from None
        if not pairs or pairs[0][0] != 0.0:
            raise ValueError(f"workload.rate_steps must start with a step at 0 s, got {pairs!r}")
        starts = np.array([p[0] for p in pairs])
        multipliers = np.array([p[1] for p in pairs])
        if np.any(np.diff(starts) <= 0):
            raise ValueError(f"workload.rate_steps start times must increase, got {starts.tolist()}")
        if np.any(multipliers < 0) or multipliers[-1] <= 0:
            raise ValueError(f"workload.rate_steps multipliers must be >= 0 with the last > 0, got "
                             f"{multipliers.tolist()}")
        self.steps = tuple(pairs)
        self._starts = starts
        self._multipliers = multipliers
        # Operational (base-rate) time reached at each step start.
        self._cumulative = np.concatenate([[0.0], np.cumsum(np.diff(starts) * multipliers[:-1])])

    def warp(self, base_times: np.ndarray) -> np.ndarray:
        """Real times of events that a rate-1-multiplier process would place at ``base_times``."""
        # side="right" skips paused steps (multiplier 0), whose cumulative value equals the next step's.
        step = np.searchsorted(self._cumulative, base_times, side="right") - 1
        return self._starts[step] + (base_times - self._cumulative[step]) / self._multipliers[step]

    def __repr__(self) -> str:
        return f"RateSteps({[list(p) for p in self.steps]})"
