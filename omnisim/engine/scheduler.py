"""One engine instance's scheduler, as vLLM v1 shapes it, with no clock, no event loop and no I/O.

The simulator (``omnisim.sim.instance``, SimPy) and the engine emulator (``backends.emulator.engine``, asyncio) both
drive this class, so they cannot disagree on a rule. A driver calls ``schedule(now)`` for the next step's plan,
times it (``omnisim.cost``), and calls ``complete(...)`` when the step (or a run of decode steps) ends. Work arrives
by ``submit`` (prefill here) and ``submit_remote`` (PD decode: the KV comes from a prefill instance). What the driver
must act on comes back through ``EngineEvents`` at the exact point it happens.

The rules (each pinned by tests/test_engine_scheduler.py):
- A step: running decodes take one token each, ongoing chunked prefills continue, then waiting requests are
  admitted in queue order (FCFS, or the engine policy's order) while the token budget (``max_num_batched_tokens``,
  or the policy's) and seats (``max_num_seqs``) last. A prompt's KV is allocated all or nothing at admission; the
  first request that does not fit stops admission (no skipping ahead).
- Prefix caching: a request reuses the leading whole cached units of its prefix hashes, never its last prompt
  token (it produces the first logits). Computed prompt units are stored in the cache when the prefill ends.
- Decode KV is reserved ``reserve_tokens`` ahead; when a sequence fills its reservation and the cache is full, the
  newest running sequence is preempted (recompute: its KV is freed and it is queued first, to recompute prompt +
  output so far).
- PD: a prefill instance keeps a request's blocks until the decode side has its KV (``release_sent``); a decode
  instance allocates the prompt's blocks first (FCFS), then pulls the KV, and the request joins the batch at the
  next step boundary; its first token comes at the end of that step.
- A decode-only batch that does not change runs as many steps as it can in one plan: up to the next step at which
  a request finishes or needs more KV (or ``max_run_steps``).
- OmniAttn (``attention``, a decode instance's ``omnisim.attention.DecodePools``): the block manager is the full
  layers' pool, seats are capped by the compressed layers' pool, prefix caching is off (OmniInfer's hybrid KV
  manager has none), and decode attention reads ``full_frac * context + comp_frac * min(context, window)`` per
  sequence. A sequence's context reaching the window is a step event too, so each run's attention context stays
  affine in the step index.
"""
from __future__ import annotations

import heapq
from collections import deque
from typing import Protocol

from omnisim.core.engine_policy import PrefillPolicy, QueuedPrompt
from omnisim.core.prefix_index import reusable_units
from omnisim.engine.block_manager import BlockManager
from omnisim.engine.sequence import Sequence

# Heap event kinds, in the order they apply at one step: a context reaching OmniAttn's window first, so that when a
# finish or an extension (and a preemption it causes) removes a sequence, "context < window" says whether it is
# still counted among those whose compressed layers grow.
_WINDOW, _FINISH, _EXTEND = 0, 1, 2


class EngineEvents(Protocol):
    """What the scheduler tells its driver, synchronously, at the moment it happens."""

    def pull_kv(self, seq: Sequence) -> None:
        """Blocks are allocated here for a remote-prefilled ``seq``: start moving its KV (then ``kv_arrived``)."""

    def prefilled(self, seq: Sequence) -> None:
        """A disaggregated prefill is computed; its blocks stay held until ``release_sent``."""

    def finished(self, seq: Sequence) -> None:
        """``seq`` generated its last token; its KV is freed."""


