"""One emulated engine behind vLLM's HTTP API: /v1/completions, /v1/chat/completions (SSE or not), /v1/models,
/health, /metrics (vLLM's metric names), vLLM's kv_transfer_params protocol, and KV events over ZMQ.

The prompt is tokenized by backends.common.tokens (token ids exactly, text as whitespace words); every generated
token is the text " x". The engine generates exactly ``max_tokens`` tokens (as vLLM with ignore_eos).

PD: a request with ``kv_transfer_params.do_remote_decode`` is prefilled, answered with one token and with
``kv_transfer_params`` naming this engine and the blocks; a request with ``do_remote_prefill`` skips the prefill
compute: the engine allocates its blocks, its KV crosses the link from ``remote_engine_id`` (``kv_transfer_s(prompt
tokens)`` emulated seconds, one transfer after another per source engine), then it decodes. With a
``shared_store`` (ExampleConnector's shared storage), a ``kv_role="producer"`` engine saves every prompt it
prefills and a ``"consumer"`` engine loads a saved prompt instead of prefilling it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from backends.common.kv_wire import KVEventPublisher
from backends.common.tokens import block_hashes, prompt_tokens
from backends.emulator.engine import EmulatedEngine, EngineSequence
from omnisim.engine import KVLinkQueue

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)


class SharedKVStore:
    """ExampleConnector's shared storage, emulated: the set of prompts whose full KV was saved by a producer."""

    def __init__(self) -> None:
        self._saved: set[int] = set()

    @staticmethod
    def key(tokens) -> int:
        return block_hashes(tokens, len(tokens))[0]

    def save(self, tokens) -> None:
        self._saved.add(self.key(tokens))

    def has(self, tokens) -> bool:
        return self.key(tokens) in self._saved


