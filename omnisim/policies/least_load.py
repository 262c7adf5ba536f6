"""Fewest in-flight tokens: uncached prompt tokens for prefill, resident context tokens for decode."""
from __future__ import annotations

from typing import Sequence

from omnisim.core import Assignment, ClusterView, InstanceState, Phase, Waiting


def inflight_tokens(state: InstanceState, phase: Phase) -> int:
    if phase is Phase.PREFILL:
        return state.inflight_prompt_tokens + (state.decode_tokens if state.role.value == "mixed" else 0)
    return state.decode_tokens


class LeastLoad:
    def __init__(self, seed: int = 0) -> None:
        pass

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates:
            return []
        load = {s.id: inflight_tokens(s, phase) for s in candidates}
        order = {s.id: k for k, s in enumerate(candidates)}  # ties go to the first candidate: deterministic
        out = []
        for w in queue:
            target = min(load, key=lambda i: (load[i], order[i]))
            out.append(Assignment(w.request.id, target))
            r = w.request
            load[target] += r.prompt_tokens if phase is Phase.PREFILL else r.prompt_tokens + r.output_tokens
        return out
