"""Fewest in-flight tokens (vLLM router / llm-d 'least load'): uncached prompt tokens still to prefill for the prefill
phase, resident context tokens for decode; dispatches everything at once."""
from __future__ import annotations

from typing import Sequence

from omnisim.core import Assignment, ClusterView, Phase, Waiting
from omnisim.policies.load import added_tokens, inflight_tokens


class LeastLoad:
    """Each request goes to the candidate with the fewest in-flight tokens, counting what this call already sent;
    ties go to the earlier candidate in the view. ``seed`` is accepted for a uniform constructor; this policy draws
    no random numbers."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates:
            return []
        load = [inflight_tokens(s, phase) for s in candidates]
        out = []
        for w in queue:
            k = min(range(len(load)), key=load.__getitem__)
            target = candidates[k].id
            out.append(Assignment(w.request.id, target))
            cached = view.cached_tokens(w.request, target) if phase is Phase.PREFILL else 0
            load[k] += added_tokens(w.request, phase, cached)
        return out
