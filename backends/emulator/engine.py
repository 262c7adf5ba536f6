"""An emulated continuous-batching engine: vLLM v1's scheduling shape, step times from an omnisim StepTimeModel.

Each step: schedule (running sequences first, one token for each decoding one and a chunk for each prefilling one,
then admit waiting sequences while the token budget, ``max_num_seqs`` and the KV block pool allow), sleep the
model's step time (scaled by ``time_scale``: 0.1 runs ten times faster than emulated time), then advance every
scheduled sequence. A sequence that cannot grow its KV preempts the most recently admitted one (recompute, as vLLM).
"""
from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from backends.common.tokens import Token, block_hashes
from backends.emulator.block_pool import BlockPool


@dataclass(eq=False)
class EngineSequence:
    """One request inside the engine. ``remote_kv``: its prompt KV arrives by transfer (PD decode side)."""

    rid: str
    tokens: Sequence[Token]
    max_tokens: int
    hashes: tuple[int, ...] = ()
    remote_kv: bool = False
    num_computed: int = 0
    generated: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    held: list[int] = field(default_factory=list)
    blocks: int = 0
    committed_blocks: int = 0
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None
    done: bool = False
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def num_prompt(self) -> int:
        return len(self.tokens)

    @property
    def total_len(self) -> int:
        return len(self.tokens) + self.generated

    @property
    def pending(self) -> int:
        return self.total_len - self.num_computed


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    finished: int = 0
    aborted: int = 0
    preemptions: int = 0
    kv_loaded: int = 0  # requests whose prompt KV came from elsewhere (PD transfer or shared storage)
    steps: int = 0
    busy_s: float = 0.0


