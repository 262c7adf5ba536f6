"""One simulated engine instance: vLLM-style continuous batching with chunked prefill, a block KV cache with prefix
caching, recompute preemption, and remote-prefilled (PD) requests whose KV arrives over a link.

Speed: the engine is driven by SimPy timeout callbacks, one event per engine step at most. A run of decode-only steps
whose batch membership does not change is one event: its k steps are summed in closed form (per-step time is affine
in the batch's total context, which grows by one token per sequence per step), and a sequence's progress is derived
from the instance's step counter instead of being updated every step. New work cuts such a run at the next step
boundary, exactly where a real engine would admit it.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from typing import TYPE_CHECKING

import simpy

from omnisim.cluster import InstanceGroup
from omnisim.core import BatchSample, InstanceState, Role
from omnisim.sim.block_manager import BlockManager
from omnisim.sim.sequence import Sequence

if TYPE_CHECKING:
    from omnisim.sim.proxy_driver import ProxyDriver

_FINISH, _EXTEND = 0, 1


class Instance:
    def __init__(self, env: simpy.Environment, instance_id: str, role: Role, group: InstanceGroup, cost,
                 num_blocks: int, kv_bytes_per_token: float, link, driver: "ProxyDriver", moe=None,
                 reserve_tokens: int = 256, kv_listener=None, max_run_steps: int = 0) -> None:
        self.env = env
        self.id = instance_id
        self.role = role
        self.cost = cost
        self.driver = driver
        self.moe = moe
        self.link = link
        self.kv_bytes_per_token = kv_bytes_per_token
        self.block_size = B = group.block_size
        self.max_seqs = group.max_num_seqs
        self.max_tokens = group.max_num_batched_tokens
        self.caching = group.enable_prefix_caching
        self.reserve_blocks = max(1, -(-reserve_tokens // B))
        self.max_run_steps = max_run_steps  # 0: unbounded runs of decode steps; 1: one event per step (reference)
        self.bm = BlockManager(num_blocks, B, kv_listener)
        self.waiting: deque[Sequence] = deque()  # need (re)computation here, in arrival order
        self.remote: deque[Sequence] = deque()  # PD: KV on a prefill instance, waiting for blocks here
        self.prefilling: list[Sequence] = []
        self.running: dict[str, Sequence] = {}  # decoding, in join order (newest is preempted first)
        self.ready: list[Sequence] = []  # KV arrived, join the batch at the next step boundary
        self.first_pending: list[Sequence] = []  # their first token comes at the end of the next step
        self.transferring = 0
        self.heap: list = []  # (step, kind, order, epoch, seq) for finishes and KV reservation extensions
        self._order = 0
        self.steps = 0  # decode steps executed so far; a running sequence's progress is derived from it
        self.ctx_sum = 0  # total context tokens of the running sequences
        self.pending_prefill = 0  # uncached prompt tokens assigned here and not yet computed
        self.remote_tokens = 0  # prompt tokens of PD requests assigned here, not yet decoding
        self.link_free_s = 0.0  # egress FIFO for KV this instance sends
        # step in flight
        self.pending = None
        self.busy = False
        self.seg_t0 = self.seg_a = self.seg_b = 0.0
        self.seg_k = 0
        self.seg_chunks: list = []
        # statistics
        self.busy_s = 0.0
        self.n_steps = 0
        self.prefill_tokens_done = 0
        self.decode_tokens_done = 0
        self.n_preemptions = 0
        self.peak_kv_usage = 0.0
        self.recent: deque[BatchSample] = deque(maxlen=8)
        self._state: InstanceState | None = None
        self._timeout = env.timeout
        self._done_cb = self._done  # one bound method, not one per step

    # -- what the proxy sees -------------------------------------------------------------------------------------
    def state(self) -> InstanceState:
        s = self._state
        if s is None:
            bm = self.bm
            s = self._state = InstanceState(  # positional, in field order: this runs once per step and dispatch
                self.id, self.role, True, len(self.running) + len(self.prefilling),
                len(self.waiting) + len(self.remote) + self.transferring + len(self.ready),
                self.pending_prefill, self.ctx_sum + self.remote_tokens,
                (bm.num_blocks - bm.free - bm.lru_blocks) / bm.num_blocks, bm.num_blocks * self.block_size,
                self.max_seqs, tuple(self.recent))
        return s

    # -- work arriving -------------------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Prefill ``seq`` here (then decode it here too, unless this is a prefill instance)."""
        self.waiting.append(seq)
        # Count only what the cache does not hold now (as InstanceState promises); corrected at admission.
        seq.expected_hit = self._hit_units(seq) * seq.unit_blocks * self.block_size
        self.pending_prefill += seq.prefill_target - seq.expected_hit
        self._state = None
        self._wake()

    def submit_remote(self, seq: Sequence, source: "Instance") -> None:
        """Decode ``seq`` here once its KV has come over from ``source``."""
        seq.source = source
        self.remote.append(seq)
        self.remote_tokens += seq.prompt
        self._state = None
        self._admit_remote()

    def _admit_remote(self) -> None:
        """Allocate blocks for queued PD requests (FCFS) and start pulling their KV."""
        remote, bm = self.remote, self.bm
        while remote and len(self.running) + self.transferring + len(self.ready) < self.max_seqs:
            seq = remote[0]
            blocks = min(-(-seq.prompt // self.block_size) + self.reserve_blocks,
                         -(-(seq.prompt + seq.output) // self.block_size))
            if not bm.take(blocks):
                break
            remote.popleft()
            seq.private_blocks = blocks
            seq.held_keys = ()
            self.transferring += 1
            src = seq.source
            now = self.env.now
            start = now if src.link_free_s < now else src.link_free_s
            nbytes = seq.prompt * self.kv_bytes_per_token
            duration = src.link.transfer_s(nbytes)
            src.link_free_s = start + duration - src.link.latency_s
            self.env.timeout(start + duration - now).callbacks.append(lambda _e, s=seq: self._kv_arrived(s))
            self._state = None

    def _kv_arrived(self, seq: Sequence) -> None:
        seq.t_kv_end = self.env.now
        self.transferring -= 1
        seq.source.release_sent(seq)
        seq.source = None
        self.ready.append(seq)
        self._state = None
        self._wake()
        self.driver.kv_transferred()

    def release_sent(self, seq: Sequence) -> None:
        """A prefill instance frees a request's blocks once the decode side has its KV (cached units stay)."""
        if seq.sent_keys:
            self.bm.release(seq.sent_keys)
        self.bm.give(seq.sent_blocks)
        seq.sent_keys, seq.sent_blocks = (), 0
        self._state = None
        if self.waiting:
            self._wake()

    # -- the engine loop -----------------------------------------------------------------------------------------
    def _wake(self) -> None:
        """New work: an idle engine starts a step now; a run of decode steps is cut at its next step boundary; a
        step planned at such a boundary and not yet started is formed again with the new work."""
        now = self.env.now
        if not self.busy:
            self._plan(now)
        elif self.seg_t0 > now:
            self._plan(self.seg_t0)
        elif self.seg_k > 1:
            self._cut()

    def _cut(self) -> None:
        """End the current run of decode steps at its next step boundary and plan the step after it.

        No request finishes or needs KV before the run's last step, so its first m steps can be applied now and the
        next step planned to start at the boundary: one event instead of two."""
        a, b, k = self.seg_a, self.seg_b, self.seg_k
        e = self.env.now - self.seg_t0
        if b > 1e-15:
            m = math.ceil((-(a - b / 2) + math.sqrt((a - b / 2) ** 2 + 2 * b * e)) / b)
        else:
            m = math.ceil(e / a)
        m = max(m, 1)
        while m > 1 and (m - 1) * a + b * (m - 1) * (m - 2) / 2 >= e:
            m -= 1
        while m * a + b * m * (m - 1) / 2 < e:
            m += 1
        if m >= k:
            return
        self.seg_k = m
        end = self.seg_t0 + m * a + b * m * (m - 1) / 2
        self._complete(end)
        self._plan(end)

    def _plan(self, now: float) -> None:
        """Form the batch of the step starting at ``now`` (the present, or a step boundary just ahead) and schedule
        its end; or go idle."""
        if self.ready:
            for seq in self.ready:
                self._join(seq, now)
            self.ready.clear()
        if self.remote:
            self._admit_remote()
        chunks = self._schedule_prefill(now) if (self.waiting or self.prefilling) else None
        n = len(self.running)
        if chunks:
            pt = pa = pc = 0
            for seq, c in chunks:
                before = seq.computed
                pt += c
                pa += c * (before + (c + 1) / 2)
                pc += before + c
            imb, stall = self.moe.step(now, pt + n) if self.moe is not None else (1.0, 0.0)
            t = self.cost.step_time(pt, pa, pc, n, self.ctx_sum, imb) + stall
            self.seg_k, self.seg_a, self.seg_b = 1, t, 0.0
            self.seg_chunks = chunks
        elif n:
            heap = self.heap
            while heap[0][3] != heap[0][4].epoch:
                heapq.heappop(heap)
            k = heap[0][0] - self.steps
            if k < 1:
                raise AssertionError(f"{self.id}: event at step {heap[0][0]} is behind step {self.steps}")
            if self.max_run_steps and k > self.max_run_steps:
                k = self.max_run_steps
            ctx0 = self.ctx_sum
            cost = self.cost.step_time
            if self.moe is not None:
                imb, stall = self.moe.step(now, n, k)
            else:
                imb, stall = 1.0, 0.0
            a = cost(0, 0.0, 0, n, ctx0, imb) + stall / k
            b = (cost(0, 0.0, 0, n, ctx0 + (k - 1) * n, imb) + stall / k - a) / (k - 1) if k > 1 else 0.0
            self.seg_k, self.seg_a, self.seg_b = k, a, b
            self.seg_chunks = ()
            t = k * a + b * k * (k - 1) / 2
        else:
            self.busy = False
            return
        self.busy = True
        self.seg_t0 = now
        self._schedule_done(now + t - self.env.now)

    def _schedule_done(self, delay: float) -> None:
        # A cut run leaves its original timeout in the calendar; only the latest one counts.
        ev = self.pending = self._timeout(delay)
        ev.callbacks.append(self._done_cb)

    def _schedule_prefill(self, now: float) -> list:
        """vLLM v1 order: running decodes take one token each, ongoing prefills continue, then waiting requests are
        admitted (FCFS, all-or-nothing KV allocation for the prompt) while token budget and seats last."""
        budget = self.max_tokens - len(self.running)
        waiting, prefilling = self.waiting, self.prefilling
        seats = self.max_seqs - len(self.running) - self.transferring - len(self.ready)
        while waiting and budget > 0 and len(prefilling) < seats:
            if not self._allocate(waiting[0], now):
                break
            prefilling.append(waiting.popleft())
        chunks = []
        for seq in prefilling:
            if budget <= 0:
                break
            c = seq.prefill_target - seq.computed
            if c > budget:
                c = budget
            chunks.append((seq, c))
            budget -= c
        return chunks

    def _hit_units(self, seq: Sequence) -> int:
        """Leading prefix units of ``seq`` cached here that its prefill can reuse: as in vLLM, whole blocks, and
        never the last prompt token (it produces the first logits)."""
        if not (seq.keys and self.caching):
            return 0
        return min(self.bm.match(seq.keys), (seq.prefill_target - 1) // (seq.unit_blocks * self.block_size))

    def _allocate(self, seq: Sequence, now: float) -> bool:
        bm, B = self.bm, self.block_size
        keys = seq.keys
        m = self._hit_units(seq)
        blocks = -(-seq.prefill_target // B) - m * seq.unit_blocks
        if not bm.acquire(keys[:m], blocks):
            if blocks + m * seq.unit_blocks > bm.num_blocks:
                raise AssertionError(f"{self.id}: {seq.id} needs more KV than the instance has")
            return False
        seq.held_keys = keys[:m]
        seq.private_blocks = blocks
        hit = m * seq.unit_blocks * B
        seq.computed = hit
        self.pending_prefill -= hit - seq.expected_hit
        seq.expected_hit = 0
        if seq.t_prefill_start != seq.t_prefill_start:  # first admission (NaN check)
            seq.t_prefill_start = now
            seq.cached = hit
        self._state = None
        return True

    def _done(self, event) -> None:
        if event is not self.pending:
            return
        now = self.env.now
        self._complete(now)
        self._plan(now)

    def _complete(self, now: float) -> None:
        """Apply the step or run of steps that ends at ``now``."""
        k, a, b = self.seg_k, self.seg_a, self.seg_b
        n = len(self.running)
        duration = k * a + b * k * (k - 1) / 2
        self.busy_s += duration
        self.n_steps += k
        if self.first_pending:
            t_first = self.seg_t0 + a
            for seq in self.first_pending:
                seq.t_first = t_first
            self.first_pending.clear()
        if n:
            self.steps += k
            self.ctx_sum += n * k
            self.decode_tokens_done += n * k
            self._pop_events(now)
        chunks = self.seg_chunks
        if chunks:
            self.seg_chunks = ()
            pt = 0
            for seq, c in chunks:
                pt += c
                seq.computed += c
                if seq.computed >= seq.prefill_target:
                    self._prefilled(seq, now)
            self.pending_prefill -= pt
            self.prefill_tokens_done += pt
            self.recent.append(BatchSample(duration, pt, n))
        else:
            self.recent.append(BatchSample(duration / k, 0, n))
        bm = self.bm
        usage = (bm.num_blocks - bm.free - bm.lru_blocks) / bm.num_blocks
        if usage > self.peak_kv_usage:
            self.peak_kv_usage = usage
        self._state = None

    def _prefilled(self, seq: Sequence, now: float) -> None:
        self.prefilling.remove(seq)
        if seq.keys and self.caching and len(seq.held_keys) < len(seq.keys):
            stored = self.bm.store(seq.keys[len(seq.held_keys):], seq.unit_blocks)
            if stored:
                seq.held_keys = seq.held_keys + tuple(stored)
                seq.private_blocks -= len(stored) * seq.unit_blocks
        if seq.t_prefill_end != seq.t_prefill_end:
            seq.t_prefill_end = now
        if not seq.local:
            # Disaggregated: the prefill's own token is dropped; the blocks stay until the decode side has the KV.
            seq.sent_keys, seq.sent_blocks = seq.held_keys, seq.private_blocks
            seq.held_keys, seq.private_blocks = (), 0
            self.driver.prefilled(seq, self)
            return
        seq.generated += 1  # the last prefill step samples a token
        if seq.t_first != seq.t_first:
            seq.t_first = now
        if seq.generated >= seq.output:
            self._finish(seq, now)
        else:
            self._join(seq, now, first_pending=False)

    def _join(self, seq: Sequence, now: float, first_pending: bool = True) -> None:
        """Start decoding ``seq`` at the current step boundary."""
        if first_pending and seq.t_first != seq.t_first:
            self.first_pending.append(seq)
        if seq.source is None and not seq.local:
            self.remote_tokens -= seq.prompt
        seq.local = True
        seq.join_step = self.steps
        self.running[seq.id] = seq
        self.ctx_sum += seq.prompt + seq.generated
        self._order += 1
        heapq.heappush(self.heap, (self.steps + seq.output - seq.generated, _FINISH, self._order, seq.epoch, seq))
        # Reserve decode KV now rather than when the prompt's last block fills a few steps later: one event less
        # per request, and the same slack (reserve_tokens) as every later reservation.
        self._reserve(seq, ahead=self.reserve_blocks * self.block_size)

    def _reserve(self, seq: Sequence, ahead: int = 1) -> None:
        """Extend the sequence's KV now if fewer than ``ahead`` reserved tokens remain, else schedule the extension
        for the step at which its context fills the reservation."""
        held = seq.held_blocks * self.block_size
        if held >= seq.prompt + seq.output:
            return
        room = held - (seq.prompt + seq.generated + self.steps - seq.join_step)
        if room < ahead:
            self._extend(seq)
            return
        self._order += 1
        heapq.heappush(self.heap, (self.steps + room, _EXTEND, self._order, seq.epoch, seq))

    def _pop_events(self, now: float) -> None:
        heap, steps = self.heap, self.steps
        while heap and heap[0][0] <= steps:
            _, kind, _, epoch, seq = heapq.heappop(heap)
            if epoch != seq.epoch or seq.id not in self.running:
                continue
            if kind == _FINISH:
                del self.running[seq.id]
                seq.epoch += 1  # drops its pending reservation event
                seq.generated = seq.output
                self.ctx_sum -= seq.prompt + seq.output
                self._finish(seq, now)
            else:
                self._extend(seq)

    def _extend(self, seq: Sequence) -> None:
        """The sequence filled its KV reservation: reserve more, preempting the newest sequences if KV is short."""
        final_blocks = -(-(seq.prompt + seq.output) // self.block_size)
        need = min(self.reserve_blocks, final_blocks - seq.held_blocks)
        while not self.bm.take(need):
            victim = next(reversed(self.running.values()))
            self._preempt(victim)
            if victim is seq:
                return
        seq.private_blocks += need
        self._reserve(seq)

    def _preempt(self, seq: Sequence) -> None:
        """vLLM's recompute preemption: free the KV, queue the request first, recompute prompt + output so far."""
        del self.running[seq.id]
        seq.generated += self.steps - seq.join_step
        self.ctx_sum -= seq.prompt + seq.generated
        self._free(seq)
        seq.epoch += 1
        seq.preemptions += 1
        seq.prefill_target = seq.prompt + seq.generated
        seq.computed = 0
        self.n_preemptions += 1
        self.pending_prefill += seq.prefill_target
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        if seq.held_keys:
            self.bm.release(seq.held_keys)
            seq.held_keys = ()
        self.bm.give(seq.private_blocks)
        seq.private_blocks = 0

    def _finish(self, seq: Sequence, now: float) -> None:
        seq.t_finish = now
        self._free(seq)
        self.driver.finished(seq, self)

    # -- end of run ----------------------------------------------------------------------------------------------
    def stats(self, duration_s: float) -> dict:
        return {"instance_id": self.id, "role": self.role.value, "busy_s": self.busy_s, "duration_s": duration_s,
                "steps": self.n_steps, "prefill_tokens": self.prefill_tokens_done,
                "decode_tokens": self.decode_tokens_done, "preemptions": self.n_preemptions,
                "peak_kv_usage": self.peak_kv_usage, "kv_blocks": self.bm.num_blocks}
