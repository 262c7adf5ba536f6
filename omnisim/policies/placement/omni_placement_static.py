"""OmniPlacement's offline pattern: a static placement computed once from a recorded load."""
from __future__ import annotations

import numpy as np

from omnisim.core import ExpertLoad, Placement, Topology
from omnisim.policies.placement.layout import check_shapes, contiguous_layout, rank_loads
from omnisim.policies.placement.omni_layout import max_copies_for, omni_layout


class OmniPlacementStatic:
    """The published pattern generator, on a fixed-slot layout.

    Adds ``count_offset`` (3) to every count, ranks layers by their max rank load under the sequential (contiguous)
    layout, and gives the ``redundant_layers`` worst layers (None: all) a redundancy budget of
    ``max_redundant_per_rank`` slots per rank (capped by the spare slots); those layers are laid out by
    ``omni_layout`` (heap replicas, decreasing load per replica onto the least loaded rank lacking the expert,
    host interleave); the other layers keep the contiguous layout.
    """

    def __init__(self, redundant_layers: int | None = None, max_redundant_per_expert: int = 10,
                 max_redundant_per_rank: int = 1, count_offset: float = 3.0, host_interleave: bool = True,
                 seed: int = 0) -> None:
        if redundant_layers is not None and redundant_layers < 0:
            raise ValueError(f"omni_placement_static: redundant_layers must be >= 0, got {redundant_layers}")
        if max_redundant_per_expert < 0 or max_redundant_per_rank < 0 or count_offset < 0:
            raise ValueError("omni_placement_static: max_redundant_per_expert, max_redundant_per_rank and "
                             "count_offset must be >= 0")
        self.redundant_layers = redundant_layers
        self.max_redundant_per_expert = max_redundant_per_expert
        self.max_redundant_per_rank = max_redundant_per_rank
        self.count_offset = count_offset
        self.host_interleave = host_interleave
        self.seed = seed

    def rebalance(self, load: ExpertLoad, current: Placement, topology: Topology) -> Placement:
        check_shapes(load.counts, current.phy2log, topology)
        counts = load.counts + self.count_offset
        layers, experts = counts.shape
        sequential = contiguous_layout(layers, experts, topology)
        worst_first = np.argsort(-rank_loads(sequential, counts, topology.num_ranks).max(axis=1), kind="stable")
        chosen = worst_first[: layers if self.redundant_layers is None else self.redundant_layers]
        out = sequential.copy()
        if len(chosen):
            budget = topology.num_ranks * self.max_redundant_per_rank
            out[chosen] = omni_layout(counts[chosen], budget, topology,
                                      max_copies_for(topology, self.max_redundant_per_expert), self.host_interleave)
        return Placement(out)