class StepPlan:
    """The next step (or run of ``steps`` decode steps): prefill ``chunks`` as (sequence, tokens), plus one token
    for each of the ``decode_seqs`` running sequences, whose contexts sum to ``decode_context`` at the start.
    ``prefill_*``: the chunks' token count, attention work (sum over tokens of their context) and final contexts,
    the inputs of ``StepTimeModel.step_time``. ``attention_context``: the context decode attention reads at the
    first step (``decode_context``; with OmniAttn its per-layer average, compressed layers capped at the window),
    growing by ``attention_growth`` per step of the run (``decode_seqs``; with OmniAttn less): what the driver passes
    to ``step_time`` as ``decode_context``."""

    __slots__ = ("chunks", "steps", "decode_seqs", "decode_context", "prefill_tokens", "prefill_attention",
                 "prefill_context", "attention_context", "attention_growth")

    def __init__(self, chunks: list, steps: int, decode_seqs: int, decode_context: int, prefill_tokens: int = 0,
                 prefill_attention: float = 0.0, prefill_context: int = 0, attention_context: float | None = None,
                 attention_growth: float | None = None) -> None:
        self.chunks = chunks
        self.steps = steps
        self.decode_seqs = decode_seqs
        self.decode_context = decode_context
        self.prefill_tokens = prefill_tokens
        self.prefill_attention = prefill_attention
        self.prefill_context = prefill_context
        self.attention_context = decode_context if attention_context is None else attention_context
        self.attention_growth = decode_seqs if attention_growth is None else attention_growth


