"""Placement rules pinned where a mutation run (mutmut over omnisim/core/placement.py and the DeepSeek EPLB and
replication modules) found them unpinned: the placement invariants every policy keeps (every logical expert served,
every slot a real expert, the slot count), DeepSeek EPLB's errors, modes and log2phy / logcnt bookkeeping on more than
two nodes, and the two replica-count rules."""
from __future__ import annotations

import numpy as np
import pytest

from omnisim.core import ExpertLoad, Placement, Topology
from omnisim.policies.placement import (DeepSeekEplb, MigrationAwarePlacement, OmniPlacement, OmniPlacementStatic,
                                        PredictivePlacement, StaticPlacement)
from omnisim.policies.placement.deepseek_eplb import rebalance_experts, rebalance_hierarchical
from omnisim.policies.placement.layout import contiguous_layout, rank_loads, step_imbalance
from omnisim.policies.placement.replication import allocate_replicas, replicate_max_load_per_replica

POLICIES = {"static": StaticPlacement, "deepseek_eplb": DeepSeekEplb, "omni_placement_static": OmniPlacementStatic,
            "omni_placement": OmniPlacement, "migration_aware": MigrationAwarePlacement,
            "predictive": PredictivePlacement}  # each with its constructor's defaults
SMALL = {  # (topology, experts): spare slots, none, more ranks than a node holds groups, one slot per rank
    "4x3-2nodes": (Topology(4, 3, num_nodes=2, num_groups=4), 8),
    "8x1-exact": (Topology(8, 1, num_nodes=2, num_groups=2), 8),
    "2x5": (Topology(2, 5), 8),
    "4x5-4nodes": (Topology(4, 5, num_nodes=4, num_groups=4), 16),
}


@pytest.mark.parametrize("case", sorted(SMALL))
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_serves_every_expert_in_every_slot_count(name, case):
    topo, experts = SMALL[case]
    rng = np.random.default_rng(7)
    counts = rng.zipf(1.6, size=(3, experts)).astype(float)
    counts[1] = 0.0  # an idle layer
    counts[2, ::3] = 0.0  # experts nobody routed to
    start = Placement(contiguous_layout(3, experts, topo))
    new = POLICIES[name](seed=1).rebalance(ExpertLoad(counts), start, topo)
    assert new.phy2log.shape == (3, topo.num_slots)
    new.validate(experts, topo)
    reps = new.replicas(experts)
    assert (reps >= 1).all() and (reps.sum(axis=1) == topo.num_slots).all()
    assert reps.max() <= max(1, topo.num_slots - experts + 1)


