"""One simulated engine instance: the shared engine scheduler (``omnisim.engine``) on SimPy's clock.

The scheduler decides; this adapter times each plan with the cost model (and the MoE runtime, when modelled),
schedules one SimPy event for its end, and moves KV over the source instance's link. A plan of k decode steps is one
``DecodeRun`` (k steps in closed form, one event). New work cuts such a run at its next step boundary, exactly where
a real engine would admit it.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import simpy

from omnisim.cluster import InstanceGroup
from omnisim.core import BatchSample, InstanceState, Role
from omnisim.engine import BlockManager, DecodeRun, KVLinkQueue, Scheduler, Sequence

if TYPE_CHECKING:
    from omnisim.sim.proxy_driver import ProxyDriver


class Instance:
    def __init__(self, env: simpy.Environment, instance_id: str, role: Role, group: InstanceGroup, cost,
                 num_blocks: int, kv_bytes_per_token: float, link, driver: "ProxyDriver", moe=None,
                 reserve_tokens: int = 256, kv_listener=None, max_run_steps: int = 0, engine_policy=None,
                 attention=None, layers: int = 0) -> None:
        """``num_blocks``: the KV blocks an uncompressed cache holds. ``attention``: an ``omnisim.attention.OmniAttn``
        on this (decode) instance, for a model of ``layers`` layers: the block manager then holds the full layers'
        pool, seats are capped by the compressed layers' pool, and KV transfers move compressed layers' windows
        only."""
        self.env = env
        self.id = instance_id
        self.role = role
        self.cost = cost
        self.driver = driver
        self.moe = moe
        self.egress = KVLinkQueue(link)  # KV this instance sends, one transfer after another
        self.kv_bytes_per_token = kv_bytes_per_token
        self.block_size = group.block_size
        self.engine_args = (group, reserve_tokens, max_run_steps, engine_policy, attention, layers)
        self.pools, self.bm, self.sched = self._engine(instance_id, num_blocks, kv_listener)
        self.max_seqs = self.sched.max_seqs
        # the step (or run of decode steps) in flight
        self.pending = None
        self.busy = False
        self.run = DecodeRun(0.0, 0.0, 0.0, 0)
        self.plan = None
        # statistics
        self.busy_s = 0.0
        self.timeline = None  # an omnisim.sim.timeline.Timeline when the run records one (backend.trace)
        self.trace_pid = 0
        self.n_steps = 0
        self.kv_bytes_moved = 0.0  # KV pulled into this instance
        self.recent: deque[BatchSample] = deque(maxlen=8)
        self._state: InstanceState | None = None
        self._timeout = env.timeout
        self._done_cb = self._done  # one bound method, not one per step

    def _engine(self, name: str, num_blocks: int, kv_listener) -> tuple:
        """(OmniAttn pools or None, block manager, scheduler) of one engine core with ``num_blocks`` KV blocks."""
        group, reserve_tokens, max_run_steps, engine_policy, attention, layers = self.engine_args
        pools = None if attention is None else attention.decode_pools(
            num_blocks, group.block_size, layers, where=f"cluster.{self.role.value}")
        bm = BlockManager(num_blocks if pools is None else pools.full_blocks, group.block_size, kv_listener)
        sched = Scheduler(name, bm, self, max_num_seqs=group.max_num_seqs,
                          max_num_batched_tokens=group.max_num_batched_tokens,
                          enable_prefix_caching=group.enable_prefix_caching, reserve_tokens=reserve_tokens,
                          max_run_steps=max_run_steps, policy=engine_policy, attention=pools)
        return pools, bm, sched

    # -- what the proxy sees -------------------------------------------------------------------------------------
    def state(self) -> InstanceState:
        s = self._state
        sched = self.sched
        if s is None or sched.dirty:
            sched.dirty = False
            bm, pools = self.bm, self.pools
            s = self._state = InstanceState(  # positional, in field order: this runs once per step and dispatch
                self.id, self.role, True, len(sched.running) + len(sched.prefilling),
                len(sched.waiting) + len(sched.remote) + sched.transferring + len(sched.ready),
                sched.pending_prefill, sched.ctx_sum + sched.remote_tokens,
                (bm.num_blocks - bm.free - bm.lru_blocks) / bm.num_blocks if pools is None else sched.kv_usage(),
                bm.num_blocks * self.block_size,
                self.max_seqs, tuple(self.recent))
        return s

    @property
    def transferring(self) -> int:
        return self.sched.transferring

    # -- work arriving -------------------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Prefill ``seq`` here (then decode it here too, unless this is a prefill instance)."""
        self.sched.submit(seq)
        self._wake()

    def submit_remote(self, seq: Sequence, source: "Instance") -> None:
        """Decode ``seq`` here once its KV has come over from ``source``."""
        seq.source = source
        self.sched.submit_remote(seq)

    # -- what the scheduler asks of its driver (EngineEvents) ------------------------------------------------------
    def pull_kv(self, seq: Sequence) -> None:
        now = self.env.now
        # OmniAttn: a compressed layer pulls only its sink and recent blocks of the prompt
        tokens = seq.prompt if self.pools is None else self.pools.attention_context(seq.prompt)
        self.kv_bytes_moved += tokens * self.kv_bytes_per_token
        end = seq.source.egress.send(now, tokens * self.kv_bytes_per_token)
        self.env.timeout(end - now).callbacks.append(lambda _e, s=seq: self._kv_arrived(s))

    def prefilled(self, seq: Sequence) -> None:
        self.driver.prefilled(seq, self)

    def finished(self, seq: Sequence) -> None:
        self.driver.finished(seq, self)

    def _kv_arrived(self, seq: Sequence) -> None:
        seq.t_kv_end = self.env.now
        source = seq.source
        seq.source = None
        source.release_sent(seq)
        self.sched.kv_arrived(seq)
        self._wake()
        self.driver.kv_transferred()

    def release_sent(self, seq: Sequence) -> None:
        """A prefill instance frees a request's blocks once the decode side has its KV (cached units stay)."""
        if self.sched.release_sent(seq):
            self._wake()

    # -- the engine loop -----------------------------------------------------------------------------------------
    def _wake(self) -> None:
        """New work: an idle engine starts a step now; a run of decode steps is cut at its next step boundary; a
        step planned at such a boundary and not yet started is formed again with the new work."""
        now = self.env.now
        if not self.busy:
            self._plan(now)
        elif self.run.t0 > now:
            self._plan(self.run.t0)
        elif self.run.k > 1:
            self._cut()

    def _cut(self) -> None:
        """End the current run of decode steps at its next step boundary and plan the step after it.

        No request finishes or needs KV before the run's last step, so its first m steps can be applied now and the
        next step planned to start at the boundary: one event instead of two."""
        run = self.run
        m = run.boundary_after(self.env.now)
        if m >= run.k:
            return
        self.run = run.cut(m)
        end = run.end_of(m)
        self._complete(end)
        self._plan(end)

    def _plan(self, now: float) -> None:
        """Form the batch of the step starting at ``now`` (the present, or a step boundary just ahead) and schedule
        its end; or go idle."""
        plan = self.plan = self.sched.schedule(now)
        if plan is None:
            self.busy = False
            return
        t = self._time(plan, now)
        self.busy = True
        # A cut run leaves its original timeout in the calendar; only the latest one counts.
        ev = self.pending = self._timeout(now + t - self.env.now)
        ev.callbacks.append(self._done_cb)

    def _time(self, plan, now: float) -> float:
        """Time ``plan`` starting at ``now`` with the cost model (and the MoE runtime): sets ``self.run``, returns
        its duration. (omnisim.sim.serving.ServedInstance adds what a served engine spends around its steps.)"""
        # decode attention reads attention_context (the batch's context; with OmniAttn less), affine over the run
        n, ctx0, k = plan.decode_seqs, plan.attention_context, plan.steps
        if plan.chunks:
            pt = plan.prefill_tokens
            imb, stall = self.moe.step(now, pt + n) if self.moe is not None else (1.0, 0.0)
            t = self.cost.step_time(pt, plan.prefill_attention, plan.prefill_context, n, ctx0, imb) + stall
            self.run = DecodeRun(now, t, 0.0, 1)
        else:
            cost = self.cost.step_time
            if self.moe is not None:
                imb, stall = self.moe.step(now, n, k)
            else:
                imb, stall = 1.0, 0.0
            a = cost(0, 0.0, 0, n, ctx0, imb) + stall / k
            b = (cost(0, 0.0, 0, n, ctx0 + (k - 1) * plan.attention_growth, imb) + stall / k - a) / (k - 1) \
                if k > 1 else 0.0
            self.run = DecodeRun(now, a, b, k)
            t = k * a + b * k * (k - 1) / 2
        return t

    def _done(self, event) -> None:
        if event is not self.pending:
            return
        now = self.env.now
        self._complete(now)
        self._plan(now)

    def _complete(self, now: float) -> None:
        """Apply the step or run of steps that ends at ``now``."""
        run, plan = self.run, self.plan
        k, a = run.k, run.a
        duration = k * a + run.b * k * (k - 1) / 2
        self.busy_s += duration
        self.n_steps += k
        self.sched.complete(plan, k, now, run.t0 + a)
        if plan.chunks:
            self.recent.append(BatchSample(duration, plan.prefill_tokens, plan.decode_seqs))
        else:
            self.recent.append(BatchSample(duration / k, 0, plan.decode_seqs))
        self._state = None
        if self.timeline is not None:
            self.timeline.step(self.trace_pid, run.t0, duration, plan.prefill_tokens, plan.decode_seqs, k)

    # -- end of run ----------------------------------------------------------------------------------------------
    def stats(self, duration_s: float) -> dict:
        s = self.sched
        return {"instance_id": self.id, "role": self.role.value, "busy_s": self.busy_s, "duration_s": duration_s,
                "steps": self.n_steps, "prefill_tokens": s.prefill_tokens_done,
                "decode_tokens": s.decode_tokens_done, "preemptions": s.n_preemptions,
                "peak_kv_usage": s.peak_kv_usage, "kv_blocks": self.bm.num_blocks, "max_num_seqs": self.max_seqs,
                "kv_bytes_in": self.kv_bytes_moved,
                "mean_decode_batch": s.decode_tokens_done / s.steps if s.steps else 0.0}
