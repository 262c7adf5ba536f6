"""The proxy: holds client requests in a prefill and a decode queue and asks the policy where each goes, exactly as
the simulator's proxy driver does; then speaks vLLM's PD protocol to the chosen engines and streams the answer back.

Scheduling: ``policy.schedule(phase, queue, view)`` runs soon after every arrival and completion (coalesced into
one call per event-loop turn) and on a timer every ``schedule_interval_s`` while a queue is non-empty. Requests the
policy leaves unassigned stay queued (up to ``queue_timeout_s``). The view's ``now_s`` is the proxy's monotonic
clock since start; instance states come from UpstreamState; the prefix lookup from KV events or routing history.

Failures: an upstream that refuses the connection, answers 5xx or drops the connection before the client got any
byte is taken out of rotation (connection errors) and the request goes back to the prefill queue for another try
(``max_attempts`` in all); once bytes have reached the client, a failure ends the stream with an SSE ``error``
event (never a silent truncation: no ``[DONE]`` follows). A client that disconnects cancels its upstream request.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from dataclasses import dataclass

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from backends.common.engine_block_map import EngineBlockMap
from backends.common.kv_wire import KVEventSubscriber, StoredBlocks, WireEvent, as_core
from backends.common.prompt_tokenizer import PromptTokenizer
from backends.common.tokens import block_hashes, prompt_tokens
from backends.proxy.config import ProxyConfig
from backends.proxy.proxy_metrics import ProxyMetrics
from backends.proxy.routing_history import RoutingHistory
from backends.proxy.upstream_state import UpstreamState
from omnisim.core import (
    BatchSample, ClusterView, NO_PREFIX_CACHE, Phase, PrefixIndex, ProxyPolicy, Request, Role, Waiting,
)

log = logging.getLogger(__name__)
_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode
# Every header the upstream request needs, given up front so aiohttp adds no defaults of its own per request.
_UPSTREAM_HEADERS = {"Content-Type": "application/json", "Accept": "*/*", "Accept-Encoding": "identity",
                     "User-Agent": "omnisim-proxy"}
_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                   "remote_block_ids": None, "remote_host": None, "remote_port": None}


_ENGINE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def _engine_gauges(text: str) -> tuple[dict[str, float], set[str]]:
    """The three gauges the proxy reads from an engine's /metrics, summed over label sets. Only their sample lines
    are parsed (``name{labels} value``): a full exposition parse of vLLM's histograms costs far more."""
    values = dict.fromkeys(_ENGINE_GAUGES, 0.0)
    seen = set()
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            try:
                values[name] += float(line.rsplit("}", 1)[-1].split()[0])
            except (ValueError, IndexError):
                continue
            seen.add(name)
    return values, seen


def _header_int(headers, name: str) -> int:
    try:
        return int(headers[name])
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {headers[name]!r}") from None


class _Retry(Exception):
    """The upstream failed before the client got anything: try again elsewhere."""


class _Reject(Exception):
    def __init__(self, status: int, message: str, kind: str, retry_after: bool = False):
        super().__init__(message)
        self.status, self.kind, self.retry_after = status, kind, retry_after


class _UpstreamAnswer(Exception):
    """The upstream refused the request itself (4xx): pass its answer to the client as is."""

    def __init__(self, status: int, body: bytes, content_type: str):
        self.status, self.body, self.content_type = status, body, content_type


@dataclass(eq=False)
class _Ticket:
    """One request's reservation at one instance: prompt tokens until prefilled, decode tokens until done."""

    up: UpstreamState
    prompt: int
    decode: int
    cached: int = 0  # prompt tokens the prefix index expected cached there
    alone: bool = False  # nothing else of ours was in flight there when it was assigned
    open: bool = True

    def prompt_done(self) -> None:
        if self.prompt:
            self.up.prefilled(self.prompt)
            self.prompt = 0

    def close(self) -> bool:
        if not self.open:
            return False
        self.prompt_done()
        self.up.finished(self.decode)
        self.open = False
        return True


@dataclass(eq=False)
class _Pending:
    waiting: Waiting
    future: asyncio.Future


