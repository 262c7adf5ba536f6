"""Replay of an omnisim workload against an OpenAI-compatible endpoint: open loop, or a closed loop of clients.

Open loop: each request is sent at its recorded ``arrival_s`` (times ``time_scale``) whether or not earlier ones
finished. Closed loop (``omnisim.workload.ClosedLoopWorkload``): each of N clients sends its next request when its
last one has ended, as the simulator does for the same workload. Each request streams its answer and becomes one
row in omnisim.metrics' record schema, whatever happens to it: "ok", "dropped" (the server refused it with 429 or
503) or "error" (anything else, including a stream that ended without [DONE] or with an error event, and a
timeout). Times are seconds since the replay's start divided by ``time_scale``, so
they are comparable with a simulation of the same workload.

What a client cannot observe stays NaN (prefill_start_s, kv_transfer_end_s); prefill_dispatch_s, prefill_end_s and
decode_dispatch_s and the instance ids come from the omnisim proxy's x-omnisim-* response headers when present
(proxy-relative times added to the send time: exact up to the loopback latency). cached_tokens comes from the
answer's usage.prompt_tokens_details (0 if absent); preemptions are not observable and recorded as 0.
"""
from __future__ import annotations

import asyncio
import json
import math
from typing import Iterable

import aiohttp

from backends.loadgen.prompt_synthesizer import PromptSynthesizer
from omnisim.core import Request
from omnisim.metrics import RECORD_COLUMNS, records_frame
from omnisim.workload import ClientPool, ClosedLoopWorkload, Workload

NAN = math.nan
ENDPOINTS = ("completions", "chat")


