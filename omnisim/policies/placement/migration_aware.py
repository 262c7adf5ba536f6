"""A rebalancer that pays for what it moves: imbalance saved over a horizon against weight bytes and stall."""
from __future__ import annotations

import numpy as np

from omnisim.core import ExpertLoad, Placement, Topology
from omnisim.policies.placement.alignment import align_to_current, moves_per_rank
from omnisim.policies.placement.balanced_layout import balanced_layout
from omnisim.policies.placement.layout import check_shapes, max_over_mean
from omnisim.policies.placement.omni_layout import max_copies_for
from omnisim.policies.placement.repair import repair_layout


class MigrationAwarePlacement:
    """Per layer, pick among keeping the current layout, repairing it (``repair.repair_layout``: a few slot
    changes) and moving to the balanced layout (aligned to the current one, so only necessary slots change), by
    the serving time each saves net of the time moving costs.

    Model, in seconds of serving: a balanced step spends ``moe_time_fraction`` of its time in MoE layers, and a
    layer's MoE time scales with its max/mean rank load, so over ``horizon_s`` (the placement's expected life,
    typically the rebalance period) a layer whose ratio drops by d saves ``horizon_s * f * d / layers`` relative to
    a step of ``1 - f + f * mean ratio``. Moving ships ``expert_bytes`` per changed slot over a ``link_GBps`` link
    per receiving rank, at most ``moves_per_rank_per_step`` per engine step of ``step_s`` (match the runtime's
    rebalance settings); ranks load in parallel, so a set of changes takes D = max over ranks of its moves times
    the per-move time. The new layout serves only after D (its saving shrinks by D / horizon), and
    ``stall_fraction`` of D is lost serving (1.0: synchronous rearrangement stalls; ~0.05: double-buffered
    asynchronous copy that only competes for links). A change must also lower the layer's ratio by ``min_gain``
    plus the counting noise of the window (``sqrt(2 ln R / mean rank load)``): a layout fitted to one window's
    counts looks that much better on them than it will be. Layers are added by net saving per move, best first;
    the prefix with the largest net saving is applied.
    """

    def __init__(self, expert_bytes: float = 3 * 7168 * 2048, link_GBps: float = 50.0, horizon_s: float = 60.0,
                 moe_time_fraction: float = 0.4, stall_fraction: float = 1.0, min_gain: float = 0.02,
                 moves_per_rank_per_step: int = 0, step_s: float = 0.05, swap_rounds: int = 16,
                 max_redundant_per_expert: int = 10, seed: int = 0) -> None:
        for name, value in (("expert_bytes", expert_bytes), ("link_GBps", link_GBps), ("horizon_s", horizon_s)):
            if value <= 0:
                raise ValueError(f"migration_aware: {name} must be > 0, got {value}")
        if not 0 < moe_time_fraction <= 1 or stall_fraction < 0 or min_gain < 0 or swap_rounds < 0:
            raise ValueError("migration_aware: moe_time_fraction must be in (0, 1], stall_fraction, min_gain and "
                             "swap_rounds >= 0")
        if moves_per_rank_per_step < 0 or step_s < 0:
            raise ValueError("migration_aware: moves_per_rank_per_step and step_s must be >= 0")
        self.expert_bytes = expert_bytes
        self.link_GBps = link_GBps
        self.horizon_s = horizon_s
        self.moe_time_fraction = moe_time_fraction
        self.stall_fraction = stall_fraction
        self.min_gain = min_gain
        self.moves_per_rank_per_step = moves_per_rank_per_step
        self.step_s = step_s
        self.swap_rounds = swap_rounds
        self.max_redundant_per_expert = max_redundant_per_expert
        self.seed = seed

    @property
    def transfer_s(self) -> float:
        """Seconds per move of one rank: the link's transfer time, or the engine-step pacing when moves are limited
        to ``moves_per_rank_per_step`` per step of ``step_s`` (the runtime's limit; 0: unlimited)."""
        paced = self.step_s / self.moves_per_rank_per_step if self.moves_per_rank_per_step else 0.0
        return max(self.expert_bytes / (self.link_GBps * 1e9), paced)

    def rebalance(self, load: ExpertLoad, current: Placement, topology: Topology) -> Placement:
        check_shapes(load.counts, current.phy2log, topology)
        counts, now = load.counts, current.phy2log
        max_copies = max_copies_for(topology, self.max_redundant_per_expert)
        fresh = align_to_current(balanced_layout(counts, topology, max_copies), now, load.num_experts, topology)
        repaired = repair_layout(now, counts, topology, max_copies, self.swap_rounds)
        return Placement(self.choose(counts, now, [repaired, fresh], topology))

    def choose(self, counts: np.ndarray, now: np.ndarray, options: list[np.ndarray], topology: Topology) -> np.ndarray:
        """Per layer, ``now`` or one of ``options``, whichever saves most net of moving (see the class doc)."""
        layers = counts.shape[0]
        ranks = topology.num_ranks
        ratio_now = max_over_mean(now, counts, ranks)
        f = self.moe_time_fraction
        step = 1.0 - f + f * ratio_now.mean()
        best_net = np.zeros(layers)
        best = np.full(layers, -1)
        saving = np.zeros(layers)
        moves = np.zeros((layers, ranks))
        # counting noise: the max of R Poisson-like rank loads of mean m sits ~sqrt(2 ln R / m) above the mean, so a
        # layout fitted to one window's counts looks that much better on them than it is
        mean_rank = counts.sum(axis=1) / ranks
        noise = np.sqrt(2.0 * np.log(max(ranks, 2)) / np.maximum(mean_rank, 1e-12))
        for i, option in enumerate(options):
            gain = ratio_now - max_over_mean(option, counts, ranks)
            save = self.horizon_s * f * gain / layers / step                         # seconds per layer
            per_rank = moves_per_rank(option, now, topology)
            duration = per_rank.max(axis=1) * self.transfer_s
            net = save * np.maximum(0.0, 1.0 - duration / self.horizon_s) - self.stall_fraction * duration
            better = (gain >= self.min_gain + noise) & (net > best_net)
            best_net[better], best[better], saving[better] = net[better], i, save[better]
            moves[better] = per_rank[better]
        candidates = [int(layer) for layer in np.argsort(-best_net / np.maximum(moves.max(axis=1), 1), kind="stable")
                      if best[layer] >= 0]
        per_rank, gained, top_net, top_k = np.zeros(ranks), 0.0, 0.0, 0
        for k, layer in enumerate(candidates, start=1):
            per_rank += moves[layer]
            gained += saving[layer]
            duration = per_rank.max() * self.transfer_s
            net = gained * max(0.0, 1.0 - duration / self.horizon_s) - self.stall_fraction * duration
            if net > top_net:
                top_net, top_k = net, k
        out = now.copy()
        for layer in candidates[:top_k]:
            out[layer] = options[best[layer]][layer]
        return out
