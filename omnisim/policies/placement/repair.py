"""Incremental repair of a placement: the fewest slot changes that give each expert the replica count the new load
calls for, then a few peak-lowering swaps. Moves a handful of slots where a fresh layout would move most."""
from __future__ import annotations

import numpy as np

from omnisim.core import Topology
from omnisim.policies.placement.layout import expert_ranks, replica_counts
from omnisim.policies.placement.packing import refine_peak
from omnisim.policies.placement.replication import allocate_replicas


def repair_layout(current: np.ndarray, counts: np.ndarray, topology: Topology, max_copies: int,
                  swap_rounds: int) -> np.ndarray:
    """``phy2log`` close to ``current``: experts with more copies than the heap allocation for ``counts`` wants
    give slots to experts with fewer (the most loaded per copy first, into the freed slot on the lightest rank
    that does not serve it yet), then up to ``swap_rounds`` rounds of ``refine_peak``."""
    layers, experts = counts.shape
    ranks, per_rank = topology.num_ranks, topology.slots_per_rank
    out = current.copy()
    every = np.arange(layers)
    copies = replica_counts(out, experts)
    spare = topology.num_slots - experts
    wanted = allocate_replicas(counts, np.full(layers, spare), max_copies)
    held = expert_ranks(out, experts, topology)
    rank_of_slot = np.arange(topology.num_slots) // per_rank
    for _ in range(int(np.maximum(wanted - copies, 0).sum(axis=1).max(initial=0))):
        need = wanted > copies
        active = need.any(axis=1)
        if not active.any():
            break
        hot = np.argmax(np.where(need, counts / copies, -np.inf), axis=1)
        slot_w = np.take_along_axis(counts / copies, out, axis=1)
        rank_w = slot_w.reshape(layers, ranks, per_rank).sum(axis=2)
        surplus = np.take_along_axis(copies > wanted, out, axis=1)                     # [layers, slots]
        free_of_hot = held[every, hot][:, rank_of_slot] == 0
        score = rank_w[:, rank_of_slot] - slot_w
        slot = np.argmin(np.where(surplus & free_of_hot, score, np.inf), axis=1)
        fallback = ~(surplus & free_of_hot)[every, slot]
        if fallback.any():
            loose = np.argmin(np.where(surplus, score, np.inf), axis=1)
            slot = np.where(fallback, loose, slot)
        ok = active & surplus[every, slot]
        rows, s = every[ok], slot[ok]
        old, new, r = out[rows, s], hot[ok], rank_of_slot[s]
        out[rows, s] = new
        copies[rows, old] -= 1
        copies[rows, new] += 1
        held[rows, old, r] -= 1
        held[rows, new, r] += 1
    return refine_peak(out, counts, topology, max_rounds=swap_rounds) if swap_rounds else out
