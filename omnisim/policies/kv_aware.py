"""Dynamo's KV router (``kv-router`` scheduling selector): exact prefix matches from the instances' KV events
combined with load as one cost, lowest first.

    cost_i = overlap_score_weight * prefill_blocks_i + decode_blocks_i
    prefill_blocks_i = (prompt tokens queued for prefill on i + this request's prompt not cached on i) / block
    decode_blocks_i  = (context tokens resident on i + this request's prompt) / block

Both terms share the block size, so costs are computed in tokens (the argmin and the max-normalised softmax are the
same). ``temperature`` 0 picks the lowest cost (ties: earlier candidate); above 0 it samples
softmax(-cost / max cost / temperature), as Dynamo's ``router_temperature`` does, from the policy's own RNG.
``overlap_score_weight`` 0 ignores the cache (pure load balance on blocks). The same cost serves the decode phase,
where "prefill" is the KV the decode instance must receive (its own cache hits, where the driver tracks them,
shorten it).
"""
from __future__ import annotations

import math
import random
from typing import Sequence

from omnisim.core import Assignment, ClusterView, Phase, Waiting


class KVAware:
    def __init__(self, overlap_score_weight: float = 1.0, temperature: float = 0.0, seed: int = 0) -> None:
        if overlap_score_weight < 0:
            raise ValueError(f"kv_aware: overlap_score_weight must be >= 0, got {overlap_score_weight}")
        if temperature < 0:
            raise ValueError(f"kv_aware: temperature must be >= 0, got {temperature}")
        self.overlap_score_weight = overlap_score_weight
        self.temperature = temperature
        self.seed = seed
        self._rng = random.Random(seed)

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates:
            return []
        ids = [s.id for s in candidates]
        prefill = [s.inflight_prompt_tokens for s in candidates]
        decode = [s.decode_tokens for s in candidates]
        w_overlap = self.overlap_score_weight
        out = []
        for w in queue:
            r = w.request
            uncached = [r.prompt_tokens - view.cached_tokens(r, i) for i in ids]
            cost = [w_overlap * (prefill[j] + uncached[j]) + decode[j] + r.prompt_tokens for j in range(len(ids))]
            k = self._pick(cost)
            out.append(Assignment(r.id, ids[k]))
            prefill[k] += uncached[k]
            decode[k] += r.prompt_tokens
        return out

    def _pick(self, cost: list[float]) -> int:
        if self.temperature == 0.0 or len(cost) == 1:
            return min(range(len(cost)), key=cost.__getitem__)
        top = max(cost)
        scale = top if top > 0 else 1.0
        lowest = min(cost) / scale
        weights = [math.exp((lowest - c / scale) / self.temperature) for c in cost]
        return self._rng.choices(range(len(cost)), weights=weights)[0]