@dataclass(slots=True)
class _Timing:
    received: float
    prefill_instance: str = ""
    decode_instance: str = ""
    prefill_dispatch: float | None = None
    prefill_end: float | None = None
    decode_dispatch: float | None = None
    prefill_cached_tokens: int | None = None
    predicted_cached_tokens: int | None = None

    def headers(self) -> dict[str, str]:
        h = {"x-omnisim-prefill-instance": self.prefill_instance, "x-omnisim-decode-instance": self.decode_instance}
        for name, t in (("prefill-dispatch", self.prefill_dispatch), ("prefill-end", self.prefill_end),
                        ("decode-dispatch", self.decode_dispatch)):
            if t is not None:
                h[f"x-omnisim-{name}-s"] = f"{t - self.received:.6f}"
        if self.prefill_cached_tokens is not None:
            h["x-omnisim-prefill-cached-tokens"] = str(self.prefill_cached_tokens)
        if self.predicted_cached_tokens is not None:
            h["x-omnisim-predicted-cached-tokens"] = str(self.predicted_cached_tokens)
        return h


class Proxy:
    def __init__(self, config: ProxyConfig, policy: ProxyPolicy) -> None:
        if not callable(getattr(policy, "schedule", None)):
            raise ValueError(f"policy: {type(policy).__name__} has no schedule(phase, queue, view) method")
        self.config = config
        self.policy = policy
        self.upstreams = {u.id: UpstreamState(u) for u in config.upstreams}
        self.metrics = ProxyMetrics()
        self.port = config.port
        # The model's tokenizer (optional): exact prompt tokens, and exact prefix matches against vLLM's events.
        self.tokenizer = PromptTokenizer(config.tokenizer) if config.tokenizer else None
        self.block_map: EngineBlockMap | None = None
        self._hash_only_warned = False
        if config.prefix_source == "kv_events":
            self.prefix = PrefixIndex()
            if self.tokenizer is not None:
                self.block_map = EngineBlockMap(self.prefix, config.prefix_block_tokens)
        elif config.prefix_source == "history":
            self.prefix = RoutingHistory(config.history_blocks)
        else:
            self.prefix = NO_PREFIX_CACHE
        self._queues: dict[Phase, dict[str, _Pending]] = {Phase.PREFILL: {}, Phase.DECODE: {}}
        self._active_ids: set[str] = set()
        self._ids = itertools.count()
        self._inflight = 0
        self._kicked = False
        self._held = asyncio.Event()
        self._t0 = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self.subscribers: list[KVEventSubscriber] = []

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def now_s(self) -> float:
        return self._loop.time() - self._t0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        c = self.config
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, connect=c.connect_timeout_s, sock_read=c.read_timeout_s),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())  # engines' cookies are not ours to keep
        app = web.Application(client_max_size=c.max_body_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, c.host, c.port, backlog=1024).start()
        self.port = self._runner.addresses[0][1]
        self._tasks.append(asyncio.create_task(self._timer()))
        health_timeout = aiohttp.ClientTimeout(total=c.health_timeout_s)
        self._poll_each(c.health_interval_s, lambda up: self._check_health(up, health_timeout))
        if c.metrics_interval_s > 0:
            metrics_timeout = aiohttp.ClientTimeout(total=max(1.0, c.metrics_interval_s))
            self._poll_each(c.metrics_interval_s, lambda up: self._scrape_metrics(up, metrics_timeout))
        if c.prefix_source == "kv_events":
            for up in self.upstreams.values():
                if up.upstream.kv_events:
                    sub = KVEventSubscriber(up.upstream.kv_events, lambda events, i=up.id: self._kv_events(i, events))
                    self.subscribers.append(sub)
                    self._tasks.append(asyncio.create_task(sub.run()))

    def _kv_events(self, instance_id: str, events: list[WireEvent]) -> None:
        if self.block_map is not None:
            self.block_map.apply(instance_id, events)
            return
        if not self._hash_only_warned and any(isinstance(e, StoredBlocks) and e.token_ids for e in events):
            self._hash_only_warned = True  # vLLM: its hashes never equal the proxy's
            log.warning("kv events from %s carry token ids (a vLLM engine?): set the proxy's tokenizer to the "
                        "model's for exact prefix matches; without it they match only an emulator's hashes",
                        instance_id)
        self.prefix.apply(instance_id, as_core(events))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for q in self._queues.values():
            for p in q.values():
                if not p.future.done():
                    p.future.set_exception(_Reject(503, "proxy shutting down", "shutdown", True))
            q.clear()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        if self._session:
            await self._session.close()
            self._session = None

    # -- scheduling --------------------------------------------------------------------------------------------
    def view(self) -> ClusterView:
        return ClusterView(self.now_s(), tuple(u.snapshot() for u in self.upstreams.values()), self.prefix)

    def _kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._schedule)

    def _schedule(self) -> None:
        self._kicked = False
        for phase in (Phase.PREFILL, Phase.DECODE):
            queue = self._queues[phase]
            if not queue:
                continue
            try:
                assignments = self.policy.schedule(phase, [p.waiting for p in queue.values()], self.view())
            except Exception:  # a broken policy must not take the proxy down: requests time out with 503
                log.exception("policy %s failed in phase %s", type(self.policy).__name__, phase.value)
                self.metrics.errors.labels("policy").inc()
                continue
            for a in assignments:
                up = self.upstreams.get(a.instance_id)
                pending = queue.get(a.request_id)
                if pending is None or up is None or not self._serves(up, phase):
                    log.warning("policy %s: invalid assignment %s in phase %s", type(self.policy).__name__, a,
                                phase.value)
                    self.metrics.errors.labels("policy").inc()
                    continue
                del queue[a.request_id]
                if not pending.future.done():  # done: its client left (or it timed out) a moment ago
                    pending.future.set_result(self._reserve(up, pending.waiting.request, phase))

    @staticmethod
    def _serves(up: UpstreamState, phase: Phase) -> bool:
        if phase is Phase.PREFILL:
            return True  # a PREFILL-phase assignment to a decode or mixed instance serves it there whole
        return up.role in (Role.DECODE, Role.MIXED)

    def _reserve(self, up: UpstreamState, r: Request, phase: Phase) -> _Ticket:
        """Account for the request at its instance the moment it is assigned (the next view must see it)."""
        prompt = decode = cached = 0
        if phase is Phase.PREFILL:
            cached = self.prefix.cached_tokens(r, up.id) if r.prefix_hashes else 0
            prompt = r.prompt_tokens - cached
            if isinstance(self.prefix, RoutingHistory) and r.prefix_hashes:
                self.prefix.record(up.id, r.prefix_hashes)
        if phase is Phase.DECODE or up.role is not Role.PREFILL:
            decode = r.prompt_tokens + r.output_tokens
        up.assigned(prompt, decode)
        self.metrics.dispatched(up.id, phase.value)
        return _Ticket(up, prompt, decode, cached, alone=up.outstanding == 1)

    def _close(self, ticket: _Ticket) -> None:
        if ticket.close():
            self._kick()  # room freed: held requests may go now

    async def _assign(self, phase: Phase, request: Request, source: str | None) -> _Ticket:
        roles = (Role.PREFILL, Role.MIXED) if phase is Phase.PREFILL else (Role.DECODE, Role.MIXED)
        if not any(u.healthy and u.role in roles for u in self.upstreams.values()):  # == view.candidates(phase)
            raise _Reject(503, f"no healthy instance for the {phase.value} phase", "no_instance", True)
        future = self._loop.create_future()
        self._queues[phase][request.id] = _Pending(Waiting(request, self.now_s(), source), future)
        self._held.set()
        self._kick()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._close(future.result())  # assigned, then the client left before dispatch
            raise
        finally:
            self._queues[phase].pop(request.id, None)  # cancelled or timed out while queued

    async def _timer(self) -> None:
        interval = self.config.schedule_interval_s
        while True:
            await asyncio.sleep(interval)
            if not (self._queues[Phase.PREFILL] or self._queues[Phase.DECODE]):
                self._held.clear()
                await self._held.wait()  # idle: no timer wake-ups until a request is held
                continue
            self._schedule()
            deadline = self.now_s() - self.config.queue_timeout_s
            for queue in self._queues.values():
                for p in [p for p in queue.values() if p.waiting.queued_s < deadline]:
                    if not p.future.done():
                        p.future.set_exception(_Reject(503, f"request held longer than queue_timeout_s="
                                                            f"{self.config.queue_timeout_s}", "queue_timeout", True))

    # -- background: health and engine metrics ----------------------------------------------------------------
    def _poll_each(self, interval_s: float, poll) -> None:
        """``await poll(up)`` every ``interval_s`` for each upstream, their phases spread evenly over the interval:
        N engines' answers never arrive in one burst (one /metrics answer of the emulator takes 0.7 ms to render;
        four at once stalled a shared engine host and the proxy's loop for about 3 ms, every second)."""
        ups = list(self.upstreams.values())
        for k, up in enumerate(ups):
            self._tasks.append(asyncio.create_task(self._every(interval_s, k * interval_s / len(ups), poll, up)))

    @staticmethod
    async def _every(interval_s: float, offset_s: float, poll, up: UpstreamState) -> None:
        await asyncio.sleep(offset_s)
        while True:
            await poll(up)
            await asyncio.sleep(interval_s)

    async def _check_health(self, up: UpstreamState, timeout: aiohttp.ClientTimeout) -> None:
        try:
            async with self._session.get(up.endpoint("/health"), timeout=timeout) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        was = up.healthy
        up.check_passed() if ok else up.check_failed(self.config.health_failures)
        if up.healthy != was:
            log.warning("upstream %s is %s", up.id, "back in rotation" if up.healthy else "out of rotation")
            if up.healthy:
                self._kick()

    async def _scrape_metrics(self, up: UpstreamState, timeout: aiohttp.ClientTimeout) -> None:
        try:
            async with self._session.get(up.endpoint("/metrics"), timeout=timeout) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return
        values, seen = _engine_gauges(text)
        running = "vllm:num_requests_running" in seen
        up.engine_reported(int(values["vllm:num_requests_running"]) if running else None,
                           int(values["vllm:num_requests_waiting"]) if running else None,
                           values["vllm:kv_cache_usage_perc"])

    # -- HTTP handlers ------------------------------------------------------------------------------------------
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
        given = request.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())

    async def _health(self, request: web.Request) -> web.Response:
        states = {u.id: u.healthy for u in self.upstreams.values()}
        view = self.view()
        ok = bool(view.candidates(Phase.PREFILL)) and bool(view.candidates(Phase.DECODE))
        return web.json_response({"healthy": ok, "upstreams": states}, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        m = self.metrics
        for phase, q in self._queues.items():
            m.queue_length.labels(phase.value).set(len(q))
        m.inflight.set(self._inflight)
        for u in self.upstreams.values():
            m.outstanding.labels(u.id).set(u.outstanding)
            m.healthy.labels(u.id).set(1 if u.healthy else 0)
        return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "missing or wrong API key", "unauthorized", "models")
        for up in self.upstreams.values():
            if not up.healthy:
                continue
            try:
                async with self._session.get(up.url + "/v1/models") as resp:
                    if resp.status == 200:
                        self.metrics.answered("models", 200)
                        return web.Response(body=await resp.read(), content_type="application/json")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                continue
        return self._error(503, "no healthy upstream answered /v1/models", "no_instance", "models", True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    def _parse(self, request: web.Request, body: dict, endpoint: str) -> Request:
        if not isinstance(body, dict):
            raise ValueError("body: expected a JSON object")
        if endpoint == "chat" and "messages" not in body:
            raise ValueError("messages: required")
        if endpoint == "completions" and "prompt" not in body:
            raise ValueError("prompt: required")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise ValueError("stream: expected true or false")
        h = request.headers
        # With the model's tokenizer: the engine's own prompt tokens (None for a prompt it cannot reproduce).
        tokens = self.tokenizer.tokens(body, endpoint) if self.tokenizer is not None else None
        exact = tokens is not None
        if exact:
            n_prompt = len(tokens)
        elif "X-Prompt-Tokens" in h:
            n_prompt = _header_int(h, "X-Prompt-Tokens")
        else:
            tokens = prompt_tokens(body)
            n_prompt = len(tokens)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", self.config.default_max_tokens))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
        hashes: tuple[int, ...] = ()
        block = 0
        if self.config.prefix_source == "history" and "X-Prefix-Hashes" in h:
            try:
                hashes = tuple(int(x) for x in h["X-Prefix-Hashes"].split(",") if x.strip())
            except ValueError:
                raise ValueError("X-Prefix-Hashes: expected comma-separated integers") from None
            block = _header_int(h, "X-Hash-Block-Tokens") if "X-Hash-Block-Tokens" in h else 0
            if hashes and block < 1:
                raise ValueError("X-Hash-Block-Tokens: required (>= 1) with X-Prefix-Hashes")
        elif self.config.prefix_source != "none" and (exact or self.tokenizer is None):
            block = self.config.prefix_block_tokens
            salt = body.get("cache_salt") if exact else None
            if salt is not None and not isinstance(salt, str):
                raise ValueError("cache_salt: expected a string")
            hashes = block_hashes(tokens if tokens is not None else prompt_tokens(body), block, salt)
        rid = h.get("X-Request-Id") or ""
        if not rid or rid in self._active_ids:
            rid = f"{rid or 'req'}-{next(self._ids)}"
        return Request(rid, self.now_s(), max(1, n_prompt), max_tokens, hashes, block if hashes else 0)

    async def _handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        timing = _Timing(received=self._loop.time())
        if not self._authorized(request):
            return self._error(401, "missing or wrong API key", "unauthorized", endpoint)
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            return self._error(413, f"body of {request.content_length} bytes exceeds max_body_bytes="
                                    f"{self.config.max_body_bytes}", "too_large", endpoint)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"body exceeds max_body_bytes={self.config.max_body_bytes}", "too_large",
                               endpoint)
        try:
            body = _json_decode(raw)
        except msgspec.DecodeError as e:
            return self._error(400, f"body: malformed JSON ({e})", "bad_request", endpoint)
        try:
            req = self._parse(request, body, endpoint)
        except ValueError as e:
            return self._error(400, str(e), "bad_request", endpoint)
        c = self.config
        if c.max_inflight and self._inflight >= c.max_inflight:
            return self._error(429, f"more than max_inflight={c.max_inflight} requests in flight", "overload",
                               endpoint, True)
        queued = len(self._queues[Phase.PREFILL]) + len(self._queues[Phase.DECODE])
        if queued >= c.max_queued:
            return self._error(503, f"proxy queue full (max_queued={c.max_queued})", "overload", endpoint, True)
        self._inflight += 1
        self._active_ids.add(req.id)
        try:
            error = "no attempt made"
            for attempt in range(c.max_attempts):
                if attempt:
                    self.metrics.retries.inc()
                try:
                    return await self._serve(request, endpoint, body, raw, req, timing)
                except _Retry as e:
                    error = str(e)
                    log.info("request %s attempt %d failed: %s", req.id, attempt + 1, e)
            return self._error(502, f"upstream failed after {c.max_attempts} attempt(s): {error}", "upstream",
                               endpoint)
        except _Reject as e:
            return self._error(e.status, str(e), e.kind, endpoint, e.retry_after)
        except _UpstreamAnswer as e:
            self.metrics.answered(endpoint, e.status)
            return web.Response(status=e.status, body=e.body, content_type=e.content_type)
        except asyncio.CancelledError:
            self.metrics.errors.labels("client_disconnected").inc()
            raise
        finally:
            self._inflight -= 1
            self._active_ids.discard(req.id)

    # -- the two phases -----------------------------------------------------------------------------------------
    async def _serve(self, request: web.Request, endpoint: str, body: dict, raw: bytes, req: Request,
                     timing: _Timing) -> web.StreamResponse:
        """``raw``: the client's body as received; it goes upstream unchanged wherever the body is unchanged."""
        ticket = await self._assign(Phase.PREFILL, req, None)
        up = ticket.up
        timing.predicted_cached_tokens = ticket.cached if req.prefix_hashes else None
        path = _PATHS[endpoint]
        if up.role is not Role.PREFILL:  # colocated, or served whole by a decode instance
            timing.decode_instance = up.id
            timing.decode_dispatch = self._loop.time()
            return await self._final(request, endpoint, path, ticket, body, raw, req, timing)
        timing.prefill_instance = up.id
        timing.prefill_dispatch = self._loop.time()
        kv_params = await self._prefill(ticket, path, body, req, timing)
        timing.prefill_end = self._loop.time()
        ticket = await self._assign(Phase.DECODE, req, up.id)
        timing.decode_instance = ticket.up.id
        timing.decode_dispatch = self._loop.time()
        if self.config.pd_mode == "kv_transfer_params":
            raw = _json_encode({**body, "kv_transfer_params": kv_params})
        return await self._final(request, endpoint, path, ticket, body, raw, req, timing)

    @staticmethod
    def _upstream_headers(req: Request) -> dict[str, str]:
        return {"X-Request-Id": req.id, **_UPSTREAM_HEADERS}

    async def _prefill(self, ticket: _Ticket, path: str, body: dict, req: Request, timing: _Timing
                       ) -> dict | None:
        up = ticket.up
        pbody = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
        pbody["max_tokens"] = 1
        if "max_completion_tokens" in body:
            pbody["max_completion_tokens"] = 1
        pbody["stream"] = False
        if self.config.pd_mode == "kv_transfer_params":
            pbody["kv_transfer_params"] = dict(_PREFILL_PARAMS)
        started = self._loop.time()
        try:
            async with self._session.post(up.endpoint(path), data=_json_encode(pbody),
                                          headers=self._upstream_headers(req)) as resp:
                data = await resp.read()
                status = resp.status
                content_type = resp.content_type
            if status == 200 and ticket.alone and up.outstanding == 1:
                up.observed(BatchSample(self._loop.time() - started, ticket.prompt, 0))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self._failed(up, e)
            raise _Retry(f"prefill on {up.id}: {type(e).__name__}: {e}") from None
        finally:
            self._close(ticket)
        if status >= 500:
            self.metrics.errors.labels("upstream_5xx").inc()
            raise _Retry(f"prefill on {up.id}: HTTP {status}")
        if status != 200:
            raise _UpstreamAnswer(status, data, content_type)
        try:
            answer = _json_decode(data)
            params = answer.get("kv_transfer_params")
            cached = ((answer.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
            timing.prefill_cached_tokens = cached if isinstance(cached, int) else None
        except (msgspec.DecodeError, AttributeError):
            params = None
        if self.config.pd_mode != "kv_transfer_params":
            return None
        if not isinstance(params, dict):
            self.metrics.errors.labels("no_kv_transfer_params").inc()
            raise _Retry(f"prefill on {up.id} returned no kv_transfer_params (is its KV connector a producer?)")
        return params

    def _failed(self, up: UpstreamState, error: BaseException) -> None:
        self.metrics.errors.labels("upstream").inc()
        # Only a refused or unreachable connection proves the engine is gone. A dropped connection can be a pooled
        # keep-alive socket the engine closed as we reused it (seen with vLLM's uvicorn under load): the request is
        # retried, and the health checks decide about the engine.
        if isinstance(error, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
            up.connection_failed(self.config.health_failures)  # back after its next passing health check
            if isinstance(self.prefix, RoutingHistory):
                self.prefix.forget(up.id)  # a restarted engine starts with an empty cache

    async def _final(self, request: web.Request, endpoint: str, path: str, ticket: _Ticket, body: dict,
                     data: bytes, req: Request, timing: _Timing) -> web.StreamResponse:
        """Send ``data`` (``body`` encoded) to the instance that generates the answer and relay the answer."""
        up = ticket.up
        try:
            async with self._session.post(up.endpoint(path), data=data,
                                          headers=self._upstream_headers(req)) as resp:
                if resp.status >= 500:
                    self.metrics.errors.labels("upstream_5xx").inc()
                    raise _Retry(f"{up.id}: HTTP {resp.status}")
                if resp.status != 200:
                    raise _UpstreamAnswer(resp.status, await resp.read(), resp.content_type)
                if not body.get("stream"):
                    data = await resp.read()
                    elapsed = self._loop.time() - timing.received
                    self.metrics.ttft.observe(elapsed)
                    self.metrics.e2e.observe(elapsed)
                    self.metrics.answered(endpoint, 200)
                    return web.Response(body=data, content_type="application/json", headers=timing.headers())
                return await self._relay(request, endpoint, resp, ticket, timing)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self._failed(up, e)
            raise _Retry(f"{up.id}: {type(e).__name__}: {e}") from None
        finally:
            self._close(ticket)

    async def _relay(self, request: web.Request, endpoint: str, resp: aiohttp.ClientResponse, ticket: _Ticket,
                     timing: _Timing) -> web.StreamResponse:
        """Stream SSE bytes as they come. Before the first byte an upstream failure propagates (the caller
        retries); after it, the client gets an SSE error event and no [DONE]."""
        chunk = await resp.content.readany()  # failures here propagate: nothing was sent yet
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **timing.headers()})
        await response.prepare(request)
        self.metrics.ttft.observe(self._loop.time() - timing.received)
        ticket.prompt_done()
        arrivals = []
        while chunk:
            arrivals.append(self._loop.time())
            try:
                await response.write(chunk)
            except (ConnectionError, RuntimeError):  # the client left: drop the upstream request too
                resp.close()
                self.metrics.errors.labels("client_disconnected").inc()
                return response
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                self._failed(ticket.up, e)
                self.metrics.errors.labels("midstream").inc()
                self.metrics.answered(endpoint, 502)
                err = {"error": {"message": f"upstream {ticket.up.id} failed mid-stream: {type(e).__name__}: {e}",
                                 "type": "upstream_error", "code": 502}}
                try:
                    await response.write(b"\n\ndata: " + _json_encode(err) + b"\n\n")
                except (ConnectionError, RuntimeError):
                    pass  # the client is gone too
                return response
        await response.write_eof()
        self.metrics.e2e.observe(self._loop.time() - timing.received)
        self.metrics.answered(endpoint, 200)
        if len(arrivals) >= 4:  # one chunk per decode step: the median gap is the step time
            gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
            ticket.up.observed(BatchSample(gaps[len(gaps) // 2], 0, ticket.up.outstanding))
        return response