# ---- DeepSeek EPLB --------------------------------------------------------------------------------------------------
def test_deepseek_eplb_four_nodes_bookkeeping():
    # 16 experts in 4 groups on 4 nodes x 2 GPUs, 24 slots: log2phy, logcnt and replica ranks agree with phy2log
    weight = np.random.default_rng(0).integers(1, 100, size=(2, 16)).astype(float)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 24, 4, 4, 8)
    assert (Placement(phy2log).replicas(16) == logcnt).all()
    assert logcnt.sum(axis=1).tolist() == [24, 24]
    node_of_slot = np.arange(24) // 6
    for layer in range(2):
        for expert in range(16):
            slots = log2phy[layer, expert]
            real = slots[slots >= 0]
            assert len(real) == logcnt[layer, expert] and (phy2log[layer, real] == expert).all()
            assert (slots[len(real):] == -1).all()  # padded with -1, the published value
            assert len(set(node_of_slot[real])) == 1  # group-limited: an expert's replicas stay on its group's node
        for group in range(4):
            assert len(set(node_of_slot[phy2log[layer] // 4 == group])) == 1
    _, replica_rank, cnt = rebalance_hierarchical(weight, 24, 4, 4, 8)
    for layer in range(2):
        for expert in range(16):
            assert sorted(replica_rank[layer, phy2log[layer] == expert].tolist()) == list(range(cnt[layer, expert]))
    # each node's replicas balanced on its GPUs: never worse than the static layout
    contiguous = contiguous_layout(2, 16, Topology(8, 3, 4, 4))
    assert step_imbalance(phy2log, weight, 8) <= step_imbalance(contiguous, weight, 8)


def test_deepseek_eplb_modes():
    weight = np.array([[5.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    # 3 groups on 2 nodes: auto falls back to global (groups not divisible by nodes), hierarchical refuses
    auto, _, cnt = rebalance_experts(weight, 8, 3, 2, 2)
    glob, _, _ = rebalance_experts(weight, 8, 3, 2, 2, mode="global")
    assert np.array_equal(auto, glob) and cnt.tolist() == [[3, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="num_groups=3 is not divisible by num_nodes=2"):
        rebalance_experts(weight, 8, 3, 2, 2, mode="hierarchical")
    # global mode uses one group: an expert count that no group count divides is fine
    odd, _, cnt = rebalance_experts(np.array([[4.0, 1.0, 1.0, 1.0, 1.0]]), 6, 1, 1, 2, mode="global")
    assert cnt.tolist() == [[2, 1, 1, 1, 1]] and Placement(odd).replicas(5).tolist() == [[2, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match=r"mode must be one of .*'fast'"):
        rebalance_experts(weight, 8, 1, 1, 2, mode="fast")
    with pytest.raises(ValueError, match=r"mode must be one of .*'fast'"):
        DeepSeekEplb(mode="fast")
    assert DeepSeekEplb(seed=4).seed == 4 and DeepSeekEplb().seed == 0 and DeepSeekEplb().mode == "auto"


@pytest.mark.parametrize("args, message", [
    ((np.ones((1, 6)), 6, 4, 1, 2), "num_groups=4 does not divide 6 experts"),
    ((np.ones((1, 8)), 8, 4, 2, 3), "num_ranks=3 is not divisible by num_nodes=2"),
    ((np.ones((1, 8)), 9, 2, 1, 2), "9 physical slots are not divisible by num_ranks=2"),
    ((np.ones((1, 8)), 6, 2, 1, 2), "6 physical slots cannot hold 8 experts"),
])
def test_deepseek_eplb_errors_name_the_mismatch(args, message):
    with pytest.raises(ValueError, match=message):
        rebalance_hierarchical(*args)


def test_deepseek_eplb_without_spare_slots_places_each_expert_once():
    weight = np.array([[9.0, 1.0, 5.0, 3.0]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 4, 1, 1, 2)
    assert logcnt.tolist() == [[1, 1, 1, 1]] and sorted(phy2log[0].tolist()) == [0, 1, 2, 3]
    assert log2phy.shape == (1, 4, 1)
    # balanced packing: heaviest first into the lighter GPU (9 | 5, then 3 -> GPU 1, 1 -> GPU 0): 10 and 8
    assert sorted(rank_loads(phy2log, weight, 2)[0].tolist()) == [8.0, 10.0]


def test_deepseek_eplb_policy_checks_shapes():
    topo = Topology(2, 3)
    with pytest.raises(ValueError, match="current placement has 1 layers, load has 2"):
        DeepSeekEplb().rebalance(ExpertLoad(np.ones((2, 4))), Placement(contiguous_layout(1, 4, topo)), topo)
    with pytest.raises(ValueError, match="current placement has 6 slots, topology has 8"):
        DeepSeekEplb().rebalance(ExpertLoad(np.ones((1, 4))), Placement(contiguous_layout(1, 4, topo)),
                                 Topology(2, 4))


# ---- replica counts -------------------------------------------------------------------------------------------------
def test_replicate_max_load_per_replica_by_hand():
    # extra slots: 6/1 -> expert 0 (now 3 per copy); then 3 vs 3: the lowest expert id wins
    phy2log, replica_rank, logcnt = replicate_max_load_per_replica(np.array([[6.0, 3.0, 1.0]]), 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 0]]
    assert replica_rank.tolist() == [[0, 0, 0, 1, 2]]
    assert logcnt.tolist() == [[3, 1, 1]] and logcnt.dtype == np.int64 and phy2log.dtype == np.int64
    exact, rank, cnt = replicate_max_load_per_replica(np.array([[6.0, 3.0, 1.0]]), 3)  # as many slots as experts
    assert exact.tolist() == [[0, 1, 2]] and rank.tolist() == [[0, 0, 0]] and cnt.tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match="2 physical slots cannot hold 3 logical experts"):
        replicate_max_load_per_replica(np.ones((1, 3)), 2)


def test_allocate_replicas_budget_per_row_and_copy_cap():
    load = np.array([[6.0, 3.0, 1.0]] * 3)
    # per-row budgets 0, 1, 2; max 3 copies: 6 -> 0; then 3 (expert 0 at 2 copies) ties 3 (expert 1): lowest id
    assert allocate_replicas(load, np.array([0, 1, 2]), 3).tolist() == [[1, 1, 1], [2, 1, 1], [3, 1, 1]]
    # max 2 copies: expert 0 stops at 2, the next copy goes to expert 1
    assert allocate_replicas(load, 2, 2).tolist() == [[2, 2, 1]] * 3
    # copies cannot exceed the cap, whatever the budget: 3 experts x 2 copies = 3 extra at most
    assert allocate_replicas(load[:1], 10, 2).tolist() == [[2, 2, 2]]
    assert allocate_replicas(load[:1], 10, 1).tolist() == [[1, 1, 1]]
    assert allocate_replicas(load[:1], 0, 5).tolist() == [[1, 1, 1]]
