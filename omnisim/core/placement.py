"""MoE expert placement: which logical expert each physical slot of each rank serves, per layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


def _frozen(a: np.ndarray, dtype) -> np.ndarray:
    a = np.array(a, dtype=dtype, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Topology:
    """EP layout: ``num_ranks`` ranks with ``slots_per_rank`` expert slots each, on ``num_nodes`` nodes.

    ``num_groups`` is the model's expert-group count (DeepSeek's group-limited routing), used by hierarchical
    placement. Ranks are numbered node-major: rank r lives on node r // (num_ranks // num_nodes).
    """

    num_ranks: int
    slots_per_rank: int
    num_nodes: int = 1
    num_groups: int = 1

    def __post_init__(self) -> None:
        for name in ("num_ranks", "slots_per_rank", "num_nodes", "num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"Topology.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_ranks % self.num_nodes:
            raise ValueError(f"Topology.num_ranks={self.num_ranks} is not divisible by num_nodes={self.num_nodes}")

    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.slots_per_rank


@dataclass(frozen=True, eq=False)
class ExpertLoad:
    """Tokens routed to each logical expert over a window: ``counts[layer, expert]`` (read-only float64)."""

    counts: np.ndarray

    def __post_init__(self) -> None:
        c = _frozen(self.counts, np.float64)
        if c.ndim != 2:
            raise ValueError(f"ExpertLoad.counts must be [layers, experts], got shape {c.shape}")
        if (c < 0).any() or not np.isfinite(c).all():
            raise ValueError("ExpertLoad.counts must be finite and non-negative")
        object.__setattr__(self, "counts", c)

    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]


@dataclass(frozen=True, eq=False)
class Placement:
    """``phy2log[layer, slot]``: the logical expert served by each physical slot (read-only int64).

    Slots are rank-major: slot s belongs to rank s // slots_per_rank. This is vLLM EPLB's physical_to_logical_map.
    A token routed to a logical expert is split evenly among that expert's replicas.
    """

    phy2log: np.ndarray

    def __post_init__(self) -> None:
        p = _frozen(self.phy2log, np.int64)
        if p.ndim != 2:
            raise ValueError(f"Placement.phy2log must be [layers, slots], got shape {p.shape}")
        object.__setattr__(self, "phy2log", p)

    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, topology: Topology) -> "Placement":
        """Expert e on slot e; the slots beyond num_experts replicate experts round-robin."""
        if topology.num_slots < num_experts:
            raise ValueError(
                f"{topology.num_slots} slots cannot hold {num_experts} experts "
                f"({topology.num_ranks} ranks x {topology.slots_per_rank} slots)"
            )
        row = np.arange(topology.num_slots) % num_experts
        return cls(np.tile(row, (num_layers, 1)))

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    def replicas(self, num_experts: int) -> np.ndarray:
        """``[layers, experts]`` replica count of every logical expert."""
        out = np.zeros((self.num_layers, num_experts), dtype=np.int64)
        np.add.at(out, (np.arange(self.num_layers)[:, None], self.phy2log), 1)
        return out

    def rank_loads(self, load: ExpertLoad, topology: Topology) -> np.ndarray:
        """``[layers, ranks]`` tokens each rank computes under ``load``."""
        reps = self.replicas(load.num_experts)
        if (reps == 0).any():
            layer, expert = map(int, np.argwhere(reps == 0)[0])
            raise ValueError(f"placement serves no replica of expert {expert} in layer {layer}")
        per_slot = np.take_along_axis(load.counts / reps, self.phy2log, axis=1)
        return per_slot.reshape(self.num_layers, topology.num_ranks, topology.slots_per_rank).sum(axis=2)

    def max_over_mean(self, load: ExpertLoad, topology: Topology) -> np.ndarray:
        """Per-layer imbalance: max rank load / mean rank load (1.0 = perfect; 1.0 for an idle layer)."""
        r = self.rank_loads(load, topology)
        mean = r.mean(axis=1)
        return np.where(mean > 0, r.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)

    def validate(self, num_experts: int, topology: Topology) -> None:
        """Raise ValueError unless every slot holds a real expert and every expert has a replica in every layer."""
        if self.phy2log.shape[1] != topology.num_slots:
            raise ValueError(f"placement has {self.phy2log.shape[1]} slots, topology has {topology.num_slots}")
        if (self.phy2log < 0).any() or (self.phy2log >= num_experts).any():
            raise ValueError(f"placement names experts outside [0, {num_experts})")
        if (self.replicas(num_experts) == 0).any():
            layer, expert = map(int, np.argwhere(self.replicas(num_experts) == 0)[0])
            raise ValueError(f"placement serves no replica of expert {expert} in layer {layer}")


class PlacementPolicy(Protocol):
    """Pure: the same load, placement and topology give the same new placement (vLLM EPLB's shape)."""

    def rebalance(self, load: ExpertLoad, current: Placement, topology: Topology) -> Placement: ...
