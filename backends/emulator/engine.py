"""An emulated engine: omnisim's engine scheduler (the very one the simulator runs) on asyncio's clock.

Each step: ``Scheduler.schedule`` plans it (vLLM v1's rules, written once in ``omnisim.engine``), the step-time
model times it, the loop sleeps that long (scaled by ``time_scale``: 0.1 runs ten times faster than emulated time,
0 as fast as possible) and ``Scheduler.complete`` applies it; then every request's waiter is woken to stream its new
tokens. A request whose prompt KV comes from elsewhere (PD decode, ExampleConnector's shared storage) is allocated
its blocks first, then its KV crosses a ``KVLinkQueue`` (one FIFO per source engine), then it joins the batch.
A PD prefill here is an ordinary request with ``max_tokens=1`` whose blocks are freed when it ends, as vLLM does with
ExampleConnector's shared storage (the simulator's prefill instances hold them until the decode side has pulled
them, as with NIXL).
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from backends.common.tokens import Token, block_hashes
from omnisim.core import Request
from omnisim.core.kv_events import KVEvent
from omnisim.engine import BlockManager, KVLinkQueue, Scheduler
from omnisim.engine import Sequence as CoreSequence
from omnisim.engine.dp_ranks import CacheUnion, least_loaded_rank, rank_step_times


@dataclass(eq=False)
class EngineSequence:
    """One request inside the engine, as the HTTP layer sees it. ``remote_kv``: its prompt KV arrives by transfer
    (PD decode side); ``core``: the scheduler's sequence (progress, KV, timestamps)."""

    rid: str
    tokens: Sequence[Token]
    max_tokens: int
    core: CoreSequence
    engine: "EmulatedEngine"
    remote_kv: bool = False
    arrival_s: float = 0.0
    done: bool = False
    error: str | None = None
    finish_s: float | None = None
    reported: int = 0  # generated tokens already counted in the engine's stats
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    sched: Any = None  # the scheduler (DP rank) holding it, once added

    @property
    def num_prompt(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> int:
        return (self.sched or self.engine.sched).generated(self.core)

    @property
    def cached_tokens(self) -> int:
        """Local prefix-cache hits at first admission (transferred KV is not a cache hit)."""
        return self.core.cached

    @property
    def preemptions(self) -> int:
        return self.core.preemptions

    @property
    def first_token_s(self) -> float | None:
        t = self.core.t_first
        return None if t != t else t


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


class _TokenLink:
    """A KV link timed per prompt token (the emulator's ``kv_transfer_s(tokens)``), for KVLinkQueue."""

    latency_s = 0.0

    def __init__(self, transfer_s: Callable[[int], float]) -> None:
        self._transfer_s = transfer_s

    def transfer_s(self, tokens: float) -> float:
        # a prompt's token count; with OmniAttn a fraction of it (compressed layers move their window only)
        return float(self._transfer_s(tokens))


class EmulatedEngine:
    def __init__(self, step_time_model: Any, *, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 block_size: int = 16, kv_capacity_tokens: int = 1 << 20, enable_prefix_caching: bool = True,
                 time_scale: float = 1.0, moe_imbalance: float = 1.0, engine_policy=None, attention=None,
                 layers: int = 0, ranks: int = 1):
        """``attention``: an ``omnisim.attention.OmniAttn`` on this (decode) engine of a ``layers``-layer model, as
        the simulator applies it: the KV pool is the full layers' one, seats are capped by the compressed layers'
        pool, prefix caching is off, decode steps are timed at the per-layer-averaged attention context and a
        pulled prompt moves only the compressed layers' windows. ``ranks`` > 1: DP ranks as separate engine cores,
        as the simulator's ``dp_mode=ranks`` runs them (omnisim.sim.dp_instance): each its own scheduler with
        ``max_num_seqs`` and ``max_num_batched_tokens`` and an even share of the KV, requests given to the rank with
        the least 4 * waiting + running, every step as long as the slowest rank's."""
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}")
        if time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {time_scale}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_size must be >= 1")
        if kv_capacity_tokens < block_size:
            raise ValueError(f"kv capacity: need at least one KV block, got {kv_capacity_tokens} tokens")
        self.model = step_time_model
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.time_scale = time_scale
        self.moe_imbalance = moe_imbalance
        self.kv_capacity_tokens = kv_capacity_tokens
        blocks = kv_capacity_tokens // block_size // ranks  # one rank's
        if blocks < 1:
            raise ValueError(f"kv capacity: need at least one KV block per DP rank, got {kv_capacity_tokens} tokens "
                             f"for {ranks} ranks")
        self.ranks: list[Scheduler] = []
        self.rank_pools: list[BlockManager] = []
        for r in range(ranks):
            pools = None if attention is None else attention.decode_pools(blocks, block_size, layers,
                                                                          where="cluster.decode")
            pool = BlockManager(blocks if pools is None else pools.full_blocks, block_size)
            # vLLM grows a decoding request's KV block by block: reserve one block ahead, not the simulator's 256
            self.ranks.append(Scheduler("emulated" if ranks == 1 else f"emulated/dp{r}", pool, self,
                                        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                        enable_prefix_caching=enable_prefix_caching, reserve_tokens=block_size,
                                        max_run_steps=1, policy=engine_policy, attention=pools))
            self.rank_pools.append(pool)
        self.sched, self.pool = self.ranks[0], self.rank_pools[0]  # rank 0's (the only one without DP ranks)
        self.pools = pools
        if pools is not None:  # what the proxy is told: the context the full layers' pools hold
            self.kv_capacity_tokens = pools.full_blocks * block_size * ranks
        self.max_num_seqs = sum(r.max_seqs for r in self.ranks)
        self._listener = None
        self.stats = EngineStats()
        self._seqs: dict[str, EngineSequence] = {}  # core id -> request, while the engine holds it
        self._links: dict[EngineSequence, KVLinkQueue] = {}  # remote requests -> the link their KV comes over
        self._next_id = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._transfers: set[asyncio.Task] = set()
        self._t0 = 0.0
        self._deadline = 0.0

    # -- what the HTTP layer reads ------------------------------------------------------------------------------
    @property
    def kv_listener(self) -> Callable[[Sequence[KVEvent]], None] | None:
        return self._listener

    @kv_listener.setter
    def kv_listener(self, listener: Callable[[Sequence[KVEvent]], None] | None) -> None:
        """Receives every batch of KV events (BlockStored / BlockRemoved) the block managers publish (with DP ranks:
        a block is stored while any rank holds it)."""
        self._listener = listener
        if len(self.rank_pools) == 1 or listener is None:
            for pool in self.rank_pools:
                pool.listener = listener
            return
        union = CacheUnion(listener, len(self.rank_pools))
        for r, pool in enumerate(self.rank_pools):
            pool.listener = union.rank(r)

    @property
    def running(self) -> list[EngineSequence]:
        return [self._seqs[c.id] for s in self.ranks for c in (*s.prefilling, *s.running.values())]

    @property
    def waiting(self) -> list[EngineSequence]:
        return [self._seqs[c.id] for s in self.ranks for c in (*s.waiting, *s.remote, *s.ready)]

    def kv_usage(self) -> float:
        return sum(r.kv_usage() for r in self.ranks) / len(self.ranks)

    # -- clock: emulated seconds since start -------------------------------------------------------------------
    def now(self) -> float:
        elapsed = asyncio.get_running_loop().time() - self._t0
        return elapsed / self.time_scale if self.time_scale > 0 else elapsed

    async def start(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        self._deadline = self._t0
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._transfers) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._transfers.clear()
        for seq in list(self._seqs.values()):
            self._end(seq, "engine stopped", self.now())
        self._seqs.clear()

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
        bs = self.block_size
        # Ids inside the scheduler are the engine's own: clients may reuse request ids.
        core_id = f"{self._next_id}"
        self._next_id += 1
        req = Request(core_id, 0.0, len(tokens), max_tokens, block_hashes(tokens, bs), bs)
        return EngineSequence(rid, tokens, max_tokens, CoreSequence(req, bs), self, remote_kv)

    def add(self, seq: EngineSequence, link: KVLinkQueue | None = None) -> None:
        """Queue ``seq``. A ``remote_kv`` one pulls its KV over ``link`` (a FIFO shared by the requests whose KV
        comes from the same engine) once its blocks are allocated; no link: the KV is there at once."""
        seq.arrival_s = now = self.now()
        seq.core.t_prefill_dispatch = now
        self._seqs[seq.core.id] = seq
        seq.sched = sched = self.sched if len(self.ranks) == 1 else least_loaded_rank(self.ranks)  # vLLM's DP LB
        if seq.remote_kv:
            self.stats.kv_loaded += 1
            self._links[seq] = link
            sched.submit_remote(seq.core)
        else:
            sched.submit(seq.core)
        self._wake.set()

    def abort(self, seq: EngineSequence) -> None:
        """Drop a sequence (client gone): frees its blocks at once (a transfer in flight frees them on arrival)."""
        if seq.done:
            return
        (seq.sched or self.sched).abort(seq.core, self.now())
        self.stats.aborted += 1
        self._end(seq, "aborted", self.now())

    @staticmethod
    def link(transfer_s: Callable[[int], float]) -> KVLinkQueue:
        """A FIFO KV link whose transfers take ``transfer_s(prompt_tokens)`` emulated seconds."""
        return KVLinkQueue(_TokenLink(transfer_s))

    # -- what the scheduler tells its driver (omnisim.engine.EngineEvents) -------------------------------------
    def pull_kv(self, core: CoreSequence) -> None:
        seq = self._seqs[core.id]
        link = self._links.pop(seq, None)
        if link is None:
            seq.sched.kv_arrived(core)
            return
        now = self.now()
        tokens = core.prompt if self.pools is None else self.pools.attention_context(core.prompt)
        delay = link.send(now, tokens) - now
        task = asyncio.get_running_loop().create_task(self._transfer(seq, delay))
        self._transfers.add(task)
        task.add_done_callback(self._transfers.discard)

    async def _transfer(self, seq: EngineSequence, delay_s: float) -> None:
        await asyncio.sleep(delay_s * self.time_scale)
        seq.core.t_kv_end = self.now()
        seq.sched.kv_arrived(seq.core)
        if seq.done:  # aborted while its KV was in flight
            seq.sched.abort(seq.core, self.now())
        self._wake.set()

    def prefilled(self, core: CoreSequence) -> None:  # pragma: no cover - emulated engines prefill locally
        raise AssertionError("an emulated engine decodes every request it prefills (PD prefill: max_tokens=1)")

    def finished(self, core: CoreSequence) -> None:
        seq = self._seqs[core.id]
        self._count(seq)
        self.stats.finished += 1
        self._end(seq, None, core.t_finish)

    # -- the loop ----------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        idle = True
        while True:
            if idle:
                start = self.now()
            else:  # steps of a busy period follow each other at their modelled ends
                start = (self._deadline - self._t0) / self.time_scale if self.time_scale > 0 else self.now()
            plans = [(r, plan) for r in self.ranks if (plan := r.schedule(start)) is not None]
            if not plans:  # idle: never spin
                idle = True
                self._wake.clear()
                await self._wake.wait()
                continue
            if idle:  # a busy period starts now
                idle = False
                self._deadline = loop.time()
            if len(self.ranks) == 1:
                plan = plans[0][1]
                step_s = float(self.model.step_time(plan.prefill_tokens, plan.prefill_attention,
                                                    plan.prefill_context, plan.decode_seqs, plan.attention_context,
                                                    self.moe_imbalance))
            else:  # every rank waits for the slowest at the MoE layers' collectives
                step_s = float(max(rank_step_times(self.model, len(self.ranks), [
                    (p.prefill_tokens, p.prefill_attention, p.prefill_context, p.decode_seqs, p.attention_context)
                    for _, p in plans], self.moe_imbalance)))
            self.stats.steps += 1
            self.stats.busy_s += step_s
            # Steps of a busy period end at exact multiples of the model's times: a late wake-up (timer
            # granularity, a busy event loop) shortens the next sleep instead of delaying every later step.
            self._deadline += step_s * self.time_scale
            await asyncio.sleep(max(0.0, self._deadline - loop.time()))
            # Stamp the step's modelled end, not the (possibly late) wake-up time.
            end = (self._deadline - self._t0) / self.time_scale if self.time_scale > 0 else self.now()
            for sched, plan in plans:
                preempted = sched.n_preemptions
                sched.complete(plan, 1, end, end)
                self.stats.preemptions += sched.n_preemptions - preempted
                for core in sched.running.values():
                    self._count(self._seqs[core.id])

    def _count(self, seq: EngineSequence) -> None:
        """Count ``seq``'s new tokens in the stats and wake its waiter."""
        n = seq.generated
        if n > seq.reported:
            if seq.reported == 0:
                # vLLM counts a prompt (and its prefix-cache query) once its prefill is done
                self.stats.prompt_tokens += seq.num_prompt
                self.stats.prefix_queries += seq.num_prompt
                self.stats.prefix_hits += seq.cached_tokens
            self.stats.generation_tokens += n - seq.reported
            seq.reported = n
            seq.changed.set()

    def _end(self, seq: EngineSequence, error: str | None, now: float) -> None:
        self._seqs.pop(seq.core.id, None)
        self._links.pop(seq, None)
        seq.done = True
        seq.error = error
        seq.finish_s = now
        seq.changed.set()
