"""TTFT-predicting dispatch: what OmniProxy claims (per-instance TTFT prediction from batch history) and does not
ship (``omni_scheduler.c``: "TODO: Check should schedule or wait based on upstream expected come back time").

Step-time model per instance, from the view only: a prior line (OmniProxy's older linear cost model,
``cost_ms = 0.0345 * tokens + 120.07``, by default) corrected from the instance's ``recent_batches`` by ridge
regression toward the prior (``step_fit``).

Prefill (and colocated) phase:
- predicted TTFT of request r on instance i = slope_i * (queued_i + uncached_i(r)) + step_i * ceil((queued_i +
  uncached_i(r)) / batch_token_budget), with queued_i the prompt tokens waiting there (plus this call's own
  dispatches) and uncached_i(r) the part of r's prompt not in i's cache: prefix hits and load in one unit, seconds.
- the proxy holds requests: an instance takes work only while less than one full batch (``batch_token_budget``, the
  engines' max_num_batched_tokens) is queued there or its predicted wait is <= ``max_queue_s``; the rest waits in
  the proxy, where later short requests can still pass it and the best instance for each can free up.
- the queue is served in OmniProxy's prefill order (shortest prompt first with aging, ``prompt_weight`` as there:
  scale-free, so it needs no tuning to the hardware's speed); each of the first ``lookahead`` requests goes to the
  instance with the lowest predicted TTFT (ties: earlier candidate) if that instance takes work now, else it stays
  in the proxy waiting for that instance (a cached prefix there can beat an idle instance elsewhere).
Decode phase (TPOT guard):
- decode step line per instance (seconds vs decoding sequences) from its pure-decode batches, prior
  ``decode_step_s + decode_s_per_seq * seqs``.
- requests first come first served; each goes to the instance with the lowest predicted step time after adding it,
  among those where that stays <= ``tpot_slo_s`` and the request's final context fits in KV capacity; an empty
  instance always qualifies, and one whose one-sequence step already misses the SLO is guarded by capacity only.
  With none qualifying the rest is held (TPOT kept, TTFT paid).
``prior_weight``: how many observed batches the prior counts as (small: trust the instance's own batches).
"""
from __future__ import annotations

import heapq
import math
from typing import Sequence

from omnisim.core import Assignment, BatchSample, ClusterView, InstanceState, Phase, Waiting
from omnisim.policies.load import requests
from omnisim.policies.omni_proxy import prefill_weights
from omnisim.policies.step_fit import StepLine, fit_step_line


