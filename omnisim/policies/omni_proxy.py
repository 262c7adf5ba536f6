"""OmniInfer's OmniProxy scheduler as published (``omni_proxy/modules/omni_scheduler.c``; REFERENCE.md).

Requests wait in the proxy; each call orders a phase's queue and dispatches while an upstream is eligible.

Prefill:
- order by weight = 0.8 * (maxPrompt - prompt) / maxPrompt + 0.2 * waited / max(maxWait, 50 ms), highest first
  (shortest prompt first, with aging); maxPrompt and maxWait are over the queue; equal weights keep queue order.
- an upstream is eligible while its in-flight prompt tokens <= ``prefill_max_inflight_tokens`` and its requests
  (running + queued) <= ``prefill_max_running``; with none eligible the rest of the queue is held.
- among eligible upstreams pick the deepest cached prefix; ties -> fewer in-flight tokens -> fewer requests.
  With no match anywhere, pick the fewest in-flight tokens scanning round robin from the upstream after the last
  pick (the first strictly lower wins; an idle upstream ends the scan).
Decode:
- order by weight = (prompt + max_tokens) / max over the queue, highest first (longest processing time first).
- pick the eligible decode upstream (requests < ``decode_max_running``) with the fewest context tokens, scanning
  round robin from the one after the last pick; with none eligible the rest is held.

The published decode upstreams are DP ranks (32 running each); here an upstream is an instance (all its DP ranks), so
``decode_max_running`` = 0, the default, means "the instance's own max_num_seqs" (no limit where the view does not
say); give 32 * dp to mirror a published deployment exactly. Dispatched work is counted as the view counts
it: uncached prompt tokens for prefill (the C code adds the whole prompt), prompt tokens for decode.
(The C snapshot skips the limits in the no-match branch; REFERENCE.md and this class apply them to both.)
"""
from __future__ import annotations

import heapq
from typing import Iterator, Sequence

from omnisim.core import Assignment, ClusterView, InstanceState, Phase, Waiting
from omnisim.policies.load import requests

MIN_MAX_WAIT_S = 0.050


def prefill_weights(queue: Sequence[Waiting], now_s: float, prompt_weight: float = 0.8) -> list[float]:
    """prompt_weight * (maxPrompt - prompt) / maxPrompt + (1 - prompt_weight) * waited / max(maxWait, 50 ms)."""
    prompts = [w.request.prompt_tokens for w in queue]
    waited = [now_s - w.request.arrival_s for w in queue]
    max_prompt = max(prompts)
    pw = prompt_weight / max_prompt
    tw = (1.0 - prompt_weight) / max(MIN_MAX_WAIT_S, max(waited))
    return [pw * (max_prompt - p) + tw * t for p, t in zip(prompts, waited)]


class OmniProxy:
    def __init__(self, prefill_max_inflight_tokens: int = 32000, prefill_max_running: int = 32,
                 decode_max_running: int = 0, prompt_weight: float = 0.8, seed: int = 0) -> None:
        for name, value in (("prefill_max_inflight_tokens", prefill_max_inflight_tokens),
                            ("prefill_max_running", prefill_max_running), ("decode_max_running", decode_max_running)):
            if value < 0:
                raise ValueError(f"omni_proxy: {name} must be >= 0, got {value}")
        if not 0.0 <= prompt_weight <= 1.0:
            raise ValueError(f"omni_proxy: prompt_weight must be in [0, 1], got {prompt_weight}")
        self.prefill_max_inflight_tokens = prefill_max_inflight_tokens
        self.prefill_max_running = prefill_max_running
        self.decode_max_running = decode_max_running
        self.prompt_weight = prompt_weight
        self.seed = seed  # uniform constructor; the rule draws no random numbers
        self._last = {Phase.PREFILL: 0, Phase.DECODE: 0}  # index after the last pick, as gs->last_selected_*

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates or not queue:
            return []
        if phase is Phase.PREFILL:
            return self._prefill(queue, view, candidates)
        return self._decode(queue, candidates)

    # ---- prefill -------------------------------------------------------------------------------------------------
    def prefill_order(self, queue: Sequence[Waiting], now_s: float) -> Iterator[Waiting]:
        """The queue, highest weight first, equal weights in queue order; lazily (a heap), since a call usually
        dispatches only the head of a long queue."""
        heap = [(-wt, k) for k, wt in enumerate(prefill_weights(queue, now_s, self.prompt_weight))]
        heapq.heapify(heap)
        while heap:
            yield queue[heapq.heappop(heap)[1]]

    def _prefill(self, queue: Sequence[Waiting], view: ClusterView,
                 candidates: tuple[InstanceState, ...]) -> list[Assignment]:
        n = len(candidates)
        tokens = [s.inflight_prompt_tokens for s in candidates]
        running = [requests(s) for s in candidates]
        eligible = [k for k in range(n) if self._prefill_ok(tokens[k], running[k])]
        if not eligible:
            return []
        ids = [s.id for s in candidates]
        out = []
        for w in self.prefill_order(queue, view.now_s):
            r = w.request
            best, best_key = -1, None
            for k in eligible:
                key = (-view.cached_tokens(r, ids[k]), tokens[k], running[k])
                if best_key is None or key < best_key:
                    best, best_key = k, key
            if best_key[0] == 0:  # no prefix match on any eligible upstream: least tokens, round robin scan
                best = self._scan(eligible, tokens, n, Phase.PREFILL)
                cached = 0
            else:
                cached = -best_key[0]
            out.append(Assignment(r.id, ids[best]))
            self._last[Phase.PREFILL] = best + 1
            tokens[best] += r.prompt_tokens - cached
            running[best] += 1
            if not self._prefill_ok(tokens[best], running[best]):
                eligible.remove(best)
                if not eligible:
                    break
        return out

    def _prefill_ok(self, tokens: int, running: int) -> bool:
        return tokens <= self.prefill_max_inflight_tokens and running <= self.prefill_max_running

    # ---- decode --------------------------------------------------------------------------------------------------
    def _decode(self, queue: Sequence[Waiting], candidates: tuple[InstanceState, ...]) -> list[Assignment]:
        n = len(candidates)
        tokens = [s.decode_tokens for s in candidates]
        running = [requests(s) for s in candidates]
        limit = [self.decode_max_running or s.max_num_seqs or float("inf") for s in candidates]
        eligible = [k for k in range(n) if running[k] < limit[k]]
        if not eligible:
            return []
        order = sorted(queue, key=lambda w: -(w.request.prompt_tokens + w.request.output_tokens))
        out = []
        for w in order:
            k = self._scan(eligible, tokens, n, Phase.DECODE)
            out.append(Assignment(w.request.id, candidates[k].id))
            self._last[Phase.DECODE] = k + 1
            tokens[k] += w.request.prompt_tokens
            running[k] += 1
            if running[k] >= limit[k]:
                eligible.remove(k)
                if not eligible:
                    break
        return out

    def _scan(self, eligible: list[int], tokens: list[int], n: int, phase: Phase) -> int:
        """Fewest tokens among ``eligible``, scanning from the index after the last pick; first strictly lower wins,
        zero ends the scan (as the C loop)."""
        allowed = set(eligible)
        start = self._last[phase]
        best, least = -1, None
        for m in range(start, start + n):
            k = m % n
            if k in allowed and (least is None or tokens[k] < least):
                best, least = k, tokens[k]
                if least == 0:
                    break
        return best