class EmulatedEngine:
    def __init__(self, step_time_model: Any, *, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 block_size: int = 16, kv_capacity_tokens: int = 1 << 20, enable_prefix_caching: bool = True,
                 time_scale: float = 1.0, moe_imbalance: float = 1.0):
        if time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {time_scale}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_size must be >= 1")
        self.model = step_time_model
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.time_scale = time_scale
        self.moe_imbalance = moe_imbalance
        self.kv_capacity_tokens = kv_capacity_tokens
        self.pool = BlockPool(kv_capacity_tokens // block_size, enable_prefix_caching=enable_prefix_caching)
        self.waiting: deque[EngineSequence] = deque()
        self.running: list[EngineSequence] = []
        self.stats = EngineStats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._t0 = 0.0
        self._deadline = 0.0

    # -- clock: emulated seconds since start -------------------------------------------------------------------
    def now(self) -> float:
        elapsed = asyncio.get_running_loop().time() - self._t0
        return elapsed / self.time_scale if self.time_scale > 0 else elapsed

    async def start(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        self._deadline = self._t0
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for seq in [*self.waiting, *self.running]:
            self._finish(seq, "engine stopped")
        self.waiting.clear()
        self.running.clear()

    # -- requests ----------------------------------------------------------------------------------------------
    def make_sequence(self, rid: str, tokens: Sequence[Token], max_tokens: int, remote_kv: bool = False
                      ) -> EngineSequence:
        """A sequence for ``tokens``; ValueError if it could never fit in this engine's KV pool."""
        if not tokens:
            raise ValueError("prompt: empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
        needed = math.ceil((len(tokens) + max_tokens) / self.block_size)
        if needed > self.pool.num_blocks:
            raise ValueError(f"prompt + max_tokens = {len(tokens) + max_tokens} tokens exceed this engine's KV "
                             f"capacity of {self.pool.num_blocks * self.block_size} tokens")
        return EngineSequence(rid, tokens, max_tokens, block_hashes(tokens, self.block_size), remote_kv)

    def add(self, seq: EngineSequence) -> None:
        seq.arrival_s = self.now()
        self.waiting.append(seq)
        self._wake.set()

    def abort(self, seq: EngineSequence) -> None:
        """Drop a sequence (client gone): frees its blocks at once."""
        if seq.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self._free(seq)
        self.stats.aborted += 1
        self._finish(seq, "aborted")

    # -- the loop ----------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        idle = True
        while True:
            batch = self._schedule() if self.waiting or self.running else None
            if not batch:  # idle (or nothing fits, which make_sequence's check rules out): never spin
                idle = True
                self._wake.clear()
                await self._wake.wait()
                continue
            if idle:  # a busy period starts now
                idle = False
                self._deadline = loop.time()
            step_s = self._step_time(batch)
            self.stats.steps += 1
            self.stats.busy_s += step_s
            # Steps of a busy period end at exact multiples of the model's times: a late wake-up (timer
            # granularity, a busy event loop) shortens the next sleep instead of delaying every later step.
            self._deadline += step_s * self.time_scale
            await asyncio.sleep(max(0.0, self._deadline - loop.time()))
            self._advance(batch)

    def _schedule(self) -> list[tuple[EngineSequence, int]]:
        budget = self.max_num_batched_tokens
        batch: list[tuple[EngineSequence, int]] = []
        preempted = False
        k = 0
        while k < len(self.running) and budget > 0:
            seq = self.running[k]
            chunk = min(seq.pending, budget)
            need = math.ceil((seq.num_computed + chunk) / self.block_size) - seq.blocks
            while need > 0 and not self.pool.grow(need):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:  # it was the latest admitted: no one is left after it, and none is admitted
                    return batch
            seq.blocks += max(need, 0)
            batch.append((seq, chunk))
            budget -= chunk
            k += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            chunk = min(seq.pending, budget)
            batch.append((seq, chunk))
            budget -= chunk
        return batch

    def _admit(self, seq: EngineSequence) -> bool:
        bs = self.block_size
        hit_blocks = self.pool.cached_prefix(seq.hashes)
        hit_tokens = min(hit_blocks * bs, seq.num_prompt - 1)
        hit_blocks = hit_tokens // bs
        computed = seq.num_prompt - 1 if seq.remote_kv else hit_tokens
        new_blocks = math.ceil(max(seq.total_len, 1) / bs) - hit_blocks
        hits = seq.hashes[:hit_blocks]
        if not self.pool.can_allocate(hits, new_blocks):
            return False
        self.pool.allocate(hits, new_blocks)
        seq.held = list(hits)
        seq.committed_blocks = hit_blocks
        seq.blocks = hit_blocks + new_blocks
        seq.num_computed = computed
        if seq.preemptions == 0:
            seq.cached_tokens = hit_tokens  # local prefix-cache hits only (transferred KV is not a cache hit)
            self.stats.prefix_queries += seq.num_prompt
            self.stats.prefix_hits += hit_tokens
            self.stats.kv_loaded += seq.remote_kv
        return True

    def _step_time(self, batch: list[tuple[EngineSequence, int]]) -> float:
        prefill_tokens = decode_seqs = decode_context = prefill_context = 0
        prefill_attention = 0.0
        for seq, chunk in batch:
            if seq.generated > 0 and chunk == 1 and seq.pending == 1:
                decode_seqs += 1
                decode_context += seq.num_computed + 1
            else:
                prefill_tokens += chunk
                prefill_attention += chunk * (seq.num_computed + (chunk + 1) / 2)
                prefill_context += seq.num_computed + chunk
        return float(self.model.step_time(prefill_tokens, prefill_attention, prefill_context, decode_seqs,
                                          decode_context, self.moe_imbalance))

    def _advance(self, batch: list[tuple[EngineSequence, int]]) -> None:
        # Stamp the step's modelled end, not the (possibly late) wake-up time.
        now = (self._deadline - self._t0) / self.time_scale if self.time_scale > 0 else self.now()
        for seq, chunk in batch:
            if seq.done:  # aborted during the step (preemption happens only while scheduling, before it)
                continue
            seq.num_computed += chunk
            full = min(seq.num_computed, seq.num_prompt) // self.block_size
            if full > seq.committed_blocks:
                parent = seq.hashes[seq.committed_blocks - 1] if seq.committed_blocks else None
                seq.held += self.pool.commit(seq.hashes[seq.committed_blocks:full], parent)
                seq.committed_blocks = full
            if seq.num_computed < seq.total_len:
                continue
            if seq.generated == 0 and seq.preemptions == 0:
                self.stats.prompt_tokens += seq.num_prompt
            seq.generated += 1
            self.stats.generation_tokens += 1
            if seq.first_token_s is None:
                seq.first_token_s = now
            if seq.generated >= seq.max_tokens:
                self.running.remove(seq)
                self._free(seq)
                self.stats.finished += 1
                self._finish(seq, None, now)
            else:
                seq.changed.set()

    def _preempt(self, seq: EngineSequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.preemptions += 1
        seq.remote_kv = False  # recomputed locally from now on
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def _free(self, seq: EngineSequence) -> None:
        self.pool.release(seq.held, seq.blocks - len(seq.held))
        seq.held = []
        seq.blocks = 0
        seq.committed_blocks = 0

    def _finish(self, seq: EngineSequence, error: str | None, now: float | None = None) -> None:
        seq.done = True
        seq.error = error
        seq.finish_s = self.now() if now is None else now
        seq.changed.set()
