"""Round robin over the healthy candidates of a phase; dispatches everything at once."""
from __future__ import annotations

from typing import Sequence

from omnisim.core import Assignment, ClusterView, Phase, Waiting


class RoundRobin:
    """One cyclic pointer per phase over ``view.candidates(phase)``. ``seed`` is accepted for a uniform constructor;
    this policy draws no random numbers."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._next = {Phase.PREFILL: 0, Phase.DECODE: 0}

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates:
            return []
        i = self._next[phase]
        out = []
        for w in queue:
            out.append(Assignment(w.request.id, candidates[i % len(candidates)].id))
            i += 1
        self._next[phase] = i % len(candidates)
        return out
