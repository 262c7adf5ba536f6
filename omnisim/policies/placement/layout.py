"""Array helpers shared by the placement policies: loads per rank, replica counts, the static layout, host interleave.

Everything works on whole ``[layers, slots]`` physical-to-logical arrays at once (no per-layer Python loops), so a
58 x 288 rebalance stays in milliseconds.
"""
from __future__ import annotations

import numpy as np

from omnisim.core import Topology


def replica_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """``[layers, experts]`` number of slots serving each logical expert."""
    layers = phy2log.shape[0]
    flat = (phy2log + np.arange(layers)[:, None] * num_experts).ravel()
    return np.bincount(flat, minlength=layers * num_experts).reshape(layers, num_experts)


def slot_loads(phy2log: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[layers, slots]`` tokens each slot computes: its expert's count split evenly over the expert's replicas."""
    reps = replica_counts(phy2log, counts.shape[1])
    per_replica = counts / np.maximum(reps, 1)
    return np.take_along_axis(per_replica, phy2log, axis=1)


def rank_loads(phy2log: np.ndarray, counts: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[layers, ranks]`` tokens each rank computes (slots are rank-major)."""
    per_slot = slot_loads(phy2log, counts)
    return per_slot.reshape(per_slot.shape[0], num_ranks, -1).sum(axis=2)


def ratio_of(loads: np.ndarray) -> np.ndarray:
    """Per-row max / mean (1.0 for an idle row)."""
    mean = loads.mean(axis=-1)
    return np.where(mean > 0, loads.max(axis=-1) / np.where(mean > 0, mean, 1.0), 1.0)


def max_over_mean(phy2log: np.ndarray, counts: np.ndarray, num_ranks: int) -> np.ndarray:
    """Per-layer max rank load / mean rank load."""
    return ratio_of(rank_loads(phy2log, counts, num_ranks))


def high_over_low(phy2log: np.ndarray, counts: np.ndarray, num_ranks: int) -> np.ndarray:
    """Per-layer max rank load / min rank load, the min clamped to >= 1 token (OmniPlacement's abnormal-data gate)."""
    loads = rank_loads(phy2log, counts, num_ranks)
    return loads.max(axis=1) / np.maximum(loads.min(axis=1), 1.0)


def step_imbalance(phy2log: np.ndarray, counts: np.ndarray, num_ranks: int) -> float:
    """Sum over layers of the max rank load / sum over layers of the mean rank load (how a step's MoE time scales)."""
    loads = rank_loads(phy2log, counts, num_ranks)
    mean = loads.mean(axis=1).sum()
    return float(loads.max(axis=1).sum() / mean) if mean > 0 else 1.0


def expert_ranks(phy2log: np.ndarray, num_experts: int, topology: Topology) -> np.ndarray:
    """``[layers, experts, ranks]`` how many slots of each rank serve each expert."""
    layers, slots = phy2log.shape
    rank_of_slot = np.arange(slots) // topology.slots_per_rank
    flat = ((np.arange(layers)[:, None] * num_experts + phy2log) * topology.num_ranks + rank_of_slot).ravel()
    size = layers * num_experts * topology.num_ranks
    return np.bincount(flat, minlength=size).reshape(layers, num_experts, topology.num_ranks)


def split_replicas_share_a_rank(phy2log: np.ndarray, num_experts: int, topology: Topology) -> np.ndarray:
    """``[layers, experts]`` True where an expert spread over several ranks has two replicas on one rank.

    Copies of an expert that all sit on one rank change nothing (the rank computes the expert's tokens either way);
    OmniPlacement fills the slots it leaves empty that way. Two copies on one rank plus others elsewhere skew the
    split, which placements that promise distinct ranks must avoid.
    """
    per_rank = expert_ranks(phy2log, num_experts, topology)
    spread = (per_rank > 0).sum(axis=2) > 1
    return spread & (per_rank > 1).any(axis=2)


def contiguous_layout(num_layers: int, num_experts: int, topology: Topology) -> np.ndarray:
    """The static layout: each rank serves a contiguous block of experts, no load-bearing redundancy.

    Experts are dealt out as evenly as possible (the first ``E % R`` ranks get one more). A rank's spare slots repeat
    its own first expert, which moves no load. Only when there are more ranks than experts does a rank hold nothing
    of its own; it then serves a replica (expert j for the j-th such rank), the only way to fill it.
    """
    ranks, per_rank = topology.num_ranks, topology.slots_per_rank
    if topology.num_slots < num_experts:
        raise ValueError(f"{topology.num_slots} slots cannot hold {num_experts} experts "
                         f"({ranks} ranks x {per_rank} slots)")
    own = np.full(ranks, num_experts // ranks) + (np.arange(ranks) < num_experts % ranks)
    start = np.concatenate([[0], np.cumsum(own)[:-1]])
    row = np.empty((ranks, per_rank), dtype=np.int64)
    empty_index = np.cumsum(own == 0) - 1
    for r in range(ranks):
        if own[r]:
            block = np.arange(start[r], start[r] + own[r])
            row[r] = np.concatenate([block, np.full(per_rank - own[r], block[0])])
        else:
            row[r] = empty_index[r] % num_experts
    return np.tile(row.reshape(-1), (num_layers, 1))


def host_interleave(topology: Topology) -> np.ndarray:
    """OmniPlacement's host interleave: logical rank i goes to host ``i % hosts``; returns physical rank per logical.

    Greedy packing hands the heaviest items to the lowest logical ranks; spreading consecutive logical ranks over
    hosts spreads the hot ranks over hosts' links.
    """
    hosts = topology.num_nodes
    per_host = topology.num_ranks // hosts
    logical = np.arange(topology.num_ranks)
    return (logical % hosts) * per_host + logical // hosts


def permute_ranks(phy2log: np.ndarray, rank_target: np.ndarray, topology: Topology) -> np.ndarray:
    """Move the slots of rank r to rank ``rank_target[r]`` (a permutation; may be per layer, ``[layers, ranks]``)."""
    layers = phy2log.shape[0]
    blocks = phy2log.reshape(layers, topology.num_ranks, topology.slots_per_rank)
    out = np.empty_like(blocks)
    target = np.broadcast_to(rank_target, (layers, topology.num_ranks))
    out[np.arange(layers)[:, None], target] = blocks
    return out.reshape(layers, -1)


def check_shapes(counts: np.ndarray, current: np.ndarray, topology: Topology) -> None:
    """Clear errors for a load / placement / topology that do not fit together."""
    layers, experts = counts.shape
    if current.shape[0] != layers:
        raise ValueError(f"current placement has {current.shape[0]} layers, load has {layers}")
    if current.shape[1] != topology.num_slots:
        raise ValueError(f"current placement has {current.shape[1]} slots, topology has {topology.num_slots}")
    if topology.num_slots < experts:
        raise ValueError(f"topology has {topology.num_slots} slots for {experts} experts "
                         f"({topology.num_ranks} ranks x {topology.slots_per_rank} slots)")
