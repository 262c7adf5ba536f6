"""One simulated instance whose data-parallel ranks are separate engine cores (``cluster.<role>.dp_mode=ranks``).

vLLM runs an instance of ``--data-parallel-size`` dp as dp engine cores: each rank schedules its own batch from its
own queue within its own limits (``max_num_seqs``, ``max_num_batched_tokens``) and KV cache, and its front end gives
each request to the rank with the least ``4 * waiting + running``. The MoE layers' dispatch and combine join all
ranks, so every step waits for the slowest rank (idle ranks run dummy batches, which are never the slowest), and
the experts compute every rank's tokens. The step's time comes from ``rank_step_times`` of the cost model (the
roofline's splits rank-local from shared work; any other model gets each rank's batch as if every rank had it).

A run of decode steps stays one event: every busy rank's step time is affine in the step index, and the
synchronised step is their maximum, so a run is cut where another rank would overtake the slowest one.
"""
from __future__ import annotations

from omnisim.core import BatchSample, InstanceState
from omnisim.engine import DecodeRun, Sequence
from omnisim.engine.dp_ranks import CacheUnion, least_loaded_rank, rank_step_times
from omnisim.sim.instance import Instance


class DPInstance(Instance):
    """Instance with one scheduler per DP rank (``self.sched`` is rank 0's; ``self.ranks`` holds every rank's)."""

    def __init__(self, env, instance_id, role, group, cost, num_blocks, kv_bytes_per_token, link, driver,
                 kv_listener=None, **kwargs) -> None:
        dp = group.dp
        per_rank = num_blocks // dp
        union = CacheUnion(kv_listener, dp) if kv_listener is not None else None
        super().__init__(env, instance_id, role, group, cost, per_rank, kv_bytes_per_token, link, driver,
                         kv_listener=union.rank(0) if union else None, **kwargs)
        self.dp = dp
        self.ranks = [self.sched] + [
            self._engine(f"{instance_id}/dp{r}", per_rank, union.rank(r) if union else None)[2]
            for r in range(1, dp)]
        self.sched.name = f"{instance_id}/dp0"
        self.max_seqs = dp * self.sched.max_seqs
        self.rank_of: dict[str, object] = {}  # request id -> the rank's scheduler that holds it
        self.plans: list = []  # (scheduler, plan) of the busy ranks in the step in flight

    # -- what the proxy sees -------------------------------------------------------------------------------------
    def state(self) -> InstanceState:
        s = self._state
        ranks = self.ranks
        if s is None or any(r.dirty for r in ranks):
            running = waiting = pending = context = used = blocks = 0
            usage = 0.0
            for r in ranks:
                r.dirty = False
                running += len(r.running) + len(r.prefilling)
                waiting += len(r.waiting) + len(r.remote) + r.transferring + len(r.ready)
                pending += r.pending_prefill
                context += r.ctx_sum + r.remote_tokens
                bm = r.bm
                used += bm.num_blocks - bm.free - bm.lru_blocks
                blocks += bm.num_blocks
                if r.seat_usage:
                    usage = max(usage, r.kv_usage())
            s = self._state = InstanceState(
                self.id, self.role, True, running, waiting, pending, context, max(usage, used / blocks),
                blocks * self.block_size, self.max_seqs, tuple(self.recent))
        return s

    @property
    def transferring(self) -> int:
        return sum(r.transferring for r in self.ranks)

    # -- work arriving: vLLM's DP load balancer ------------------------------------------------------------------
    def _rank_for(self, seq: Sequence):
        """vLLM's DP load balancer (least 4 * waiting + running); remembers the rank that holds ``seq``."""
        rank = self.rank_of[seq.id] = least_loaded_rank(self.ranks)
        return rank

    def submit(self, seq: Sequence) -> None:
        self._rank_for(seq).submit(seq)
        self._wake()

    def submit_remote(self, seq: Sequence, source) -> None:
        seq.source = source
        self._rank_for(seq).submit_remote(seq)

    def _kv_arrived(self, seq: Sequence) -> None:
        seq.t_kv_end = self.env.now
        source = seq.source
        seq.source = None
        source.release_sent(seq)
        self.rank_of[seq.id].kv_arrived(seq)
        self._wake()
        self.driver.kv_transferred()

    def release_sent(self, seq: Sequence) -> None:
        if self.rank_of.pop(seq.id).release_sent(seq):
            self._wake()

    def finished(self, seq: Sequence) -> None:
        self.rank_of.pop(seq.id, None)
        super().finished(seq)

    # -- the engine loop: one synchronised step of every busy rank -----------------------------------------------
    def _plan(self, now: float) -> None:
        plans = []
        for r in self.ranks:
            plan = r.schedule(now)
            if plan is not None:
                plans.append((r, plan))
        self.plans = plans
        if not plans:
            self.plan = None
            self.busy = False
            return
        t = self._time(plans, now)
        self.busy = True
        ev = self.pending = self._timeout(now + t - self.env.now)
        ev.callbacks.append(self._done_cb)

    def _time(self, plans, now: float) -> float:
        dp, cost = self.dp, self.cost
        tokens = sum(p.prefill_tokens + p.decode_seqs for _, p in plans)
        if any(p.chunks for _, p in plans):  # a step with prefill: one step for every rank
            imb, stall = self.moe.step(now, tokens) if self.moe is not None else (1.0, 0.0)
            ranks = [(p.prefill_tokens, p.prefill_attention, p.prefill_context, p.decode_seqs, p.attention_context)
                     for _, p in plans]
            t = max(rank_step_times(cost, dp, ranks, imb)) + stall
            self.run = DecodeRun(now, t, 0.0, 1)
            return t
        k = min(p.steps for _, p in plans)
        imb, stall = self.moe.step(now, tokens, k) if self.moe is not None else (1.0, 0.0)
        first = rank_step_times(cost, dp, [(0, 0.0, 0, p.decode_seqs, p.attention_context) for _, p in plans], imb)
        lead = max(range(len(plans)), key=first.__getitem__)
        a, b = first[lead], 0.0
        if k > 1:
            # Rank r's step j takes first[r] + slope[r] * j (affine: the experts' share depends on the total tokens,
            # which no step of the run changes); the run ends before another rank would overtake the slowest one.
            last = rank_step_times(cost, dp, [(0, 0.0, 0, p.decode_seqs, p.attention_context
                                               + (k - 1) * p.attention_growth) for _, p in plans], imb)
            slope = [(y - x) / (k - 1) for x, y in zip(first, last)]
            lead = max(range(len(plans)), key=lambda r: (first[r], slope[r]))
            a, b = first[lead], slope[lead]
            for r in range(len(plans)):
                if slope[r] > b:
                    j = int((a - first[r]) / (slope[r] - b)) + 1  # the first step at which rank r is slower
                    if j < k:
                        k = j
        a += stall / k
        self.run = DecodeRun(now, a, b, k)
        return k * a + b * k * (k - 1) / 2

    def _complete(self, now: float) -> None:
        run = self.run
        k, a = run.k, run.a
        duration = k * a + run.b * k * (k - 1) / 2
        self.busy_s += duration
        self.n_steps += k
        prefill = decode = 0
        for sched, plan in self.plans:
            sched.complete(plan, k, now, run.t0 + a)
            prefill += plan.prefill_tokens
            decode += plan.decode_seqs
        self.recent.append(BatchSample(duration / k, prefill, decode))
        self._state = None
        if self.timeline is not None:
            self.timeline.step(self.trace_pid, run.t0, duration, prefill, decode, k)

    # -- end of run ----------------------------------------------------------------------------------------------
    def stats(self, duration_s: float) -> dict:
        out = super().stats(duration_s)
        ranks = self.ranks
        out.update(prefill_tokens=sum(r.prefill_tokens_done for r in ranks),
                   decode_tokens=sum(r.decode_tokens_done for r in ranks),
                   preemptions=sum(r.n_preemptions for r in ranks),
                   peak_kv_usage=max(r.peak_kv_usage for r in ranks),
                   kv_blocks=sum(r.bm.num_blocks for r in ranks))
        steps = self.n_steps
        out["mean_decode_batch"] = out["decode_tokens"] / steps if steps else 0.0
        return out