class LoadGenerator:
    def __init__(self, base_url: str, *, endpoint: str = "completions", model: str | None = None,
                 api_key: str | None = None, stream: bool = True, prompt_format: str = "text",
                 vocab_size: int = 32000, seed: int = 0, time_scale: float = 1.0, request_timeout_s: float = 600.0,
                 ignore_eos: bool = True, send_prefix_hashes: bool = True) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint: expected one of {ENDPOINTS}, got {endpoint!r}")
        if endpoint == "chat" and prompt_format != "text":
            raise ValueError("prompt_format: chat requests need text prompts")
        if not time_scale > 0:
            raise ValueError(f"time_scale: must be > 0, got {time_scale}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s: must be > 0, got {request_timeout_s}")
        self.base_url = base_url.rstrip("/")
        self.endpoint = endpoint
        self.model = model
        self.api_key = api_key
        self.stream = stream
        self.synth = PromptSynthesizer(seed, prompt_format, vocab_size)
        self.time_scale = time_scale
        self.request_timeout_s = request_timeout_s
        self.ignore_eos = ignore_eos
        self.send_prefix_hashes = send_prefix_hashes

    def replay(self, requests: Iterable[Request] | Workload):
        """Synchronous replay: a records DataFrame (omnisim.metrics schema), one row per request."""
        return records_frame(asyncio.run(self.run(requests)))

    async def run(self, requests: Iterable[Request] | Workload) -> list[tuple]:
        """Replay ``requests`` (arrival order) or a workload's requests; rows in RECORD_COLUMNS order, in the order
        requests were sent. A ``ClosedLoopWorkload`` runs as its closed loop, and its rows carry the client."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            if self.model is None:
                self.model = await self._served_model(session)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            if isinstance(requests, ClosedLoopWorkload):
                return await self._closed_loop(session, requests.clients(), t0)
            if isinstance(requests, Workload):
                requests = requests.requests()
            tasks = []
            for req in requests:
                delay = t0 + req.arrival_s * self.time_scale - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._send(session, req, t0)))
            return list(await asyncio.gather(*tasks))

    async def _closed_loop(self, session: aiohttp.ClientSession, pool: ClientPool, t0: float) -> list[tuple]:
        """Each client sends its next request when its last one has ended (+ think time), the same ClientPool the
        simulator drives, on the wall clock (workload seconds = wall seconds since t0 / time_scale)."""
        loop = asyncio.get_running_loop()
        scale = self.time_scale
        ended = asyncio.Event()
        tasks = []

        async def client(number: int, req: Request) -> tuple:
            try:
                row = await self._send(session, req, t0)
            finally:  # every end frees the client, or the loop would wait for it forever
                pool.finished(req.id, (loop.time() - t0) / scale)
                ended.set()
            return (*row, number)

        while True:
            for number, req in pool.take((loop.time() - t0) / scale):
                tasks.append(asyncio.create_task(client(number, req)))
            due = pool.due()
            if due is None and pool.in_flight == 0:
                break
            ended.clear()  # no await since take(): every end so far is in the pool already
            wait = None if due is None else max(0.0, t0 + due * scale - loop.time())
            try:
                await asyncio.wait_for(ended.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return list(await asyncio.gather(*tasks))

    async def _served_model(self, session: aiohttp.ClientSession) -> str:
        try:
            async with session.get(self.base_url + "/v1/models", headers=self._auth()) as resp:
                data = await resp.json(content_type=None)
                return data["data"][0]["id"]
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"model: cannot read the served model from {self.base_url}/v1/models ({e}); "
                             "give the model's name") from None

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _body(self, req: Request) -> dict:
        prompt = self.synth.prompt(req)
        body: dict = {"model": self.model, "max_tokens": req.output_tokens, "stream": self.stream}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    def _headers(self, req: Request) -> dict[str, str]:
        h = {"X-Request-Id": req.id, "X-Prompt-Tokens": str(req.prompt_tokens), **self._auth()}
        if self.send_prefix_hashes and req.prefix_hashes:
            h["X-Prefix-Hashes"] = ",".join(map(str, req.prefix_hashes))
            h["X-Hash-Block-Tokens"] = str(req.hash_block_tokens)
        return h

    async def _send(self, session: aiohttp.ClientSession, req: Request, t0: float) -> tuple:
        loop = asyncio.get_running_loop()
        scale = self.time_scale
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        body, headers = self._body(req), self._headers(req)
        sent = loop.time()
        rec = _Outcome()
        try:
            async with session.post(self.base_url + path, json=body, headers=headers) as resp:
                rec.read_headers(resp.headers, sent)
                if resp.status != 200:
                    text = (await resp.text())[:300]
                    rec.fail("dropped" if resp.status in (429, 503) else "error", f"HTTP {resp.status}: {text}")
                elif self.stream:
                    await rec.read_stream(resp, loop, self.endpoint == "chat")
                else:
                    rec.read_json(await resp.json(content_type=None), loop.time(), self.endpoint == "chat")
        except asyncio.TimeoutError:
            rec.fail("error", f"timeout after {self.request_timeout_s} s")
        except (aiohttp.ClientError, OSError, ValueError) as e:
            rec.fail("error", f"{type(e).__name__}: {e}")
        if rec.status == "ok" and rec.finish is None:
            rec.finish = loop.time()

        def rel(t: float | None) -> float:
            return NAN if t is None else (t - t0) / scale

        row = (req.id, rel(sent), req.prompt_tokens, rec.output_tokens, rec.cached_tokens, rec.prefill_instance,
               rec.decode_instance, rel(rec.prefill_dispatch), NAN, rel(rec.prefill_end), rel(rec.decode_dispatch),
               NAN, rel(rec.first_token), rel(rec.finish), 0, rec.status, rec.error)
        assert len(row) == len(RECORD_COLUMNS)
        return row


class _Outcome:
    """What one request's answer told us."""

    def __init__(self) -> None:
        self.status = "ok"
        self.error = ""
        self.output_tokens = 0
        self.cached_tokens = 0
        self.prefill_instance = ""
        self.decode_instance = ""
        self.prefill_dispatch = self.prefill_end = self.decode_dispatch = None
        self.first_token: float | None = None
        self.finish: float | None = None
        self._prefill_cached: str | None = None

    def fail(self, status: str, error: str) -> None:
        self.status, self.error = status, error

    def read_headers(self, h, sent: float) -> None:
        self.prefill_instance = h.get("x-omnisim-prefill-instance", "")
        self.decode_instance = h.get("x-omnisim-decode-instance", "")
        for attr, name in (("prefill_dispatch", "prefill-dispatch"), ("prefill_end", "prefill-end"),
                           ("decode_dispatch", "decode-dispatch")):
            if f"x-omnisim-{name}-s" in h:
                setattr(self, attr, sent + float(h[f"x-omnisim-{name}-s"]))
        self._prefill_cached = h.get("x-omnisim-prefill-cached-tokens")

    def _usage(self, usage) -> None:
        if isinstance(usage, dict):
            self.output_tokens = int(usage.get("completion_tokens", self.output_tokens))
            details = usage.get("prompt_tokens_details") or {}
            self.cached_tokens = int(details.get("cached_tokens") or 0)
        if self._prefill_cached is not None:  # disaggregated: the prefill instance's hits are the cache hits
            self.cached_tokens = int(self._prefill_cached)

    def read_json(self, data, now: float, chat: bool) -> None:
        try:  # an answer of another shape is this request's error, not the replay's
            choice = data["choices"][0] if data["choices"] else {}
            text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
            self.output_tokens = len((text or "").split())
            self._usage(data.get("usage"))
        except (ValueError, TypeError, KeyError, AttributeError):
            self.fail("error", f"unexpected answer: {str(data)[:200]}")
            return
        self.first_token = self.finish = now

    async def read_stream(self, resp: aiohttp.ClientResponse, loop, chat: bool) -> None:
        done = False
        counted = 0
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            try:  # an event of another shape is this request's error, not the replay's
                event = json.loads(payload)
                if "error" in event:
                    err = event["error"]
                    self.fail("error", str(err.get("message", err)) if isinstance(err, dict) else str(err))
                    return
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    # A completion chunk is one token even when its text is empty (vLLM holds back the text of a
                    # token that ends inside a UTF-8 character, but still sends its chunk); a chat stream's first
                    # chunk carries only the role, so there empty content is no token.
                    if text or (not chat and text is not None):
                        counted += 1
                        if self.first_token is None:
                            self.first_token = loop.time()
                if event.get("usage"):
                    self._usage(event["usage"])
            except (ValueError, TypeError, KeyError, AttributeError):
                self.fail("error", f"malformed SSE event: {payload[:200]!r}")
                return
        self.finish = loop.time()
        if not self.output_tokens:
            self.output_tokens = counted
        if not done:
            self.fail("error", "stream ended without [DONE] (truncated)")
