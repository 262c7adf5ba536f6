"""The simulator's proxy: holds arrived requests in two queues and asks the proxy policy where they go.

It calls ``policy.schedule`` exactly as the real HTTP proxy does: on every arrival, every completion (prefill done,
KV transferred, request finished) and on a timer while a queue is non-empty.
"""
from __future__ import annotations

from typing import Callable

import simpy

from omnisim.core import (
    ClusterView, Phase, PolicyError, PrefixIndex, ProxyPolicy, Request, Role, Waiting, validate_assignments,
)
from omnisim.sim.instance import Instance
from omnisim.engine.sequence import Sequence

__all__ = ["PolicyError", "ProxyDriver"]  # PolicyError lives in omnisim.core; importable from here as before


class ProxyDriver:
    def __init__(self, env: simpy.Environment, policy: ProxyPolicy, prefix: PrefixIndex, block_size: int,
                 max_model_len: int, timer_s: float, on_record: Callable[[tuple], None]) -> None:
        self.env = env
        self.policy = policy
        self.prefix = prefix
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.timer_s = timer_s
        self.on_record = on_record
        self.instances: dict[str, Instance] = {}
        self._order: list[Instance] = []
        self.queues = {Phase.PREFILL: [], Phase.DECODE: []}
        self.seqs: dict[str, Sequence] = {}
        self._timer_armed = False
        self._idle_ticks = 0
        self.max_queue = 0

    def add(self, instance: Instance) -> None:
        self.instances[instance.id] = instance
        self._order.append(instance)

    def view(self) -> ClusterView:
        return ClusterView(self.env.now, tuple(i.state() for i in self._order), self.prefix)

    # -- events from arrivals and instances ----------------------------------------------------------------------
    def arrive(self, req: Request) -> None:
        seq = Sequence(req, self.block_size)
        if req.prompt_tokens + req.output_tokens > self.max_model_len:
            # vLLM answers 400 for this; the request is counted, not served.
            self.on_record(seq.row("error", f"prompt {req.prompt_tokens} + output {req.output_tokens} tokens exceed "
                                            f"max_model_len {self.max_model_len}"))
            return
        self.seqs[seq.id] = seq
        self.queues[Phase.PREFILL].append(Waiting(req, self.env.now))
        self._dispatch(Phase.PREFILL)

    def prefilled(self, seq: Sequence, source: Instance) -> None:
        self.queues[Phase.DECODE].append(Waiting(seq.req, self.env.now, source.id))
        self._dispatch(Phase.DECODE)
        if self.queues[Phase.PREFILL]:
            self._dispatch(Phase.PREFILL)

    def kv_transferred(self) -> None:
        self._dispatch_all()

    def finished(self, seq: Sequence, instance: Instance) -> None:
        del self.seqs[seq.id]
        self.on_record(seq.row())
        self._dispatch_all()

    # -- asking the policy ---------------------------------------------------------------------------------------
    def _dispatch_all(self) -> None:
        if self.queues[Phase.DECODE]:
            self._dispatch(Phase.DECODE)
        if self.queues[Phase.PREFILL]:
            self._dispatch(Phase.PREFILL)

    def _dispatch(self, phase: Phase) -> None:
        queue = self.queues[phase]
        view = self.view()
        out = self.policy.schedule(phase, queue, view)
        chosen = validate_assignments(type(self.policy).__name__, phase, queue, out, view.instances)
        if chosen:
            keep = []
            now = self.env.now
            for w in queue:
                instance_id = chosen.pop(w.request.id, None)
                if instance_id is None:
                    keep.append(w)
                    continue
                inst = self.instances[instance_id]
                seq = self.seqs[w.request.id]
                if phase is Phase.PREFILL:
                    seq.t_prefill_dispatch = now
                    seq.prefill_instance = inst.id
                    seq.local = inst.role is not Role.PREFILL
                    if seq.local:
                        seq.decode_instance = inst.id
                    inst.submit(seq)
                else:
                    seq.t_decode_dispatch = now
                    seq.decode_instance = inst.id
                    inst.submit_remote(seq, self.instances[w.source_id])
            queue[:] = keep
        if len(queue) > self.max_queue:
            self.max_queue = len(queue)
        if queue and self.timer_s > 0 and not self._timer_armed:
            self._timer_armed = True
            self.env.timeout(self.timer_s).callbacks.append(self._tick)

    def _tick(self, _event) -> None:
        self._timer_armed = False
        held = len(self.queues[Phase.PREFILL]) + len(self.queues[Phase.DECODE])
        self._dispatch_all()
        idle = all(not i.busy and not i.transferring for i in self._order)
        if idle and held == len(self.queues[Phase.PREFILL]) + len(self.queues[Phase.DECODE]):
            self._idle_ticks += 1
            if self._idle_ticks * self.timer_s > 60.0:
                raise PolicyError(f"{type(self.policy).__name__} holds {held} requests while the whole cluster has "
                                  f"been idle for 60 simulated seconds")
        else:
            self._idle_ticks = 0

    def unfinished(self) -> list[Sequence]:
        return list(self.seqs.values())