class Predictive:
    def __init__(self, prefill_step_s: float = 0.12007, prefill_s_per_token: float = 0.0345e-3,
                 batch_token_budget: int = 16384, max_queue_s: float = 0.25, prompt_weight: float = 0.8,
                 lookahead: int = 64, decode_step_s: float = 0.03, decode_s_per_seq: float = 2e-5,
                 tpot_slo_s: float = 0.05, prior_weight: float = 1.0, seed: int = 0) -> None:
        for name, value in (("prefill_step_s", prefill_step_s), ("prefill_s_per_token", prefill_s_per_token),
                            ("decode_step_s", decode_step_s), ("decode_s_per_seq", decode_s_per_seq),
                            ("tpot_slo_s", tpot_slo_s), ("prior_weight", prior_weight)):
            if not value > 0:
                raise ValueError(f"predictive: {name} must be > 0, got {value}")
        if batch_token_budget < 1:
            raise ValueError(f"predictive: batch_token_budget must be >= 1, got {batch_token_budget}")
        if lookahead < 1:
            raise ValueError(f"predictive: lookahead must be >= 1, got {lookahead}")
        if max_queue_s < 0:
            raise ValueError(f"predictive: max_queue_s must be >= 0, got {max_queue_s}")
        if not 0.0 <= prompt_weight <= 1.0:
            raise ValueError(f"predictive: prompt_weight must be in [0, 1], got {prompt_weight}")
        self.prefill_prior = StepLine(prefill_step_s, prefill_s_per_token)
        self.decode_prior = StepLine(decode_step_s, decode_s_per_seq)
        self.batch_token_budget = batch_token_budget
        self.max_queue_s = max_queue_s
        self.prompt_weight = prompt_weight
        self.lookahead = lookahead
        self.tpot_slo_s = tpot_slo_s
        self.prior_weight = prior_weight
        self.seed = seed  # uniform constructor; the rule draws no random numbers
        # per phase, instance id -> (the batches fitted, the line): refitted only when the batches change
        self._fits: dict[Phase, dict[str, tuple[tuple[BatchSample, ...], StepLine]]] = {Phase.PREFILL: {},
                                                                                      Phase.DECODE: {}}

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        candidates = view.candidates(phase)
        if not candidates or not queue:
            return []
        if phase is Phase.PREFILL:
            return self._prefill(queue, view, candidates)
        return self._decode(queue, candidates)

    # ---- models --------------------------------------------------------------------------------------------------
    def step_line(self, state: InstanceState, phase: Phase) -> StepLine:
        """The instance's fitted step line: prefill seconds vs prompt tokens, or decode seconds vs sequences."""
        fits = self._fits[phase]
        hit = fits.get(state.id)
        if hit is not None and (hit[0] is state.recent_batches or hit[0] == state.recent_batches):
            return hit[1]
        if phase is Phase.PREFILL:
            points = [(b.prefill_tokens, b.duration_s) for b in state.recent_batches if b.prefill_tokens > 0]
            line = fit_step_line(points, self.prefill_prior, self.prior_weight, self.batch_token_budget)
        else:
            points = [(b.decode_seqs, b.duration_s) for b in state.recent_batches
                      if b.prefill_tokens == 0 and b.decode_seqs > 0]
            line = fit_step_line(points, self.decode_prior, self.prior_weight, max(state.max_num_seqs, 1))
        fits[state.id] = (state.recent_batches, line)
        return line

    def prefill_seconds(self, line: StepLine, tokens: int) -> float:
        """Time to prefill ``tokens`` queued tokens in budget-sized steps (0 for none)."""
        if tokens <= 0:
            return 0.0
        return line.slope_s * tokens + line.intercept_s * math.ceil(tokens / self.batch_token_budget)

    # ---- prefill -------------------------------------------------------------------------------------------------
    def _prefill(self, queue: Sequence[Waiting], view: ClusterView,
                 candidates: tuple[InstanceState, ...]) -> list[Assignment]:
        n = len(candidates)
        lines = [self.step_line(s, Phase.PREFILL) for s in candidates]
        queued = [s.inflight_prompt_tokens for s in candidates]
        open_ = [self._takes_work(lines[k], queued[k]) for k in range(n)]
        if not any(open_):
            return []
        ids = [s.id for s in candidates]
        weights = prefill_weights(queue, view.now_s, self.prompt_weight)
        head = heapq.nsmallest(self.lookahead, range(len(queue)), key=lambda j: (-weights[j], j))
        out = []
        for w in (queue[j] for j in head):
            r = w.request
            best, best_ttft, best_uncached = -1, math.inf, 0
            for k in range(n):
                uncached = r.prompt_tokens - view.cached_tokens(r, ids[k])
                ttft = self.prefill_seconds(lines[k], queued[k] + uncached)
                if ttft < best_ttft:
                    best, best_ttft, best_uncached = k, ttft, uncached
            if not open_[best]:
                continue  # its fastest instance is busy beyond the horizon: wait for it in the proxy
            out.append(Assignment(r.id, ids[best]))
            queued[best] += best_uncached
            if not self._takes_work(lines[best], queued[best]):
                open_[best] = False
                if not any(open_):
                    break
        return out

    def _takes_work(self, line: StepLine, queued: int) -> bool:
        """Less than one full batch waiting (holding more back would shrink the engine's batches), or less than
        ``max_queue_s`` of predicted work."""
        return queued < self.batch_token_budget or self.prefill_seconds(line, queued) <= self.max_queue_s

    # ---- decode --------------------------------------------------------------------------------------------------
    def _decode(self, queue: Sequence[Waiting], candidates: tuple[InstanceState, ...]) -> list[Assignment]:
        lines = [self.step_line(s, Phase.DECODE) for s in candidates]
        seqs = [requests(s) for s in candidates]
        tokens = [s.decode_tokens for s in candidates]
        capacity = [s.kv_capacity_tokens for s in candidates]
        guarded = [line.at(1) <= self.tpot_slo_s for line in lines]
        out = []
        for w in sorted(queue, key=lambda w: w.queued_s):
            r = w.request
            best, best_step = -1, math.inf
            for k in range(len(candidates)):
                step = lines[k].at(seqs[k] + 1)
                fits = capacity[k] == 0 or tokens[k] + r.total_tokens <= capacity[k]
                ok = seqs[k] == 0 or (fits and (not guarded[k] or step <= self.tpot_slo_s))
                if ok and step < best_step:
                    best, best_step = k, step
            if best < 0:
                break  # FCFS: later requests wait behind the held one
            out.append(Assignment(r.id, candidates[best].id))
            seqs[best] += 1
            tokens[best] += r.prompt_tokens
        return out
