"""One attempt at serving a request through the engines, in vLLM's PD protocol.

Disaggregated (the policy put the PREFILL phase on a prefill instance): the prefill request goes with
``max_tokens=1``, ``stream=false`` and ``kv_transfer_params={"do_remote_decode": true, ...}``; then, once the
DECODE phase is assigned, the decode request carries the ``kv_transfer_params`` that prefill returned
(``pd_mode="shared_storage"``: no params either way, the decode instance loads what prefill stored). Colocated (a
MIXED or DECODE instance got the PREFILL phase): the client's request goes there whole. The answer, streamed (SSE)
or not, is relayed to the client as it comes.

Failures: an upstream that refuses the connection, answers 5xx, drops the connection, runs past a timeout
(``first_token_timeout_s`` to its first byte, ``stream_idle_timeout_s`` between chunks, ``read_timeout_s`` for a
non-streamed answer) or leaves rotation (failed health checks) while serving the request raises Retry naming the
instance, if the client got no byte yet (a refused connection also takes it out of rotation); once bytes have
reached the client, a failure ends the stream with an SSE ``error`` event (never a silent truncation: no ``[DONE]``
follows). A disaggregated request starts only when both phases have a healthy instance (else 503 at once: no
prefill is wasted). A client that disconnects cancels its upstream request. Error messages name instances by id,
never by address.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import aiohttp
import msgspec
from aiohttp import web

from backends.proxy.dispatcher import Dispatcher
from backends.proxy.errors import Reject, Retry, UpstreamAnswer
from backends.proxy.prefix_source import PrefixSource
from backends.proxy.proxy_metrics import ProxyMetrics
from backends.proxy.request_timing import RequestTiming
from backends.proxy.reservation import Reservation
from backends.proxy.trace_recorder import StreamTokenCounter, completion_tokens
from backends.proxy.upstream_state import UpstreamState
from omnisim.core import BatchSample, Phase, Request, Role

log = logging.getLogger(__name__)
_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode
# Every header the upstream request needs, given up front so aiohttp adds no defaults of its own per request.
_UPSTREAM_HEADERS = {"Content-Type": "application/json", "Accept": "*/*", "Accept-Encoding": "identity",
                     "User-Agent": "omnisim-proxy"}
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}
_UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
_DONE = b"data: [DONE]\n\n"  # the last event of an OpenAI stream (vLLM sends nothing after it)


class _Attempt:
    """One request's time at one engine, from sending to its last byte. Its task is cancelled when the engine
    leaves rotation (``lost``) or when ``deadline`` (event-loop time) passes (``timed_out``); the flags tell these
    cancellations from the client's own. The deadline moves by a plain store (``deadline = ...``, infinity while
    the client is being written to): one timer per attempt, re-armed only when it fires early, so a stream's
    chunks cost no timer each."""

    __slots__ = ("up", "task", "lost", "timed_out", "deadline", "_loop", "_timer", "_recheck_s")

    def __init__(self, up: UpstreamState, timeout_s: float) -> None:
        self.up = up
        self.task = asyncio.current_task()
        self.lost = self.timed_out = False
        self._loop = loop = asyncio.get_running_loop()
        self._recheck_s = timeout_s
        self.deadline = loop.time() + timeout_s
        self._timer: asyncio.TimerHandle | None = loop.call_at(self.deadline, self._check)
        up.attempts.add(self)

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        if now < self.deadline:  # moved on since: wait for the new one (or recheck while writing to the client)
            self._timer = self._loop.call_at(min(self.deadline, now + self._recheck_s), self._check)
        elif not (self.lost or self.timed_out):
            self.timed_out = True
            self.task.cancel()

    def rearm(self, timeout_s: float) -> None:
        """A new, possibly earlier deadline ``timeout_s`` from now (and rechecks at that interval from then on)."""
        if self._timer is not None:
            self._timer.cancel()
        self._recheck_s = timeout_s
        self.deadline = self._loop.time() + timeout_s
        self._timer = self._loop.call_at(self.deadline, self._check)

    def engine_lost(self) -> None:
        if not (self.lost or self.timed_out) and self.task is not asyncio.current_task():  # not the one that found it
            self.lost = True
            self.task.cancel()

    def close(self) -> None:
        """The attempt is over (or needs no watching any more): neither timer nor engine loss cancels it now."""
        self.up.attempts.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def recovered(self) -> bool:
        """In a CancelledError handler: True if the cancellation was this attempt's own (the task goes on and
        answers the client), False if it was the client's (re-raise it)."""
        if not (self.lost or self.timed_out):
            return False
        self.task.uncancel()
        return True


