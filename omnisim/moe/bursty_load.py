"""Bursts on top of another load model: for a while, a few experts get much hotter."""
from __future__ import annotations

import bisect

import numpy as np

from omnisim.moe.expert_load_model import ExpertLoadModel


class BurstyLoad:
    """Bursts arrive as a Poisson process (``rate_per_s``) and last ``duration_s``; during a burst, in a
    ``layer_fraction`` of the layers, ``experts`` random experts have their share multiplied by ``boost`` (then
    every row is renormalised). Burst times and chosen experts come from the seed."""

    def __init__(self, base: ExpertLoadModel, rate_per_s: float = 0.02, duration_s: float = 20.0, experts: int = 4,
                 boost: float = 6.0, layer_fraction: float = 1.0, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"bursty: seed must be an integer >= 0, got {seed!r}")
        if rate_per_s < 0 or duration_s <= 0 or experts < 1 or boost < 1 or not 0 < layer_fraction <= 1:
            raise ValueError("bursty: need rate_per_s >= 0, duration_s > 0, experts >= 1, boost >= 1, "
                             "0 < layer_fraction <= 1")
        self.base = base
        self.rate_per_s = rate_per_s
        self.duration_s = duration_s
        self.experts = experts
        self.boost = boost
        self.layer_fraction = layer_fraction
        self.seed = seed
        self._rng = np.random.default_rng([seed, 7])
        self._starts: list[float] = []
        self._horizon = 0.0
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}

    def _active(self, t_s: float) -> tuple[int, int]:
        """Indices [lo, hi) of the bursts under way at t."""
        while self._horizon <= t_s and self.rate_per_s > 0:
            self._horizon += self._rng.exponential(1.0 / self.rate_per_s)
            self._starts.append(self._horizon)
        hi = bisect.bisect_right(self._starts, t_s)
        lo = bisect.bisect_right(self._starts, t_s - self.duration_s)
        return lo, hi

    def time_key(self, t_s: float) -> tuple:
        return self.base.time_key(t_s), self._active(t_s)

    def _boost(self, burst: int, num_layers: int, num_experts: int) -> np.ndarray:
        key = (burst, num_layers, num_experts)
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, burst, num_layers, num_experts])
            factor = np.ones((num_layers, num_experts))
            hit = rng.random(num_layers) < self.layer_fraction
            for layer in np.nonzero(hit)[0]:
                factor[layer, rng.choice(num_experts, size=min(self.experts, num_experts), replace=False)] = self.boost
            self._cache[key] = factor
        return self._cache[key]

    def shares(self, t_s: float, num_layers: int, num_experts: int) -> np.ndarray:
        out = np.array(self.base.shares(t_s, num_layers, num_experts), dtype=np.float64)
        lo, hi = self._active(t_s)
        for burst in range(lo, hi):
            out = out * self._boost(burst, num_layers, num_experts)
        return out / out.sum(axis=1, keepdims=True)
