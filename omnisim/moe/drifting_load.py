"""Skewed popularity whose hot experts change over time at a configurable rate."""
from __future__ import annotations

import numpy as np

from omnisim.moe.zipf_load import layer_exponents, zipf_weights


class DriftingLoad:
    """Zipf-like shares over a per-layer popularity ranking that drifts: every ``period_s``, in every layer,
    ``changed_per_period`` of the ``hot_set`` hottest popularity ranks are handed to experts from outside the hot
    set (swapping ranks with them). Between two such changes the shares move linearly from the old ranking's to
    the new one's, in ``blend_steps`` steps (so load rises and falls smoothly, the way a changing request mix
    shifts it); the rate of change is ``changed_per_period / period_s`` hot experts per second per layer.
    Rankings are generated epoch after epoch from the seed, so a time's shares do not depend on query order."""

    def __init__(self, exponent: float = 0.6, exponent_spread: float = 0.0, hot_set: int = 16,
                 changed_per_period: int = 4, period_s: float = 60.0, blend_steps: int = 10, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"drifting: seed must be an integer >= 0, got {seed!r}")
        if exponent < 0 or exponent_spread < 0:
            raise ValueError("drifting: exponent and exponent_spread must be >= 0")
        if hot_set < 1 or not 0 <= changed_per_period <= hot_set:
            raise ValueError(f"drifting: need hot_set >= 1 and 0 <= changed_per_period <= hot_set, got "
                             f"{hot_set}, {changed_per_period}")
        if period_s <= 0 or blend_steps < 1:
            raise ValueError(f"drifting: period_s must be > 0 and blend_steps >= 1, got {period_s}, {blend_steps}")
        self.exponent = exponent
        self.exponent_spread = exponent_spread
        self.hot_set = hot_set
        self.changed_per_period = changed_per_period
        self.period_s = period_s
        self.blend_steps = blend_steps
        self.seed = seed
        self._state: dict[tuple[int, int], dict] = {}

    def time_key(self, t_s: float) -> tuple[int, int]:
        epoch, within = divmod(max(t_s, 0.0), self.period_s)
        return int(epoch), int(within / self.period_s * self.blend_steps)

    def _ranking(self, epoch: int, num_layers: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """(``rank_of [layers, experts]`` popularity rank of every expert at ``epoch``, per-layer weights)."""
        state = self._state.get((num_layers, num_experts))
        if state is None:
            rng = np.random.default_rng([self.seed, num_layers, num_experts])
            exps = layer_exponents(rng, num_layers, self.exponent, self.exponent_spread)
            weights = np.array([zipf_weights(num_experts, s) for s in exps])
            first = np.array([rng.permutation(num_experts) for _ in range(num_layers)])
            state = self._state[(num_layers, num_experts)] = {"rng": rng, "weights": weights, "ranks": [first]}
        hot = min(self.hot_set, num_experts)
        while len(state["ranks"]) <= epoch:
            rank_of = state["ranks"][-1].copy()
            rng = state["rng"]
            changes = min(self.changed_per_period, hot, num_experts - hot)
            for layer in range(num_layers):
                expert_at = np.argsort(rank_of[layer])                 # expert holding each popularity rank
                leaving = rng.choice(hot, size=changes, replace=False)
                arriving = hot + rng.choice(num_experts - hot, size=changes, replace=False)
                a, b = expert_at[leaving], expert_at[arriving]
                rank_of[layer, a], rank_of[layer, b] = rank_of[layer, b], rank_of[layer, a]
            state["ranks"].append(rank_of)
        return state["ranks"][epoch], state["weights"]

    def shares(self, t_s: float, num_layers: int, num_experts: int) -> np.ndarray:
        epoch, step = self.time_key(t_s)
        now_rank, weights = self._ranking(epoch, num_layers, num_experts)
        next_rank, _ = self._ranking(epoch + 1, num_layers, num_experts)
        now = np.take_along_axis(weights, now_rank, axis=1)
        nxt = np.take_along_axis(weights, next_rank, axis=1)
        phase = step / self.blend_steps
        return (1 - phase) * now + phase * nxt
