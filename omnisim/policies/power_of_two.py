"""Power of two choices (Mitzenmacher; SGLang router / vLLM router 'power_of_two'): sample two distinct candidates,
send the request to the less loaded one (fewer in-flight tokens, then fewer requests)."""
from __future__ import annotations

import random
from typing import Sequence

from omnisim.core import Assignment, ClusterView, Phase, Waiting
from omnisim.policies.load import added_tokens, inflight_tokens, requests


class PowerOfTwo:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates:
            return []
        load = [[inflight_tokens(s, phase), requests(s)] for s in candidates]
        out = []
        for w in queue:
            if len(candidates) == 1:
                k = 0
            else:
                a, b = self._rng.sample(range(len(candidates)), 2)
                k = a if load[a] <= load[b] else b
            target = candidates[k].id
            out.append(Assignment(w.request.id, target))
            cached = view.cached_tokens(w.request, target) if phase is Phase.PREFILL else 0
            load[k][0] += added_tokens(w.request, phase, cached)
            load[k][1] += 1
        return out
