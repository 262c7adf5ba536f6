"""Place for the load expected over the next period, not the load seen in the last window."""
from __future__ import annotations

import numpy as np

from omnisim.core import ExpertLoad, Placement, PlacementPolicy, Topology
from omnisim.policies.placement.migration_aware import MigrationAwarePlacement


class PredictivePlacement:
    """Holt's linear smoothing of each expert's share of its layer's tokens, window after window, forecast
    ``horizon_windows`` windows past the last window's middle, handed to ``inner`` (default:
    ``MigrationAwarePlacement``) in place of the observed load.

    A window's average lags the load by half a window; 0.5 forecasts the load as it is at the window's end, 1.0
    the middle of the next period (window = period). The defaults (no smoothing: windows of a busy engine hold
    millions of tokens; 0.75 ahead) did best on the drifting loads of benchmarks/placement_quality.py; lower the
    smoothing factors for noisy windows.

    The smoother is the policy's state: a policy object serves one EP group, and two policies built alike and fed
    the same loads decide alike. The state restarts when the load's shape changes.
    """

    def __init__(self, inner: PlacementPolicy | None = None, level_smoothing: float = 1.0,
                 trend_smoothing: float = 1.0, horizon_windows: float = 0.75, seed: int = 0) -> None:
        if not (0 < level_smoothing <= 1 and 0 <= trend_smoothing <= 1 and horizon_windows >= 0):
            raise ValueError("predictive: need 0 < level_smoothing <= 1, 0 <= trend_smoothing <= 1, "
                             "horizon_windows >= 0")
        self.inner = inner if inner is not None else MigrationAwarePlacement(seed=seed)
        self.level_smoothing = level_smoothing
        self.trend_smoothing = trend_smoothing
        self.horizon_windows = horizon_windows
        self.seed = seed
        self._level: np.ndarray | None = None
        self._trend: np.ndarray | None = None

    def forecast(self, counts: np.ndarray) -> np.ndarray:
        """Update the smoother with one window of counts and return the expected counts ahead."""
        totals = counts.sum(axis=1, keepdims=True)
        share = np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), 1.0 / counts.shape[1])
        if self._level is None or self._level.shape != share.shape:
            self._level, self._trend = share, np.zeros_like(share)
        else:
            a, b = self.level_smoothing, self.trend_smoothing
            previous = self._level
            self._level = a * share + (1 - a) * (previous + self._trend)
            self._trend = b * (self._level - previous) + (1 - b) * self._trend
        ahead = np.clip(self._level + self.horizon_windows * self._trend, 0.0, None)
        sums = ahead.sum(axis=1, keepdims=True)
        ahead = np.where(sums > 0, ahead / np.where(sums > 0, sums, 1.0), share)
        return ahead * totals

    def rebalance(self, load: ExpertLoad, current: Placement, topology: Topology) -> Placement:
        return self.inner.rebalance(ExpertLoad(self.forecast(load.counts)), current, topology)
