"""The proxy: holds client requests in a prefill and a decode queue and asks the policy where each goes, exactly as
the simulator's proxy driver does; then speaks vLLM's PD protocol to the chosen engines and streams the answer back.

``Proxy`` puts the parts together and runs them; each part is a file of its own:

- http_api.py (``HttpApi``): the aiohttp routes, API key, limits, retries, error answers;
- request_parser.py (``RequestParser``): the OpenAI body -> ``Request`` (validation, token count, prefix hashes);
- dispatcher.py (``Dispatcher``): the queues per phase, the policy calls (on arrival, completion, a timer), the
  validated assignments and their ``Reservation`` at each instance (reservation.py);
- pd_protocol.py (``PDProtocol``): one attempt through the engines (vLLM's kv_transfer_params flow, or colocated),
  relaying the answer;
- engine_poller.py (``EnginePoller``): health checks and /metrics scrapes -> ``UpstreamState`` (upstream_state.py);
- prefix_source.py: where the view's prefix lookups come from (KV events, routing history, or none), chosen once.

The view's ``now_s`` is the proxy's monotonic clock since start.
"""
from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from backends.common.prompt_tokenizer import PromptTokenizer
from backends.proxy.config import ProxyConfig
from backends.proxy.dispatcher import Dispatcher
from backends.proxy.engine_poller import EnginePoller
from backends.proxy.http_api import HttpApi
from backends.proxy.pd_protocol import PDProtocol
from backends.proxy.prefix_source import prefix_source
from backends.proxy.proxy_metrics import ProxyMetrics
from backends.proxy.request_parser import RequestParser
from backends.proxy.trace_recorder import TraceRecorder
from backends.proxy.upstream_state import UpstreamState
from omnisim.core import ClusterView, ProxyPolicy


class _HeaderDeadline:
    """The listening socket's protocol factory: aiohttp's connection handler, and a check ``timeout_s`` later that
    the connection's first request has arrived whole (request line and headers); a client that opened it and sent
    nothing, or stalled in its headers, is disconnected then (aiohttp itself waits for headers forever). Its body
    is bounded by HttpApi (client_read_timeout_s, 408)."""

    def __init__(self, server: web.Server, timeout_s: float, metrics: ProxyMetrics) -> None:
        self.server, self.timeout_s, self.metrics = server, timeout_s, metrics

    def __call__(self):
        handler = self.server()
        asyncio.get_running_loop().call_later(self.timeout_s, self._check, handler)
        return handler

    def _check(self, handler) -> None:
        transport = handler.transport
        if transport is not None and getattr(handler, "_request_count", 1) == 0:
            self.metrics.errors.labels("client_header_timeout").inc()
            transport.close()


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
        self.prefix_source = prefix_source(config, exact_tokens=self.tokenizer is not None)
        self.dispatcher = Dispatcher(policy, self.upstreams, self.prefix_source, self.metrics, self.now_s,
                                     config.schedule_interval_s, config.queue_timeout_s)
        self.serving_ids: set[str] = set()  # the requests being served (unique ids)
        self.parser = RequestParser(config, self.prefix_source, self.tokenizer, self.now_s, self.serving_ids)
        self.api: HttpApi | None = None
        self._t0 = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []

    # -- what callers and tests read ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def prefix(self):
        """The prefix lookup the policy's view uses (a PrefixIndex, a RoutingHistory or NO_PREFIX_CACHE)."""
        return self.prefix_source.lookup

    @property
    def block_map(self):
        """With prefix_source "kv_events" and a tokenizer: the map from engines' block hashes to the proxy's."""
        return self.prefix_source.block_map

    @property
    def subscribers(self) -> list:
        return self.prefix_source.subscribers

    def _kv_events(self, instance_id: str, events) -> None:
        self.prefix_source.on_events(instance_id, events)

    def now_s(self) -> float:
        return self._loop.time() - self._t0

    def view(self) -> ClusterView:
        return self.dispatcher.view()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind config.host:port; start the scheduling timer, health checks, metrics polling and KV events."""
        self._loop = loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        c = self.config
        if c.record_trace:
            TraceRecorder.check_new(c.record_trace)  # before binding anything
        self._session = session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            # Reads are bounded per request by pd_protocol (first token, stream idle, whole answer).
            timeout=aiohttp.ClientTimeout(total=None, connect=c.connect_timeout_s, sock_read=None),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())  # engines' cookies are not ours to keep
        pd = PDProtocol(session, self.dispatcher, self.prefix_source, self.metrics, c.pd_mode, c.health_failures,
                        loop.time, c.first_token_timeout_s, c.stream_idle_timeout_s, c.read_timeout_s)
        self.api = HttpApi(c, self.upstreams, self.metrics, self.dispatcher, self.parser, pd, session,
                           self.serving_ids, loop.time)
        # keepalive_timeout: an idle kept-alive connection, or one stalled in its next request's headers, is closed
        # after client_read_timeout_s too (aiohttp's default is 75 s)
        self._runner = web.AppRunner(self.api.app(), handler_cancellation=True, access_log=None,
                                     keepalive_timeout=c.client_read_timeout_s)
        await self._runner.setup()
        self._server = await loop.create_server(
            _HeaderDeadline(self._runner.server, c.client_read_timeout_s, self.metrics), c.host, c.port,
            backlog=1024, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        if c.record_trace:  # once listening: a failed start leaves no empty trace behind (no await until served)
            self.api.recorder = TraceRecorder(c.record_trace, c.prefix_block_tokens, loop.time)
            pd.count_output = True
        self._tasks.append(self.dispatcher.start(loop))
        poller = EnginePoller(session, self.upstreams, c.health_interval_s, c.health_timeout_s, c.health_failures,
                              c.metrics_interval_s, on_back=self.dispatcher.kick)
        self._tasks += poller.start()
        self._tasks += self.prefix_source.start(self.upstreams.values())

    async def stop(self) -> None:
        """Cancel in-flight work (held requests are answered 503) and close the sockets."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.dispatcher.reject_all("proxy shutting down", "shutdown")
        if self._server:
            self._server.close()  # no new connections; the runner's cleanup ends the open ones
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        if self._server:
            await self._server.wait_closed()
            self._server = None
        if self._session:
            await self._session.close()
            self._session = None
        if self.api is not None and self.api.recorder is not None:
            self.api.recorder.close()
            self.api.recorder = None