class PDProtocol:
    def __init__(self, session: aiohttp.ClientSession, dispatcher: Dispatcher, prefix: PrefixSource,
                 metrics: ProxyMetrics, pd_mode: str, health_failures: int, clock: Callable[[], float],
                 first_token_timeout_s: float = 120.0, stream_idle_timeout_s: float = 60.0,
                 read_timeout_s: float = 600.0) -> None:
        """``clock``: the event loop's time (timings, observed step durations)."""
        self.session = session
        self.dispatcher = dispatcher
        self.prefix = prefix
        self.metrics = metrics
        self.kv_transfer_params = pd_mode == "kv_transfer_params"
        self.health_failures = health_failures
        self.clock = clock
        self.first_token_timeout_s = first_token_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.read_timeout_s = read_timeout_s
        self.count_output = False  # set while the proxy records a trace: count each answer's generated tokens

    async def serve(self, request: web.Request, endpoint: str, body: dict, raw: bytes, req: Request,
                    timing: RequestTiming, exclude: frozenset = frozenset()) -> web.StreamResponse:
        """``raw``: the client's body as received; it goes upstream unchanged wherever the body is unchanged.
        ``exclude``: instances an earlier attempt failed on (this one goes elsewhere)."""
        d = self.dispatcher
        if not d.serving(Phase.DECODE, exclude):  # before any prefill: it would be wasted
            raise Reject(503, "no healthy instance for the decode phase", "no_instance", True)
        reservation = await d.assign(Phase.PREFILL, req, None, exclude)
        up = reservation.up
        timing.predicted_cached_tokens = reservation.cached if req.prefix_hashes else None
        path = PATHS[endpoint]
        if up.role is not Role.PREFILL:  # colocated, or served whole by a decode instance
            timing.decode_instance = up.id
            timing.decode_dispatch = self.clock()
            return await self._final(request, endpoint, path, reservation, body, raw, req, timing)
        timing.prefill_instance = up.id
        timing.prefill_dispatch = self.clock()
        kv_params = await self._prefill(reservation, path, body, req, timing)
        timing.prefill_end = self.clock()
        reservation = await d.assign(Phase.DECODE, req, up.id, exclude)
        timing.decode_instance = reservation.up.id
        timing.decode_dispatch = self.clock()
        if self.kv_transfer_params:
            raw = _json_encode({**body, "kv_transfer_params": kv_params})
        return await self._final(request, endpoint, path, reservation, body, raw, req, timing)

    @staticmethod
    def _upstream_headers(req: Request) -> dict[str, str]:
        return {"X-Request-Id": req.id, **_UPSTREAM_HEADERS}

    async def _prefill(self, reservation: Reservation, path: str, body: dict, req: Request, timing: RequestTiming
                       ) -> dict | None:
        up = reservation.up
        pbody = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
        pbody["max_tokens"] = 1
        if "max_completion_tokens" in body:
            pbody["max_completion_tokens"] = 1
        pbody["stream"] = False
        if self.kv_transfer_params:
            pbody["kv_transfer_params"] = dict(PREFILL_PARAMS)
        started = self.clock()
        attempt = _Attempt(up, self.first_token_timeout_s)
        failure = None
        try:
            async with self.session.post(up.endpoint(path), data=_json_encode(pbody),
                                         headers=self._upstream_headers(req)) as resp:
                data = await resp.read()
                attempt.close()
                status = resp.status
                content_type = resp.content_type
            if status == 200 and reservation.alone and up.outstanding == 1:
                up.observed(BatchSample(self.clock() - started, reservation.prompt, 0))
        except asyncio.CancelledError:
            if not attempt.recovered():
                raise
            failure = self._lost(up) if attempt.lost else self._timed_out(
                up, f"no answer within first_token_timeout_s={self.first_token_timeout_s}")
        except _UPSTREAM_ERRORS as e:
            self._failed(up, e)
            failure = f"{up.id}: {type(e).__name__}"
        finally:
            attempt.close()
            self.dispatcher.release(reservation)
        if failure is not None:
            raise Retry(f"prefill on {failure}", up.id)
        if status >= 500:
            self.metrics.errors.labels("upstream_5xx").inc()
            raise Retry(f"prefill on {up.id}: HTTP {status}", up.id)
        if status != 200:
            raise UpstreamAnswer(status, data, content_type)
        try:
            answer = _json_decode(data)
            params = answer.get("kv_transfer_params")
            cached = ((answer.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
            timing.prefill_cached_tokens = cached if isinstance(cached, int) else None
        except (msgspec.DecodeError, AttributeError):
            params = None
        if not self.kv_transfer_params:
            return None
        if not isinstance(params, dict):
            self.metrics.errors.labels("no_kv_transfer_params").inc()
            raise Retry(f"prefill on {up.id} returned no kv_transfer_params (is its KV connector a producer?)",
                        up.id)
        return params

    def _failed(self, up: UpstreamState, error: BaseException) -> None:
        self.metrics.errors.labels("upstream").inc()
        log.info("upstream %s (%s) failed: %s: %s", up.id, up.url, type(error).__name__, error)
        # Only a refused or unreachable connection proves the engine is gone. A dropped connection can be a pooled
        # keep-alive socket the engine closed as we reused it (seen with vLLM's uvicorn under load): the request is
        # retried, and the health checks decide about the engine.
        if isinstance(error, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
            up.connection_failed(self.health_failures)  # back after its next passing health check
            self.prefix.engine_lost(up.id)  # a restarted engine starts with an empty cache

    def _lost(self, up: UpstreamState) -> str:
        self.metrics.errors.labels("engine_lost").inc()
        return f"{up.id}: left rotation (failed health checks) while serving the request"

    def _timed_out(self, up: UpstreamState, what: str) -> str:
        self.metrics.errors.labels("timeout").inc()
        return f"{up.id}: {what}"

    async def _final(self, request: web.Request, endpoint: str, path: str, reservation: Reservation, body: dict,
                     data: bytes, req: Request, timing: RequestTiming) -> web.StreamResponse:
        """Send ``data`` (``body`` encoded) to the instance that generates the answer and relay the answer, streamed
        (SSE bytes as they come) or whole. Before the client's first byte a failure raises Retry; after it, the
        client gets an SSE error event and no [DONE]."""
        up = reservation.up
        stream = bool(body.get("stream"))
        waiting = "first_token_timeout_s" if stream else "read_timeout_s"
        attempt = _Attempt(up, getattr(self, waiting))
        response: web.StreamResponse | None = None  # the client's stream, once its headers went
        failure = None
        inf = float("inf")
        try:
            async with self.session.post(up.endpoint(path), data=data,
                                         headers=self._upstream_headers(req)) as resp:
                if resp.status >= 500:
                    self.metrics.errors.labels("upstream_5xx").inc()
                    raise Retry(f"{up.id}: HTTP {resp.status}", up.id)
                if resp.status != 200:
                    raise UpstreamAnswer(resp.status, await resp.read(), resp.content_type)
                if not stream:
                    data = await resp.read()
                    attempt.close()
                    if self.count_output:
                        timing.output_tokens = completion_tokens(data)
                    elapsed = self.clock() - timing.received
                    self.metrics.ttft.observe(elapsed)
                    self.metrics.e2e.observe(elapsed)
                    self.metrics.answered(endpoint, 200)
                    return web.Response(body=data, content_type="application/json", headers=timing.headers())
                chunk = await resp.content.readany()
                attempt.deadline = inf  # the client's pace is not the engine's fault
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache", **timing.headers()})
                waiting = "stream_idle_timeout_s"
                try:
                    await response.prepare(request)
                except (ConnectionError, RuntimeError):
                    return self._client_left(endpoint, resp, response)
                self.metrics.ttft.observe(self.clock() - timing.received)
                reservation.prompt_done()
                arrivals = []
                counter = StreamTokenCounter() if self.count_output else None
                idle = self.stream_idle_timeout_s
                attempt.rearm(idle)
                attempt.deadline = inf
                tail = b""
                while chunk:
                    now = self.clock()
                    arrivals.append(now)
                    if counter is not None:
                        counter.feed(chunk)
                    try:
                        await response.write(chunk)
                    except (ConnectionError, RuntimeError):  # the client left: drop the upstream request too
                        return self._client_left(endpoint, resp, response)
                    tail = (tail + chunk[-len(_DONE):])[-len(_DONE):]  # [DONE] may straddle two chunks
                    if tail == _DONE:  # the answer is whole: a client may close now, before the upstream ends it
                        break
                    attempt.deadline = self.clock() + idle
                    chunk = await resp.content.readany()
                    attempt.deadline = inf
                decoding = up.outstanding  # this one included: read before its release
                attempt.close()  # answered whole: the engine leaving rotation now changes nothing
        except asyncio.CancelledError:
            if not attempt.recovered():
                raise
            if attempt.lost:
                failure = self._lost(up)
            else:
                failure = self._timed_out(up, f"no {'first byte' if response is None else 'chunk'} within "
                                              f"{waiting}={getattr(self, waiting)}")
        except _UPSTREAM_ERRORS as e:
            self._failed(up, e)
            failure = f"{up.id}: {type(e).__name__}"
        finally:
            attempt.close()
            self.dispatcher.release(reservation)
        if failure is not None:
            if response is None:
                raise Retry(failure, up.id)
            return await self._midstream_error(endpoint, response, failure)
        try:
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client had every chunk, [DONE] included, and closed before the stream's terminator: answered
        if counter is not None:
            timing.output_tokens = counter.result()
        self.metrics.e2e.observe(self.clock() - timing.received)
        self.metrics.answered(endpoint, 200)
        if len(arrivals) >= 4:  # one chunk per decode step: the median gap is the step time
            gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
            up.observed(BatchSample(gaps[len(gaps) // 2], 0, decoding))
        return response

    def _client_left(self, endpoint: str, resp: aiohttp.ClientResponse, response: web.StreamResponse
                     ) -> web.StreamResponse:
        resp.close()
        self.metrics.errors.labels("client_disconnected").inc()
        self.metrics.answered(endpoint, 499)
        return response

    async def _midstream_error(self, endpoint: str, response: web.StreamResponse, failure: str
                               ) -> web.StreamResponse:
        self.metrics.errors.labels("midstream").inc()
        self.metrics.answered(endpoint, 502)
        err = {"error": {"message": f"upstream failed mid-stream: {failure}", "type": "upstream_error",
                         "code": 502}}
        try:
            await response.write(b"\n\ndata: " + _json_encode(err) + b"\n\n")
        except (ConnectionError, RuntimeError):
            pass  # the client is gone too
        return response