class Scheduler:
    def __init__(self, name: str, block_manager: BlockManager, events: EngineEvents, *, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_prefix_caching: bool = True, reserve_tokens: int = 256,
                 max_run_steps: int = 0, policy: PrefillPolicy | None = None, attention=None) -> None:
        self.name = name
        self.bm = block_manager
        self.events = events
        self.block_size = B = block_manager.block_size
        # OmniAttn (omnisim.attention.DecodePools): the compressed pool seats, the hybrid KV manager never caches
        self.attention = attention
        self.max_seqs = max_num_seqs if attention is None else min(max_num_seqs, attention.seats)
        self.max_tokens = max_num_batched_tokens
        self.caching = enable_prefix_caching and attention is None
        self.reserve_blocks = max(1, -(-reserve_tokens // B))
        self.max_run_steps = max_run_steps  # 0: unbounded runs of decode steps; 1: one plan per step
        self.policy = policy
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
        self.win_sum = 0  # OmniAttn: sum over the running sequences of min(context, window)
        self.below = 0  # OmniAttn: running sequences whose context is still below the window
        self.seat_usage = attention.seat_usage if attention is not None else 0.0
        self.pending_prefill = 0  # uncached prompt tokens assigned here and not yet computed
        self.remote_tokens = 0  # prompt tokens of PD requests assigned here, not yet decoding
        self.dirty = True  # something a policy sees (InstanceState) changed since the driver last looked
        self.trace: list | None = None  # set to [] to record every plan (tests compare drivers with it)
        # statistics
        self.prefill_tokens_done = 0
        self.decode_tokens_done = 0
        self.n_preemptions = 0
        self.peak_kv_usage = 0.0

    # -- what a policy sees ------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.remote) + self.transferring + len(self.ready)

    def kv_usage(self) -> float:
        bm = self.bm
        usage = (bm.num_blocks - bm.free - bm.lru_blocks) / bm.num_blocks
        if self.seat_usage:  # OmniAttn: the fuller of its two pools, as OmniInfer reports it
            seats = self.seat_usage * (len(self.running) + len(self.prefilling) + self.transferring + len(self.ready))
            if seats > usage:
                return seats
        return usage

    def generated(self, seq: Sequence) -> int:
        """Tokens ``seq`` has generated so far (a running sequence's count is derived from the step counter)."""
        if self.running.get(seq.id) is seq:
            return seq.generated + self.steps - seq.join_step
        return seq.generated

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.running or self.ready)

    # -- work arriving -----------------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Prefill ``seq`` here (then decode it here too, unless ``seq.local`` is False: a PD prefill)."""
        self.waiting.append(seq)
        # Count only what the cache does not hold now (as InstanceState promises); corrected at admission.
        seq.expected_hit = self._hit_units(seq) * seq.unit_blocks * self.block_size
        self.pending_prefill += seq.prefill_target - seq.expected_hit
        self.dirty = True

    def submit_remote(self, seq: Sequence) -> None:
        """Decode ``seq`` here once its KV has come over (``events.pull_kv``, then ``kv_arrived``)."""
        seq.local = False
        self.remote.append(seq)
        self.remote_tokens += seq.prompt
        self.dirty = True
        self.admit_remote()

    def admit_remote(self) -> None:
        """Allocate blocks for queued PD requests (FCFS) and have the driver start pulling their KV."""
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
            self.events.pull_kv(seq)
            self.dirty = True

    def kv_arrived(self, seq: Sequence) -> None:
        """``seq``'s KV is here: it joins the batch at the next step boundary."""
        self.transferring -= 1
        self.ready.append(seq)
        self.dirty = True

    def release_sent(self, seq: Sequence) -> bool:
        """The decode side has ``seq``'s KV: free its blocks here (cached units stay). True if work waits here."""
        if seq.sent_keys:
            self.bm.release(seq.sent_keys)
        self.bm.give(seq.sent_blocks)
        seq.sent_keys, seq.sent_blocks = (), 0
        self.dirty = True
        return bool(self.waiting)

    def abort(self, seq: Sequence, now: float) -> bool:
        """Drop ``seq`` wherever it is, also during a step (its part of that step is then discarded): its KV is
        freed at once and its finish time set. False if it is not here (finished, or its KV is in transit)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.pending_prefill -= seq.prefill_target - seq.computed - seq.expected_hit
            seq.expected_hit = 0
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
            self.pending_prefill -= seq.prefill_target - seq.computed
            self._free(seq)
        elif self.running.get(seq.id) is seq:
            del self.running[seq.id]
            seq.generated += self.steps - seq.join_step
            self.ctx_sum -= seq.prompt + seq.generated
            if self.attention is not None:
                self._leave_window(seq.prompt + seq.generated)
            seq.epoch += 1  # drops its pending heap events
            self._free(seq)
        elif seq in self.remote:
            self.remote.remove(seq)
            self.remote_tokens -= seq.prompt
        elif seq in self.ready:
            self.ready.remove(seq)
            self.remote_tokens -= seq.prompt
            self._free(seq)
        else:
            return False
        seq.t_finish = now
        self.dirty = True
        return True

    # -- planning a step ---------------------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan | None:
        """The step starting at ``now`` (the present, or a step boundary just ahead), or None: nothing to run."""
        if self.ready:
            for seq in self.ready:
                self._join(seq, now)
            self.ready.clear()
        if self.remote:
            self.admit_remote()
        chunks = self._schedule_prefill(now) if (self.waiting or self.prefilling) else None
        n = len(self.running)
        if chunks:
            pt = pa = pc = 0
            for seq, c in chunks:
                before = seq.computed
                pt += c
                pa += c * (before + (c + 1) / 2)
                pc += before + c
            if self.attention is None:
                plan = StepPlan(chunks, 1, n, self.ctx_sum, pt, pa, pc)
            else:
                plan = StepPlan(chunks, 1, n, self.ctx_sum, pt, pa, pc, *self._attention_now())
        elif n:
            heap = self.heap
            while heap[0][3] != heap[0][4].epoch:
                heapq.heappop(heap)
            k = heap[0][0] - self.steps
            if k < 1:
                raise AssertionError(f"{self.name}: event at step {heap[0][0]} is behind step {self.steps}")
            if self.max_run_steps and k > self.max_run_steps:
                k = self.max_run_steps
            if self.attention is None:
                plan = StepPlan((), k, n, self.ctx_sum)
            else:
                plan = StepPlan((), k, n, self.ctx_sum, 0, 0.0, 0, *self._attention_now())
        else:
            return None
        if self.trace is not None:
            self.trace.append((self.steps, plan.steps, tuple((s.id, c) for s, c in plan.chunks), tuple(self.running)))
        return plan

    def _schedule_prefill(self, now: float) -> list:
        """vLLM v1 order: running decodes take one token each, ongoing prefills continue, then waiting requests are
        admitted (all-or-nothing KV allocation for the prompt), each taking its chunk of the token budget, while
        budget and seats last: as in vLLM, a request is only admitted into a step that computes some of it."""
        budget = self.max_tokens
        if self.policy is not None:
            budget = self._apply_policy(now)
        budget -= len(self.running)
        waiting, prefilling = self.waiting, self.prefilling
        chunks = []
        for seq in prefilling:
            if budget <= 0:
                break
            c = seq.prefill_target - seq.computed
            if c > budget:
                c = budget
            chunks.append((seq, c))
            budget -= c
        seats = self.max_seqs - len(self.running) - self.transferring - len(self.ready)
        while waiting and budget > 0 and len(prefilling) < seats:
            seq = waiting[0]
            if not self._allocate(seq, now):
                break
            prefilling.append(waiting.popleft())
            c = seq.prefill_target - seq.computed
            if c > budget:
                c = budget
            chunks.append((seq, c))
            budget -= c
        return chunks

    def _apply_policy(self, now: float) -> int:
        """The engine policy orders the waiting queue and sets this step's token budget (one place: TFAS here)."""
        waiting = self.waiting
        queued = [QueuedPrompt(s.id, s.prefill_target - s.expected_hit, s.t_prefill_dispatch, s.preemptions)
                  for s in waiting]
        order, budget = self.policy.plan(queued, self.max_tokens, now)
        order = list(order)
        if sorted(order) != list(range(len(waiting))):
            raise ValueError(f"{type(self.policy).__name__}.plan returned {order[:8]}..., not a permutation of the "
                             f"{len(waiting)} waiting requests")
        if not (isinstance(budget, int) and budget >= 1):
            raise ValueError(f"{type(self.policy).__name__}.plan returned token budget {budget!r}: expected an int "
                             f">= 1")
        if order != list(range(len(waiting))):
            items = list(waiting)
            waiting.clear()
            waiting.extend(items[i] for i in order)
        return budget

    def _hit_units(self, seq: Sequence) -> int:
        """Leading prefix units of ``seq`` cached here that its prefill can reuse: as in vLLM, whole blocks, and
        never the last prompt token (it produces the first logits)."""
        if not (seq.keys and self.caching):
            return 0
        return reusable_units(self.bm.match(seq.keys), seq.prefill_target, seq.unit_blocks * self.block_size)

    def _allocate(self, seq: Sequence, now: float) -> bool:
        bm, B = self.bm, self.block_size
        keys = seq.keys
        m = self._hit_units(seq)
        blocks = -(-seq.prefill_target // B) - m * seq.unit_blocks
        if not bm.acquire(keys[:m], blocks):
            if blocks + m * seq.unit_blocks > bm.num_blocks:
                raise AssertionError(f"{self.name}: {seq.id} needs more KV than the instance has")
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
        self.dirty = True
        return True

    # -- applying a step ---------------------------------------------------------------------------------------
    def complete(self, plan: StepPlan, steps: int, now: float, first_token_s: float) -> None:
        """``steps`` steps of ``plan`` (all of them, or fewer when a decode run was cut) ended at ``now``; the first
        of them ended at ``first_token_s`` (when requests that just joined got their first token)."""
        n = len(self.running)
        if self.first_pending:
            for seq in self.first_pending:
                seq.t_first = first_token_s
            self.first_pending.clear()
        if n:
            self.steps += steps
            self.ctx_sum += n * steps
            if self.below:  # no context crossed the window inside the run: it ends at the first crossing
                self.win_sum += self.below * steps
            self.decode_tokens_done += n * steps
            self._pop_events(now)
        chunks = plan.chunks
        if chunks:
            pt = 0
            for seq, c in chunks:
                if seq.t_finish == seq.t_finish:  # aborted during the step
                    continue
                pt += c
                seq.computed += c
                if seq.computed >= seq.prefill_target:
                    self._prefilled(seq, now)
            self.pending_prefill -= pt
            self.prefill_tokens_done += pt
        bm = self.bm
        usage = (bm.num_blocks - bm.free - bm.lru_blocks) / bm.num_blocks
        if self.seat_usage:
            usage = self.kv_usage()
        if usage > self.peak_kv_usage:
            self.peak_kv_usage = usage
        self.dirty = True

    def _prefilled(self, seq: Sequence, now: float) -> None:
        self.prefilling.remove(seq)
        if seq.keys and self.caching and len(seq.held_keys) < len(seq.keys):
            m = len(seq.held_keys)
            stored = self.bm.store(seq.keys[m:], seq.unit_blocks, seq.keys[m - 1] if m else None)
            if stored:
                seq.held_keys = seq.held_keys + tuple(stored)
                seq.private_blocks -= len(stored) * seq.unit_blocks
        if seq.t_prefill_end != seq.t_prefill_end:
            seq.t_prefill_end = now
        if not seq.local:
            # Disaggregated: the prefill's own token is dropped; the blocks stay until the decode side has the KV.
            seq.sent_keys, seq.sent_blocks = seq.held_keys, seq.private_blocks
            seq.held_keys, seq.private_blocks = (), 0
            self.events.prefilled(seq)
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
        if not seq.local:
            self.remote_tokens -= seq.prompt
        seq.local = True
        seq.join_step = self.steps
        self.running[seq.id] = seq
        ctx = seq.prompt + seq.generated
        self.ctx_sum += ctx
        self._order += 1
        heapq.heappush(self.heap, (self.steps + seq.output - seq.generated, _FINISH, self._order, seq.epoch, seq))
        if self.attention is not None:  # before _reserve: a preemption there removes it again
            w = self.attention.window_tokens
            if ctx < w:
                self.win_sum += ctx
                self.below += 1
                self._order += 1
                heapq.heappush(self.heap, (self.steps + w - ctx, _WINDOW, self._order, seq.epoch, seq))
            else:
                self.win_sum += w
        # Reserve decode KV now rather than when the prompt's last block fills a few steps later: one event less
        # per request, and the same slack (reserve_tokens) as every later reservation.
        self._reserve(seq, ahead=self.reserve_blocks * self.block_size)

    def _reserve(self, seq: Sequence, ahead: int = 1) -> None:
        """Extend the sequence's KV now if fewer than ``ahead`` reserved tokens remain, else schedule the extension
        for the step at which its context fills the reservation."""
        held = (seq.private_blocks + len(seq.held_keys) * seq.unit_blocks) * self.block_size  # seq.held_blocks
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
                if self.attention is not None:
                    self._leave_window(seq.prompt + seq.output)
                self._finish(seq, now)
            elif kind == _EXTEND:
                self._extend(seq)
            else:  # its context reached the window: compressed layers read no more of it from now on
                self.below -= 1

    def _attention_now(self) -> tuple[float, float]:
        """OmniAttn: (attention context of the running batch now, its growth per decode step until the next
        window crossing)."""
        a = self.attention
        return (a.full_frac * self.ctx_sum + a.comp_frac * self.win_sum,
                a.full_frac * len(self.running) + a.comp_frac * self.below)

    def _leave_window(self, context: int) -> None:
        """OmniAttn: a running sequence of ``context`` tokens leaves the batch."""
        w = self.attention.window_tokens
        if context < w:
            self.win_sum -= context
            self.below -= 1
        else:
            self.win_sum -= w

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
        if self.attention is not None:
            self._leave_window(seq.prompt + seq.generated)
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
        self.events.finished(seq)

