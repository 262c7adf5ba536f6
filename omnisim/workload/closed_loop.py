"""Closed-loop load: a fixed number of clients, each sending its next request when its last one has ended (vLLM's
``benchmark_serving.py --max-concurrency`` / ``vllm bench serve --max-concurrency``).

``ClosedLoopWorkload`` says what is sent (an inner workload's requests: their lengths, prefixes and ids, in the
inner stream's order) and how the clients behave; ``ClientPool`` is one run's clients, a pure state machine that
the simulator (``omnisim.sim.closed_loop``, on SimPy's clock) and the load generator (``backends.loadgen``, on the
wall clock) drive the same way: ask ``due()`` when the next send is, ``take(now)`` the requests due by then, and
report each request's end with ``finished(id, at_s)``.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Iterator

import numpy as np

from omnisim.core import Request
from omnisim.workload.workload import Workload

_CHUNK = 1024
_THINK_STREAM = 0x7C1_05ED  # mixed into the seed: think times never share a stream with the inner workload's draws


class ClosedLoopWorkload:
    """``concurrency`` clients sending ``inner``'s requests one at a time each.

    A client sends, waits for the request to end (completed, rejected, dropped or failed: every end frees it), thinks
    for a time (``think_s`` mean; ``think_cv`` 0 = always ``think_s``, 1 = exponential, else gamma; drawn per request
    from ``seed``, so the think after request k is the same whatever order requests end in), then sends again.
    Client i sends its first request at ``i * ramp_s / concurrency`` (0: all at t=0).

    Requests are handed out in the inner stream's order to whichever client is free first (ties: the lower client
    index), so arrival order is the inner order and a seed fixes the record set. A request's ``arrival_s`` is when its
    client sends it; the inner stream's arrival times are ignored, unless ``keep_arrivals`` (then a request is sent
    at its inner arrival time or when a client is free, whichever is later: vLLM's ``--request-rate R
    --max-concurrency N``).

    Bounds: at most ``max_requests`` are sent, none at or after ``duration_s``; at least one is needed. The run also
    ends when the inner stream runs out.
    """

    def __init__(self, inner: Workload, concurrency: int, seed: int = 0, think_s: float = 0.0,
                 think_cv: float = 0.0, ramp_s: float = 0.0, keep_arrivals: bool = False,
                 max_requests: int | None = None, duration_s: float | None = None) -> None:
        if not (isinstance(inner, Workload) and not isinstance(inner, ClosedLoopWorkload)):
            raise ValueError(f"workload.inner must be an open-loop workload (with requests()), got {inner!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, (int, np.integer)) or concurrency < 1:
            raise ValueError(f"workload.concurrency must be a whole number >= 1 (clients), got {concurrency!r}")
        for name, value in (("think_s", think_s), ("think_cv", think_cv), ("ramp_s", ramp_s)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"workload.{name} must be a finite number >= 0, got {value}")
        if max_requests is not None and max_requests < 0:
            raise ValueError(f"workload.max_requests must be >= 0 or null, got {max_requests}")
        if duration_s is not None and not (duration_s > 0 and math.isfinite(duration_s)):
            raise ValueError(f"workload.duration_s must be a finite number > 0 or null, got {duration_s}")
        if max_requests is None and duration_s is None:
            # A closed loop never stops by itself: its clients send for as long as the inner stream lasts.
            raise ValueError("a closed-loop workload needs workload.max_requests or workload.duration_s")
        self.inner = inner
        self.concurrency = int(concurrency)
        self.seed = int(seed)
        self.think_s = float(think_s)
        self.think_cv = float(think_cv)
        self.ramp_s = float(ramp_s)
        self.keep_arrivals = bool(keep_arrivals)
        self.max_requests = None if max_requests is None else int(max_requests)
        self.duration_s = None if duration_s is None else float(duration_s)

    def requests(self) -> Iterator[Request]:
        """The requests in the order clients are handed them (at most ``max_requests``; a run may send fewer: it
        stops at ``duration_s``), each with ``arrival_s`` the earliest time it may be sent: 0, or its inner arrival
        time with ``keep_arrivals``. Drivers send them through ``clients()``."""
        for index, request in enumerate(self.inner.requests()):
            if self.max_requests is not None and index >= self.max_requests:
                return
            yield request if self.keep_arrivals else dataclasses.replace(request, arrival_s=0.0)

    def clients(self) -> ClientPool:
        """A fresh run's clients."""
        return ClientPool(self)

    def think_times(self) -> Iterator[float]:
        """The think time after the 1st, 2nd, ... request handed out (seconds)."""
        if self.think_s == 0:
            while True:
                yield 0.0
        if self.think_cv == 0:
            while True:
                yield self.think_s
        rng = np.random.default_rng([self.seed, _THINK_STREAM])
        shape = 1.0 / self.think_cv**2
        while True:
            yield from rng.gamma(shape, self.think_s / shape, size=_CHUNK).tolist()

    def __repr__(self) -> str:
        return (f"ClosedLoopWorkload(inner={self.inner!r}, concurrency={self.concurrency}, seed={self.seed}, "
                f"think_s={self.think_s}, think_cv={self.think_cv}, ramp_s={self.ramp_s}, "
                f"keep_arrivals={self.keep_arrivals}, max_requests={self.max_requests}, duration_s={self.duration_s})")


class ClientPool:
    """One run's clients: which are free and from when, which request each is waiting on, what is sent next.

    Times are the driver's (simulated seconds, or workload seconds since a replay started). Sends never go back in
    time: a client is free again at its request's end plus think time, which is never before the sends already
    made, and the inner arrival times (``keep_arrivals``) are nondecreasing.
    """

    def __init__(self, workload: ClosedLoopWorkload) -> None:
        self.workload = workload
        self._requests = workload.requests()
        self._next: Request | None = next(self._requests, None)
        self._thinks = workload.think_times()
        step = workload.ramp_s / workload.concurrency
        self._free = [(i * step, i) for i in range(workload.concurrency)]  # (free from, client): a heap (sorted)
        self._waiting: dict[str, tuple[int, float]] = {}  # request id -> (client, think time after it)
        self.sent = 0

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def due(self) -> float | None:
        """When the next request is to be sent, as far as is known now: None while every client is busy, and once
        the requests or the time are used up (a later end can bring a send earlier than what this said)."""
        if self._next is None or not self._free:
            return None
        at = self._free[0][0]
        if self._next.arrival_s > at:  # keep_arrivals; otherwise the pool's requests arrive at 0
            at = self._next.arrival_s
        duration = self.workload.duration_s
        return None if duration is not None and at >= duration else at

    def take(self, now_s: float) -> list[tuple[int, Request]]:
        """Hand out every request due at or before ``now_s``: (client, request with ``arrival_s`` its send time)."""
        out = []
        while True:
            at = self.due()
            if at is None or at > now_s:
                return out
            client = heapq.heappop(self._free)[1]
            request = self._next
            if request.arrival_s != at:
                request = dataclasses.replace(request, arrival_s=at)
            # Drawn in hand-out order, so request k's think time does not depend on the order requests end in.
            self._waiting[request.id] = (client, next(self._thinks))
            self.sent += 1
            self._next = next(self._requests, None)
            out.append((client, request))

    def finished(self, request_id: str, at_s: float) -> int:
        """``request_id`` ended at ``at_s`` (whatever its outcome): its client is free after its think time. Returns
        the client."""
        try:
            client, think_s = self._waiting.pop(request_id)
        except KeyError:
            raise ValueError(f"closed loop: request {request_id!r} ended but no client is waiting on it") from None
        heapq.heappush(self._free, (at_s + think_s, client))
        return client
