"""OmniPlacement's per-layer layout for a given redundancy budget (``generate_layer_placement`` in the published
C++ balancer), for many layers at once: heap replica allocation, placement by decreasing load per replica onto the
least loaded rank lacking the expert, empty slots, host interleave."""
from __future__ import annotations

import numpy as np

from omnisim.core import Topology
from omnisim.policies.placement.layout import host_interleave, permute_ranks
from omnisim.policies.placement.packing import fill_free_slots, pack_distinct
from omnisim.policies.placement.replication import allocate_replicas


def max_copies_for(topology: Topology, max_redundant_per_expert: int) -> int:
    """At most 1 + max_redundant_per_expert copies of an expert, never more than there are ranks."""
    return max(1, min(1 + max_redundant_per_expert, topology.num_ranks))


def effective_budget(budget: int, num_experts: int, topology: Topology) -> int:
    """Clamp a redundancy budget to what the slots allow; ranks that cannot hold an expert of their own
    (more ranks than experts) always need a replica."""
    spare = topology.num_slots - num_experts
    return int(min(max(budget, topology.num_ranks - num_experts, 0), spare))


def omni_layout(counts: np.ndarray, budget: int, topology: Topology, max_copies: int,
                interleave: bool = True) -> np.ndarray:
    """``phy2log [layers, slots]`` with ``budget`` load-bearing redundant replicas in every given layer.

    Each rank takes at most ``ceil((experts + budget) / ranks)`` replicas (OmniPlacement's experts per rank plus
    budget / ranks, generalised to counts that do not divide); the slots left over are the published empty slots,
    filled so that they carry no load (``packing.fill_free_slots``).
    """
    layers, experts = counts.shape
    budget = effective_budget(budget, experts, topology)
    copies = allocate_replicas(counts, np.full(layers, budget), max_copies)
    expert = np.repeat(np.tile(np.arange(experts), (layers, 1)).ravel(), copies.ravel()).reshape(layers, -1)
    weight = np.take_along_axis(counts / copies, expert, axis=1)
    capacity = -(-(experts + budget) // topology.num_ranks)
    slots, _ = pack_distinct(expert, weight, experts, topology.num_ranks, topology.slots_per_rank, capacity)
    phy2log = fill_free_slots(slots, counts, max_copies)
    if interleave and topology.num_nodes > 1:
        phy2log = permute_ranks(phy2log, host_interleave(topology), topology)
    return phy2log
