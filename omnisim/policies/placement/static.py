"""The baseline: a fixed contiguous layout that never reacts to load."""
from __future__ import annotations

from omnisim.core import ExpertLoad, Placement, Topology
from omnisim.policies.placement.layout import check_shapes, contiguous_layout


class StaticPlacement:
    """Contiguous experts per rank, no load-bearing redundancy (see ``layout.contiguous_layout``)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # nothing random; kept so every placement policy is built the same way

    def rebalance(self, load: ExpertLoad, current: Placement, topology: Topology) -> Placement:
        check_shapes(load.counts, current.phy2log, topology)
        return Placement(contiguous_layout(load.num_layers, load.num_experts, topology))