class EmulatorServer:
    def __init__(self, engine: EmulatedEngine, *, engine_id: str = "engine-0", role: str = "mixed",
                 model_name: str = "omnisim-emulated",
                 host: str = "127.0.0.1", port: int = 0, max_model_len: int = 1 << 17,
                 kv_events_endpoint: str | None = None, kv_transfer_s: Callable[[int], float] | None = None,
                 shared_store: SharedKVStore | None = None, kv_role: str | None = None, log_requests: int = 256,
                 kv_links: dict[str, KVLinkQueue] | None = None):
        if kv_role not in (None, "producer", "consumer", "both"):
            raise ValueError(f"kv_role: expected producer, consumer, both or None, got {kv_role!r}")
        self.engine = engine
        self.engine_id = engine_id
        self.role = role
        self.model_name = model_name
        self.host = host
        self.port = port
        self.max_model_len = max_model_len
        self.kv_transfer_s = kv_transfer_s or (lambda tokens: 0.0)
        # source engine id -> the FIFO its KV leaves through (a fleet shares one dict among its decode engines)
        self.kv_links = {} if kv_links is None else kv_links
        self.shared_store = shared_store
        self.kv_role = kv_role
        self.healthy = True  # tests flip this to make /health fail
        self.crashed = False
        self.received: deque[dict] = deque(maxlen=log_requests)  # latest bodies as received (tests check PD params)
        self.sent_kv: dict[str, dict] = {}  # request id -> kv_transfer_params this engine answered with
        self._kv_events_endpoint = kv_events_endpoint
        self.publisher: KVEventPublisher | None = None
        self._runner: web.AppRunner | None = None
        self._transports: set[Any] = set()
        self._next_rid = 0
        self._next_block_id = 0
        self._metrics()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kv_events_endpoint(self) -> str | None:
        return self.publisher.endpoint if self.publisher else None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._kv_events_endpoint:
            self.publisher = KVEventPublisher(self._kv_events_endpoint)
            self.engine.kv_listener = self.publisher.publish
        await self.engine.start()
        app = web.Application(client_max_size=64 << 20, middlewares=[self._dead_after_crash])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics_handler)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        await self.engine.stop()
        if self.publisher:
            self.publisher.close()
            self.publisher = None

    @web.middleware
    async def _dead_after_crash(self, request: web.Request, handler) -> web.StreamResponse:
        if self.crashed:  # a kept-alive connection to a "killed" engine: reset it
            request.transport.abort()
            raise ConnectionResetError("engine crashed")
        return await handler(request)

    async def crash(self) -> None:
        """Die like a killed process: reset every open connection, stop listening, drop all work."""
        self.crashed = True
        for transport in list(self._transports):
            transport.abort()
        if self._runner:
            for site in list(self._runner.sites):
                await site.stop()
        await self.engine.stop()

    # -- metrics -----------------------------------------------------------------------------------------------
    def _metrics(self) -> None:
        r = self.registry = CollectorRegistry()
        labels = ("model_name", "engine")
        self._g_running = Gauge("vllm:num_requests_running", "Requests in model execution batches", labels,
                                registry=r)
        self._g_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed", labels, registry=r)
        self._g_kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = 100%)", labels, registry=r)
        self._c_prompt = Counter("vllm:prompt_tokens", "Prefill tokens processed", labels, registry=r)
        self._c_gen = Counter("vllm:generation_tokens", "Generation tokens processed", labels, registry=r)
        self._c_queries = Counter("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens", labels,
                                  registry=r)
        self._c_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens", labels, registry=r)
        self._c_preempt = Counter("vllm:num_preemptions", "Cumulative preemptions", labels, registry=r)
        self._c_success = Counter("vllm:request_success", "Finished requests", labels + ("finished_reason",),
                                  registry=r)
        self._h_ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT (emulated seconds)", labels,
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self._h_e2e = Histogram("vllm:e2e_request_latency_seconds", "E2E latency (emulated seconds)", labels,
                                buckets=_LATENCY_BUCKETS, registry=r)
        self._lv = (self.model_name, "0")
        self._last_stats = (0, 0, 0, 0, 0)

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        e, lv = self.engine, self._lv
        self._g_running.labels(*lv).set(len(e.running))
        self._g_waiting.labels(*lv).set(len(e.waiting))
        self._g_kv.labels(*lv).set(e.kv_usage())
        s = e.stats
        now = (s.prompt_tokens, s.generation_tokens, s.prefix_queries, s.prefix_hits, s.preemptions)
        for counter, new, old in zip((self._c_prompt, self._c_gen, self._c_queries, self._c_hits, self._c_preempt),
                                     now, self._last_stats):
            child = counter.labels(*lv)  # exposed from the start, at 0, as vLLM exposes its counters
            if new > old:
                child.inc(new - old)
        self._last_stats = now
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- simple endpoints --------------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "omnisim-emulator",
             "root": self.model_name, "max_model_len": self.max_model_len}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    # -- generation --------------------------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"object": "error", "message": message, "type": "BadRequestError",
                                  "code": status}, status=status)

    def _parse(self, body: Any, chat: bool) -> tuple[list, int, dict | None]:
        if not isinstance(body, dict):
            raise ValueError("body: expected a JSON object")
        if chat and "messages" not in body:
            raise ValueError("messages: required")
        if not chat and "prompt" not in body:
            raise ValueError("prompt: required")
        tokens = prompt_tokens(body)
        if not tokens:  # checked here too, before the shared-storage lookup hashes the prompt
            raise ValueError("prompt: empty")
        if len(tokens) >= self.max_model_len:
            raise ValueError(f"prompt: {len(tokens)} tokens, max_model_len is {self.max_model_len}")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = self.max_model_len - len(tokens)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
        kv = body.get("kv_transfer_params")
        if kv is not None and not isinstance(kv, dict):
            raise ValueError("kv_transfer_params: expected an object")
        if kv and kv.get("do_remote_prefill"):
            for key in ("remote_engine_id", "remote_block_ids", "remote_request_id"):
                if kv.get(key) is None:
                    raise ValueError(f"kv_transfer_params.{key}: required with do_remote_prefill")
        return tokens, max_tokens, kv

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self._transports.add(request.transport)
        try:
            try:
                body = await request.json(loads=json.loads)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return self._error(400, f"body: malformed JSON ({e})")
            try:
                tokens, max_tokens, kv = self._parse(body, chat)
            except ValueError as e:
                return self._error(400, str(e))
            rid = request.headers.get("X-Request-Id") or f"{self.engine_id}-{self._next_rid}"
            self._next_rid += 1
            self.received.append({"request_id": rid, "path": request.path, "body": body})
            remote_kv = bool(kv and kv.get("do_remote_prefill"))
            if not remote_kv and self.kv_role in ("consumer", "both") and self.shared_store is not None:
                remote_kv = self.shared_store.has(tokens)
            try:
                seq = self.engine.make_sequence(rid, tokens, max_tokens, remote_kv)
            except ValueError as e:
                return self._error(400, str(e))
            self.engine.add(seq, self._link(kv.get("remote_engine_id") if kv else None) if remote_kv else None)
            try:
                if body.get("stream"):
                    return await self._stream(request, seq, body, chat)
                return await self._respond(seq, body, chat)
            except (asyncio.CancelledError, ConnectionResetError):
                self.engine.abort(seq)  # client went away: free the engine's work at once
                raise
        finally:
            self._transports.discard(request.transport)

    def _link(self, source_id: str | None) -> KVLinkQueue:
        key = source_id or "shared-storage"
        link = self.kv_links.get(key)
        if link is None:
            link = self.kv_links[key] = self.engine.link(self.kv_transfer_s)
        return link

    def _finished(self, seq: EngineSequence) -> None:
        if seq.error is None:
            lv = self._lv
            self._h_ttft.labels(*lv).observe(seq.first_token_s - seq.arrival_s)
            self._h_e2e.labels(*lv).observe(seq.finish_s - seq.arrival_s)
            self._c_success.labels(*lv, "length").inc()
            if self.shared_store is not None and self.kv_role in ("producer", "both"):
                self.shared_store.save(seq.tokens)

    def _kv_out(self, seq: EngineSequence, kv: dict | None) -> dict | None:
        if not (kv and kv.get("do_remote_decode")):
            return None
        n_blocks = max(1, -(-seq.num_prompt // self.engine.block_size))
        ids = list(range(self._next_block_id, self._next_block_id + n_blocks))
        self._next_block_id += n_blocks
        out = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": ids,
               "remote_engine_id": self.engine_id, "remote_request_id": seq.rid, "remote_host": self.host,
               "remote_port": self.port, "tp_size": 1}
        self.sent_kv[seq.rid] = out
        if len(self.sent_kv) > self.received.maxlen:
            del self.sent_kv[next(iter(self.sent_kv))]  # keep the latest few, like ``received``
        return out

    def _usage(self, seq: EngineSequence) -> dict:
        return {"prompt_tokens": seq.num_prompt, "completion_tokens": seq.generated,
                "total_tokens": seq.num_prompt + seq.generated,
                "prompt_tokens_details": {"cached_tokens": seq.cached_tokens}}

    async def _respond(self, seq: EngineSequence, body: dict, chat: bool) -> web.Response:
        while not seq.done:
            await seq.changed.wait()
            seq.changed.clear()
        if seq.error:
            return web.json_response({"object": "error", "message": seq.error, "type": "InternalServerError",
                                      "code": 500}, status=500)
        self._finished(seq)
        text = " x" * seq.generated
        created = int(time.time())
        if chat:
            out = {"id": f"chatcmpl-{seq.rid}", "object": "chat.completion", "created": created,
                   "model": self.model_name, "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                  "content": text},
                                                          "finish_reason": "length"}]}
        else:
            out = {"id": f"cmpl-{seq.rid}", "object": "text_completion", "created": created,
                   "model": self.model_name, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                          "finish_reason": "length", "stop_reason": None}]}
        out["usage"] = self._usage(seq)
        out["kv_transfer_params"] = self._kv_out(seq, body.get("kv_transfer_params"))
        return web.json_response(out)

    def _chunk(self, seq: EngineSequence, chat: bool, created: int, text: str | None, finish: str | None,
               first: bool) -> bytes:
        if chat:
            delta: dict = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {"id": f"chatcmpl-{seq.rid}", "object": "chat.completion.chunk", "created": created,
                   "model": self.model_name, "choices": [choice]}
        else:
            out = {"id": f"cmpl-{seq.rid}", "object": "text_completion", "created": created,
                   "model": self.model_name, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                                          "finish_reason": finish, "stop_reason": None}]}
        return b"data: " + json.dumps(out, separators=(",", ":")).encode() + b"\n\n"

    async def _stream(self, request: web.Request, seq: EngineSequence, body: dict, chat: bool
                      ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())
        token = self._chunk(seq, chat, created, " x", None, False)  # every middle chunk is the same bytes
        sent = 0
        while True:
            await seq.changed.wait()
            seq.changed.clear()
            if seq.error:
                err = {"error": {"message": seq.error, "type": "InternalServerError", "code": 500}}
                await response.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                return response
            upto = seq.generated
            parts = []
            while sent < upto:
                last = seq.done and sent == upto - 1
                if sent == 0 and chat:
                    parts.append(self._chunk(seq, chat, created, " x", "length" if last else None, True))
                elif last:
                    parts.append(self._chunk(seq, chat, created, " x", "length", False))
                else:
                    parts.append(token)
                sent += 1
            if parts:
                await response.write(b"".join(parts))
            if seq.done:
                break
        self._finished(seq)
        opts = body.get("stream_options") or {}
        if opts.get("include_usage"):
            usage = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{seq.rid}",
                     "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                     "model": self.model_name, "choices": [], "usage": self._usage(seq)}
            await response.write(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        try:
            await response.write_eof()
        except ConnectionError:
            pass  # the client (the proxy) has [DONE] and may close before the stream's terminator, as with vLLM
        return response
