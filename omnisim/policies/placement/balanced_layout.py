"""The most balanced layout this package knows: per layer, the better of OmniPlacement's greedy with every spare
slot used and DeepSeek EPLB's global layout, polished by a peak-lowering swap search."""
from __future__ import annotations

import numpy as np

from omnisim.core import Topology
from omnisim.policies.placement.deepseek_eplb import rebalance_hierarchical
from omnisim.policies.placement.layout import max_over_mean, split_replicas_share_a_rank
from omnisim.policies.placement.omni_layout import omni_layout
from omnisim.policies.placement.packing import refine_peak


def balanced_layout(counts: np.ndarray, topology: Topology, max_copies: int) -> np.ndarray:
    """``phy2log [layers, slots]`` minimising, per layer, the max rank load (heuristically); an expert spread over
    several ranks never has two replicas on one rank."""
    spare = topology.num_slots - counts.shape[1]
    greedy = omni_layout(counts, spare, topology, max_copies, interleave=False)
    eplb, _, _ = rebalance_hierarchical(counts, topology.num_slots, 1, 1, topology.num_ranks)
    eplb_ok = ~split_replicas_share_a_rank(eplb, counts.shape[1], topology).any(axis=1)
    take_eplb = eplb_ok & (max_over_mean(eplb, counts, topology.num_ranks)
                           < max_over_mean(greedy, counts, topology.num_ranks))
    return refine_peak(np.where(take_eplb[:, None], eplb, greedy), counts, topology)
