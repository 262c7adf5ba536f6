"""The proxy's HTTP face: the aiohttp routes (OpenAI-compatible /v1/completions and /v1/chat/completions,
/v1/models, /health, /metrics), the API key, the limits (body size, requests in flight, queued requests), retries
on another instance, and every error answer."""
from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Callable

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from backends.proxy.config import ProxyConfig
from backends.proxy.dispatcher import Dispatcher
from backends.proxy.errors import Reject, Retry, UpstreamAnswer
from backends.proxy.pd_protocol import PDProtocol
from backends.proxy.proxy_metrics import ProxyMetrics
from backends.proxy.request_parser import RequestParser
from backends.proxy.request_timing import RequestTiming
from backends.proxy.trace_recorder import TraceRecorder
from backends.proxy.upstream_state import UpstreamState
from omnisim.core import Phase

log = logging.getLogger(__name__)
_json_decode = msgspec.json.Decoder().decode
_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/models": "models"}


class HttpApi:
    def __init__(self, config: ProxyConfig, upstreams: dict[str, UpstreamState], metrics: ProxyMetrics,
                 dispatcher: Dispatcher, parser: RequestParser, pd: PDProtocol, session: aiohttp.ClientSession,
                 serving_ids: set[str], clock: Callable[[], float]) -> None:
        """``serving_ids``: ids of the requests being served (the parser keeps new ids unique among them).
        ``clock``: the event loop's time."""
        self.config = config
        self.upstreams = upstreams
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.parser = parser
        self.pd = pd
        self.session = session
        self.serving_ids = serving_ids
        self.clock = clock
        self.recorder: TraceRecorder | None = None  # ProxyConfig.record_trace

    @property
    def inflight(self) -> int:
        """Client requests being served (``max_inflight``)."""
        return len(self.serving_ids)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._answer_everything])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        return app

    @web.middleware
    async def _answer_everything(self, request: web.Request, handler) -> web.StreamResponse:
        """Every request gets a deliberate JSON answer, counted once: aiohttp's own (unknown path, wrong method)
        and any bug's (500, logged) included."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return self._error(e.status, e.reason, "http", "other")
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            return self._error(500, "internal proxy error (logged)", "internal",
                               _ENDPOINTS.get(request.path, "other"))

    def _error(self, status: int, message: str, kind: str, endpoint: str, retry_after: bool = False
               ) -> web.Response:
        self.metrics.errors.labels(kind).inc()
        self.metrics.answered(endpoint, status)
        headers = {"Retry-After": str(self.config.retry_after_s)} if retry_after else None
        return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status,
                                 headers=headers)

    def _authorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        if not key:
            return True
        given = request.headers.get("Authorization", "")  # undecodable bytes arrive as surrogates
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode("utf-8", "surrogateescape"),
                                                                   key.encode())

    async def health(self, request: web.Request) -> web.Response:
        states = {u.id: u.healthy for u in self.upstreams.values()}
        view = self.dispatcher.view()
        ok = bool(view.candidates(Phase.PREFILL)) and bool(view.candidates(Phase.DECODE))
        return web.json_response({"healthy": ok, "upstreams": states}, status=200 if ok else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        m = self.metrics
        for phase, q in self.dispatcher.queues.items():
            m.queue_length.labels(phase.value).set(len(q))
        m.inflight.set(self.inflight)
        for u in self.upstreams.values():
            m.outstanding.labels(u.id).set(u.outstanding)
            m.healthy.labels(u.id).set(1 if u.healthy else 0)
        return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "missing or wrong API key", "unauthorized", "models")
        for up in self.upstreams.values():
            if not up.healthy:
                continue
            try:
                async with self.session.get(up.url + "/v1/models") as resp:
                    if resp.status == 200:
                        self.metrics.answered("models", 200)
                        return web.Response(body=await resp.read(), content_type="application/json")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                continue
        return self._error(503, "no healthy upstream answered /v1/models", "no_instance", "models", True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def _handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        timing = RequestTiming(received=self.clock())
        if not self._authorized(request):
            return self._error(401, "missing or wrong API key", "unauthorized", endpoint)
        c = self.config
        if request.content_length is not None and request.content_length > c.max_body_bytes:
            return self._error(413, f"body of {request.content_length} bytes exceeds max_body_bytes="
                                    f"{c.max_body_bytes}", "too_large", endpoint)
        try:
            async with asyncio.timeout(c.client_read_timeout_s):
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"body exceeds max_body_bytes={c.max_body_bytes}", "too_large", endpoint)
        except TimeoutError:
            return self._error(408, f"body not received within client_read_timeout_s={c.client_read_timeout_s}",
                               "client_timeout", endpoint)
        except (ConnectionError, aiohttp.ClientPayloadError, web.HTTPBadRequest) as e:
            return self._error(400, f"body: unreadable ({type(e).__name__})", "bad_request", endpoint)
        try:
            body = _json_decode(raw)
        except msgspec.DecodeError as e:
            return self._error(400, f"body: malformed JSON ({e})", "bad_request", endpoint)
        except RecursionError:
            return self._error(400, "body: JSON nested too deeply", "bad_request", endpoint)
        try:
            req = self.parser.parse(request.headers, body, endpoint)
        except ValueError as e:
            return self._error(400, str(e), "bad_request", endpoint)
        except RecursionError:
            return self._error(400, "body: nested too deeply", "bad_request", endpoint)
        if c.max_inflight and self.inflight >= c.max_inflight:
            return self._error(429, f"more than max_inflight={c.max_inflight} requests in flight", "overload",
                               endpoint, True)
        if self.dispatcher.queued() >= c.max_queued:
            return self._error(503, f"proxy queue full (max_queued={c.max_queued})", "overload", endpoint, True)
        self.serving_ids.add(req.id)
        ticket = self.recorder.arrived(req) if self.recorder is not None else None
        try:
            error = "no attempt made"
            tried: set[str] = set()  # instances an attempt failed on: a retry goes elsewhere
            attempts = 0
            while attempts < c.max_attempts:
                if attempts:
                    exclude = frozenset(tried)
                    if not (self.dispatcher.serving(Phase.PREFILL, exclude)
                            and self.dispatcher.serving(Phase.DECODE, exclude)):
                        break  # nowhere else to go
                    self.metrics.retries.inc()
                attempts += 1
                try:
                    return await self.pd.serve(request, endpoint, body, raw, req, timing, frozenset(tried))
                except Retry as e:
                    error = str(e)
                    if e.instance:
                        tried.add(e.instance)
                    log.info("request %s attempt %d failed: %s", req.id, attempts, e)
            return self._error(502, f"upstream failed after {attempts} attempt(s): {error}", "upstream", endpoint)
        except Reject as e:
            return self._error(e.status, str(e), e.kind, endpoint, e.retry_after)
        except UpstreamAnswer as e:
            self.metrics.answered(endpoint, e.status)
            return web.Response(status=e.status, body=e.body, content_type=e.content_type)
        except asyncio.CancelledError:
            self.metrics.errors.labels("client_disconnected").inc()
            self.metrics.answered(endpoint, 499)  # nginx's "client closed request"
            raise
        finally:
            self.serving_ids.discard(req.id)
            if ticket is not None:
                self.recorder.ended(ticket, timing.output_tokens)
