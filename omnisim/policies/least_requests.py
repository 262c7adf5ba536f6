"""Fewest requests in flight (running + queued in the engine): SGLang router's 'shortest queue'."""
from __future__ import annotations

from typing import Sequence

from omnisim.core import Assignment, ClusterView, Phase, Waiting
from omnisim.policies.load import requests


class LeastRequests:
    """Each request goes to the candidate holding the fewest requests, counting what this call already sent; ties go
    to the earlier candidate. ``seed`` is accepted for a uniform constructor; this policy draws no random numbers."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates:
            return []
        load = [requests(s) for s in candidates]
        out = []
        for w in queue:
            k = min(range(len(load)), key=load.__getitem__)
            out.append(Assignment(w.request.id, candidates[k].id))
            load[k] += 1
        return out
