"""SGLang router's cache-aware policy (sgl-model-gateway ``policies/cache_aware.rs``), with the prefix match read
from the view (KV events) instead of the router's approximate tree of past prompts.

Rule, per request, with load = requests in flight on an instance (running + queued, plus what this call sent):
1. The system is imbalanced when ``max_load - min_load > balance_abs_threshold`` AND
   ``max_load > balance_rel_threshold * min_load``; then the request goes to the least loaded instance
   (shortest queue).
2. Otherwise find the instance with the longest cached prefix; if its match rate (cached / prompt tokens) exceeds
   ``cache_threshold`` the request goes there.
3. Otherwise it goes where the cache has most room: SGLang picks the smallest approximate tree; here the lowest KV
   usage (plus what this call sent, as a fraction of capacity), then the fewest requests.
Ties go to the earlier candidate. Defaults are the gateway's (0.3, 64, 1.5). The rule is the same for both phases;
for decode the match reads the decode instances' caches (zero where the driver tracks none).
"""
from __future__ import annotations

from typing import Sequence

from omnisim.core import Assignment, ClusterView, Phase, Waiting
from omnisim.policies.load import requests


class PrefixAware:
    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, seed: int = 0) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"prefix_aware: cache_threshold must be in [0, 1], got {cache_threshold}")
        if balance_abs_threshold < 0:
            raise ValueError(f"prefix_aware: balance_abs_threshold must be >= 0, got {balance_abs_threshold}")
        if balance_rel_threshold < 1.0:
            raise ValueError(f"prefix_aware: balance_rel_threshold must be >= 1, got {balance_rel_threshold}")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.seed = seed  # uniform constructor; the rule draws no random numbers

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates:
            return []
        ids = [s.id for s in candidates]
        load = [requests(s) for s in candidates]
        usage = [s.kv_usage for s in candidates]
        capacity = [s.kv_capacity_tokens for s in candidates]
        rng = range(len(candidates))
        out = []
        for w in queue:
            r = w.request
            lo, hi = min(load), max(load)
            if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
                k = load.index(lo)
            else:
                cached = [view.cached_tokens(r, i) for i in ids]
                best = max(rng, key=cached.__getitem__)
                if cached[best] / r.prompt_tokens > self.cache_threshold:
                    k = best
                else:
                    k = min(rng, key=lambda j: (usage[j], load[j]))
            out.append(Assignment(r.id, ids[k]))
            load[k] += 1
            if capacity[k] > 0:
                usage[k] += r.prompt_tokens / capacity[k]
        return out
