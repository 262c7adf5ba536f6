"""OmniPlacement's dynamic rebalancer, per layer, as published (omni_placement's ExpertLoadBalancer)."""
from __future__ import annotations

import numpy as np

from omnisim.core import ExpertLoad, Placement, Topology
from omnisim.policies.placement.layout import check_shapes, high_over_low, max_over_mean
from omnisim.policies.placement.omni_layout import effective_budget, max_copies_for, omni_layout


class OmniPlacement:
    """Per layer: keep the current placement if its max/mean rank load is below ``ratio_threshold`` (1.1) or its
    max/min is above ``abnormal_ratio`` (300, data not trusted); otherwise lay the layer out for every budget
    0, R, 2R, ... up to ``max_redundant_per_rank`` redundant slots per rank, score each by its max/mean under the
    window's load, and take the best only if it beats the current ratio by more than ``improvement_threshold``
    (0.05). Redundancy therefore differs between layers. Period, window and the one-slot-per-rank-per-step
    asynchronous move are the runtime's (conf/rebalance/omni.yaml)."""

    def __init__(self, ratio_threshold: float = 1.1, abnormal_ratio: float = 300.0,
                 improvement_threshold: float = 0.05, max_redundant_per_expert: int = 10,
                 max_redundant_per_rank: int = 1, host_interleave: bool = True, seed: int = 0) -> None:
        if ratio_threshold < 1.0 or abnormal_ratio <= 1.0 or improvement_threshold < 0:
            raise ValueError("omni_placement: need ratio_threshold >= 1, abnormal_ratio > 1, "
                             "improvement_threshold >= 0")
        if max_redundant_per_expert < 0 or max_redundant_per_rank < 0:
            raise ValueError("omni_placement: max_redundant_per_expert and max_redundant_per_rank must be >= 0")
        self.ratio_threshold = ratio_threshold
        self.abnormal_ratio = abnormal_ratio
        self.improvement_threshold = improvement_threshold
        self.max_redundant_per_expert = max_redundant_per_expert
        self.max_redundant_per_rank = max_redundant_per_rank
        self.host_interleave = host_interleave
        self.seed = seed

    def budgets(self, num_experts: int, topology: Topology) -> list[int]:
        """The candidate budgets 0, R, 2R, ... (clamped to the spare slots, duplicates dropped)."""
        raw = [k * topology.num_ranks for k in range(self.max_redundant_per_rank + 1)]
        return sorted({effective_budget(b, num_experts, topology) for b in raw})

    def rebalance(self, load: ExpertLoad, current: Placement, topology: Topology) -> Placement:
        check_shapes(load.counts, current.phy2log, topology)
        counts, now = load.counts, current.phy2log
        ratio = max_over_mean(now, counts, topology.num_ranks)
        candidates = (ratio >= self.ratio_threshold) & (high_over_low(now, counts, topology.num_ranks)
                                                       <= self.abnormal_ratio)
        out = now.copy()
        rows = np.nonzero(candidates)[0]
        if not len(rows):
            return Placement(out)
        max_copies = max_copies_for(topology, self.max_redundant_per_expert)
        best_ratio = np.full(len(rows), np.inf)
        best = now[rows].copy()
        for budget in self.budgets(load.num_experts, topology):
            layout = omni_layout(counts[rows], budget, topology, max_copies, self.host_interleave)
            score = max_over_mean(layout, counts[rows], topology.num_ranks)
            better = score < best_ratio  # strict: ties keep the smaller budget, as the stable sort does
            best[better], best_ratio[better] = layout[better], score[better]
        accept = best_ratio < ratio[rows] - self.improvement_threshold
        out[rows[accept]] = best[accept]
        return Placement(out)
