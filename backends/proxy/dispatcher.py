"""The proxy's dispatcher, the HTTP side's twin of the simulator's proxy driver (omnisim/sim/proxy_driver.py):
arrived requests wait in a prefill and a decode queue; on every arrival and completion (coalesced into one call per
event-loop turn) and on a timer while a queue is non-empty it asks the policy, for each phase, which waiting
requests go where now, checks the answer with the simulator's own rule (omnisim.core.validate_assignments) and
hands each assigned request its ``Reservation``. Requests the policy leaves unassigned stay queued, up to
``queue_timeout_s``.

A policy call that raises or returns an invalid answer is logged, counted (omnisim_proxy_errors{kind="policy"})
and none of its assignments is applied; the requests it was offered are answered 503 at once (the proxy keeps
serving; in the simulator the same answer stops the run with PolicyError).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

from backends.proxy.errors import Reject
from backends.proxy.prefix_source import PrefixSource
from backends.proxy.proxy_metrics import ProxyMetrics
from backends.proxy.reservation import Reservation
from backends.proxy.upstream_state import UpstreamState
from omnisim.core import (
    ClusterView, Phase, PolicyError, ProxyPolicy, Request, Role, Waiting, roles_for, validate_assignments,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    waiting: Waiting
    future: asyncio.Future
    exclude: frozenset = frozenset()  # instances this request failed on (a retry goes elsewhere)


class Dispatcher:
    def __init__(self, policy: ProxyPolicy, upstreams: dict[str, UpstreamState], prefix: PrefixSource,
                 metrics: ProxyMetrics, now_s: Callable[[], float], schedule_interval_s: float,
                 queue_timeout_s: float) -> None:
        self.policy = policy
        self.policy_name = type(policy).__name__
        self.upstreams = upstreams
        self.prefix = prefix
        self.metrics = metrics
        self.now_s = now_s
        self.schedule_interval_s = schedule_interval_s
        self.queue_timeout_s = queue_timeout_s
        self.queues: dict[Phase, dict[str, _Pending]] = {Phase.PREFILL: {}, Phase.DECODE: {}}
        self._kicked = False
        self._held = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task:
        """Bind to the running loop; returns the timer task (cancel it to stop)."""
        self._loop = loop
        return asyncio.create_task(self._timer())

    def queued(self) -> int:
        return len(self.queues[Phase.PREFILL]) + len(self.queues[Phase.DECODE])

    def view(self) -> ClusterView:
        return ClusterView(self.now_s(), tuple(u.snapshot() for u in self.upstreams.values()), self.prefix.lookup)

    def serving(self, phase: Phase, exclude: frozenset = frozenset()) -> bool:
        """Whether a healthy instance outside ``exclude`` serves ``phase`` (== view.candidates(phase))."""
        roles = roles_for(phase)
        return any(u.healthy and u.role in roles and u.id not in exclude for u in self.upstreams.values())

    # -- a request's way through the queues ----------------------------------------------------------------------
    async def assign(self, phase: Phase, request: Request, source: str | None,
                     exclude: frozenset = frozenset()) -> Reservation:
        """Queue ``request`` for ``phase`` and wait until the policy assigns it; its reservation there.
        ``source``: in the DECODE phase, the prefill instance that holds its KV. ``exclude``: instances it must
        not go to (it failed there); the policy sees them out of rotation for this request. Raises Reject (503)
        when no healthy instance serves the phase, the request is held too long, or the policy failed on it."""
        if not self.serving(phase, exclude):
            raise Reject(503, f"no healthy instance for the {phase.value} phase", "no_instance", True)
        future = self._loop.create_future()
        self.queues[phase][request.id] = _Pending(Waiting(request, self.now_s(), source), future, exclude)
        self._held.set()
        self.kick()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # assigned, then the client left before dispatch
            raise
        finally:
            self.queues[phase].pop(request.id, None)  # cancelled or timed out while queued

    def release(self, reservation: Reservation) -> None:
        """The request is done at its instance (answered, failed or cancelled)."""
        if reservation.close():
            self.kick()  # room freed: held requests may go now

    def kick(self) -> None:
        """Ask the policy soon (once per event-loop turn however many events come)."""
        if not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._schedule)

    def reject_all(self, message: str, kind: str) -> None:
        """Answer every held request 503 (the proxy is stopping)."""
        for queue in self.queues.values():
            for p in queue.values():
                if not p.future.done():
                    p.future.set_exception(Reject(503, message, kind, True))
            queue.clear()

    # -- asking the policy ---------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        self._kicked = False
        for phase in (Phase.PREFILL, Phase.DECODE):
            queue = self.queues[phase]
            if not queue:
                continue
            waiting = [p.waiting for p in queue.values() if not p.exclude]
            if len(waiting) < len(queue):  # retried requests: each asks with its failed instances out of rotation
                for p in [p for p in queue.values() if p.exclude]:
                    self._ask(phase, queue, [p.waiting], p.exclude)
            if waiting:
                self._ask(phase, queue, waiting, frozenset())

    def _ask(self, phase: Phase, queue: dict[str, _Pending], waiting: list[Waiting], exclude: frozenset) -> None:
        try:
            view = self.view()
            if exclude:
                view = dataclasses.replace(view, instances=tuple(
                    dataclasses.replace(s, healthy=False) if s.id in exclude else s for s in view.instances))
            out = self.policy.schedule(phase, waiting, view)
            chosen = validate_assignments(self.policy_name, phase, waiting, out, view.instances)
        except Exception as e:  # a broken policy must not take the proxy down
            self._policy_failed(phase, queue, waiting, e)
            return
        for request_id, instance_id in chosen.items():
            pending = queue.pop(request_id)
            if not pending.future.done():  # done: its client left (or it timed out) a moment ago
                pending.future.set_result(self._reserve(self.upstreams[instance_id], pending.waiting.request,
                                                        phase))

    def _policy_failed(self, phase: Phase, queue: dict[str, _Pending], offered: list[Waiting],
                       error: Exception) -> None:
        if isinstance(error, PolicyError):
            log.warning("policy %s returned an invalid answer in phase %s: %s", self.policy_name, phase.value, error)
            why = f"policy {self.policy_name} returned an invalid answer: {error}"
        else:
            log.exception("policy %s failed in phase %s", self.policy_name, phase.value)
            why = f"policy {self.policy_name} failed: {type(error).__name__}: {error}"
        self.metrics.errors.labels("policy").inc()
        for w in offered:
            pending = queue.pop(w.request.id, None)
            if pending is not None and not pending.future.done():
                pending.future.set_exception(Reject(503, why, "policy_failed", True))

    def _reserve(self, up: UpstreamState, r: Request, phase: Phase) -> Reservation:
        """Account for the request at its instance the moment it is assigned (the next view must see it)."""
        prompt = decode = cached = 0
        if phase is Phase.PREFILL:
            if r.prefix_hashes:
                cached = self.prefix.lookup.cached_tokens(r, up.id)
                self.prefix.routed(up.id, r)
            prompt = r.prompt_tokens - cached
        if phase is Phase.DECODE or up.role is not Role.PREFILL:
            decode = r.prompt_tokens + r.output_tokens
        up.assigned(prompt, decode)
        self.metrics.dispatched(up.id, phase.value)
        return Reservation(up, prompt, decode, cached, alone=up.outstanding == 1)

    async def _timer(self) -> None:
        interval = self.schedule_interval_s
        while True:
            await asyncio.sleep(interval)
            if not (self.queues[Phase.PREFILL] or self.queues[Phase.DECODE]):
                self._held.clear()
                await self._held.wait()  # idle: no timer wake-ups until a request is held
                continue
            self._schedule()
            deadline = self.now_s() - self.queue_timeout_s
            for queue in self.queues.values():
                for p in [p for p in queue.values() if p.waiting.queued_s < deadline]:
                    if not p.future.done():
                        p.future.set_exception(Reject(503, f"request held longer than queue_timeout_s="
                                                           f"{self.queue_timeout_s}", "queue_timeout", True))
