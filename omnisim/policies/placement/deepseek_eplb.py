"""DeepSeek's EPLB (github.com/deepseek-ai/EPLB), re-implemented in numpy, vectorised over layers.

Hierarchical mode (used for prefill): pack expert groups onto nodes (balanced packing), replicate experts inside
each node (each extra slot to the expert with the highest load per replica), pack the node's replicas onto its GPUs
(balanced packing). Global mode (decode, large EP): the same with one group and one node. ``mode="auto"`` follows
the published entry point: hierarchical when the number of groups is divisible by the number of nodes.

Differences from the torch original, none of which changes the algorithm: loads are float64 (torch casts to
float32), and items of equal load are ordered by index (torch's descending sort is not stable), so ties may break
differently. Replicas of one expert may share a GPU, as in the original.
"""
from __future__ import annotations

import numpy as np

from omnisim.core import ExpertLoad, Placement, Topology
from omnisim.policies.placement.layout import check_shapes
from omnisim.policies.placement.packing import balanced_packing
from omnisim.policies.placement.replication import replicate_max_load_per_replica

MODES = ("auto", "hierarchical", "global")


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(phy2log [layers, num_physical], replica_rank [layers, num_physical], logcnt [layers, experts])``."""
    layers, experts = weight.shape
    if experts % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide {experts} experts")
    if num_groups % num_nodes:
        raise ValueError(f"num_groups={num_groups} is not divisible by num_nodes={num_nodes}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_ranks={num_gpus} is not divisible by num_nodes={num_nodes}")
    if num_physical % num_gpus:
        raise ValueError(f"{num_physical} physical slots are not divisible by num_ranks={num_gpus}")
    if num_physical < experts:
        raise ValueError(f"{num_physical} physical slots cannot hold {experts} experts")
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    per_node_log = experts // num_nodes

    # 1. groups -> nodes; log2mlog renumbers experts so that node n holds [n * per_node_log, (n+1) * per_node_log)
    group_load = weight.reshape(layers, num_groups, group_size).sum(axis=2)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(layers, experts)
    mlog2log = _inverse(log2mlog)

    # 2. replicate inside each node: rows are (layer, node)
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, per_node_log)
    phy2mlog, phy_rank, mlogcnt = replicate_max_load_per_replica(mlog_load, num_physical // num_nodes)

    # 3. a node's replicas -> its GPUs
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    pack, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1)
                 + np.arange(0, experts, per_node_log)[None, :, None]).reshape(layers, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    replica_rank = np.take_along_axis(phy_rank, pphy2phy, axis=1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, axis=1)
    return phy2log, replica_rank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      mode: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The published entry point: ``(phy2log, log2phy [layers, experts, max_copies] padded with -1, logcnt)``."""
    if mode not in MODES:
        raise ValueError(f"deepseek_eplb: mode must be one of {MODES}, got {mode!r}")
    weight = np.asarray(weight, dtype=np.float64)
    hierarchical = mode == "hierarchical" or (mode == "auto" and num_groups % num_nodes == 0)
    if hierarchical:
        phy2log, replica_rank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, replica_rank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    layers, experts = weight.shape
    width = int(logcnt.max())
    log2phy = np.full((layers, experts * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + replica_rank,
                      np.broadcast_to(np.arange(num_replicas), phy2log.shape), axis=1)
    return phy2log, log2phy.reshape(layers, experts, width), logcnt


class DeepSeekEplb:
    """DeepSeek EPLB as a ``PlacementPolicy``. mode: ``auto`` (published rule), ``hierarchical`` or ``global``."""

    def __init__(self, mode: str = "auto", seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"deepseek_eplb: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.seed = seed  # deterministic algorithm; the seed is accepted for a uniform constructor

    def rebalance(self, load: ExpertLoad, current: Placement, topology: Topology) -> Placement:
        check_shapes(load.counts, current.phy2log, topology)
        phy2log, _, _ = rebalance_experts(load.counts, topology.num_slots, topology.num_groups, topology.num_nodes,
                                          topology.num_ranks, self.mode)
        return Placement(phy2log)
