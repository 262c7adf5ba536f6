"""Uniform random choice among the healthy candidates (SGLang router / Dynamo 'random'); dispatches at once."""
from __future__ import annotations

import random
from typing import Sequence

from omnisim.core import Assignment, ClusterView, Phase, Waiting


class RandomChoice:
    """Every request to a candidate drawn uniformly from a ``random.Random(seed)`` the policy owns."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates:
            return []
        n = len(candidates)
        return [Assignment(w.request.id, candidates[self._rng.randrange(n)].id) for w in queue]
