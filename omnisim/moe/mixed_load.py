"""Workload-dependent mixes: the request mix (chat, code, math ...) decides which experts are hot."""
from __future__ import annotations

import numpy as np

from omnisim.moe.expert_load_model import ExpertLoadModel


class MixedLoad:
    """Each component is the expert load of one kind of request; ``mix[i]`` gives the components' weights during
    the i-th segment of ``segment_s`` seconds (cycling), e.g. ``[[0.8, 0.2], [0.3, 0.7]]`` for a day/night swing
    between chat and code. One row means a fixed mix."""

    def __init__(self, components: list[ExpertLoadModel], mix: list[list[float]], segment_s: float = 300.0,
                 seed: int = 0) -> None:
        if not components:
            raise ValueError("mixed: components must not be empty")
        weights = np.asarray(mix, dtype=np.float64)
        if weights.ndim == 1:
            weights = weights[None, :]
        if weights.ndim != 2 or weights.shape[1] != len(components):
            raise ValueError(f"mixed: every row of mix needs {len(components)} weights (one per component), "
                             f"got shape {weights.shape}")
        if (weights < 0).any() or (weights.sum(axis=1) <= 0).any():
            raise ValueError("mixed: mix weights must be >= 0 with a positive sum per row")
        if segment_s <= 0:
            raise ValueError(f"mixed: segment_s must be > 0, got {segment_s}")
        self.components = list(components)
        self.mix = weights / weights.sum(axis=1, keepdims=True)
        self.segment_s = segment_s
        self.seed = seed

    def _segment(self, t_s: float) -> int:
        return int(max(t_s, 0.0) // self.segment_s) % len(self.mix)

    def time_key(self, t_s: float) -> tuple:
        return self._segment(t_s), tuple(c.time_key(t_s) for c in self.components)

    def shares(self, t_s: float, num_layers: int, num_experts: int) -> np.ndarray:
        w = self.mix[self._segment(t_s)]
        return sum(wi * np.asarray(c.shares(t_s, num_layers, num_experts))
                   for wi, c in zip(w, self.components) if wi > 0)
