"""Fault injection against the proxy (issue 12): engines that freeze (SIGSTOP), die, stall before or in the middle
of a stream, flap in and out of rotation; PD with one role down; hostile client input. Each checks that every
request ends within its timeout with a clear status, and that /metrics counts every request once."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from backends.emulator import EngineGroup, Fleet, LinearStepTime
from backends.proxy import Proxy, ProxyConfig, ProxyThread, Upstream
from backends.proxy.cli import API_KEY_ENV, load
from omnisim.policies import RoundRobin
from tests.test_proxy import emulator_processes  # noqa: F401 - the fixture: a fleet in its own process

pytestmark = pytest.mark.timeout(20)
REPO = Path(__file__).resolve().parents[1]
FAST = LinearStepTime(overhead_s=0.002, prefill_token_s=1e-5, decode_seq_s=1e-4)
SLOW = LinearStepTime(overhead_s=0.02, prefill_token_s=1e-5, decode_seq_s=1e-4)
# Fault settings: faults show within a fraction of a second.
QUICK = dict(health_interval_s=0.05, health_timeout_s=0.2, health_failures=2, first_token_timeout_s=2.0,
             stream_idle_timeout_s=2.0, read_timeout_s=5.0, client_read_timeout_s=0.5)


def run(coro, timeout: float = 15):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def answered(proxy) -> dict[tuple[str, str], float]:
    """omnisim_proxy_requests by (endpoint, status), as /metrics gives them."""
    out = {}
    for line in proxy.metrics.render().decode().splitlines():
        if line.startswith("omnisim_proxy_requests_total{"):
            labels = dict(kv.split("=") for kv in line[line.index("{") + 1:line.index("}")].split(","))
            out[(labels["endpoint"].strip('"'), labels["status"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return out


def total(proxy) -> float:
    return sum(answered(proxy).values())


async def wait_until(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def sse_events(text: str) -> list:
    return [e.strip()[5:].strip() for e in text.split("\n\n") if e.strip().startswith("data:")]


@asynccontextmanager
async def proxied(upstreams, policy=None, **kw):
    proxy = Proxy(ProxyConfig(upstreams=upstreams, port=0, **{**QUICK, **kw}), policy or RoundRobin())
    await proxy.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            yield proxy, session
    finally:
        await proxy.stop()


@asynccontextmanager
async def cluster(prefill=0, decode=0, mixed=0, model=FAST, **kw):
    groups = [EngineGroup(r, n, model) for r, n in (("prefill", prefill), ("decode", decode), ("mixed", mixed)) if n]
    async with Fleet(groups) as fleet:
        async with proxied(fleet.upstreams(), **kw) as (proxy, session):
            yield fleet, proxy, session


async def post(session, url, body, path="/v1/completions", headers=None):
    async with session.post(url + path, json=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.text()


class StallingEngine:
    """A fake engine that answers /health but stalls: ``mode`` "first" sends the stream's headers and never a
    chunk; "mid" sends one chunk, then nothing."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.received = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.received += 1
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.mode == "mid":
            await response.write(b'data: {"choices": [{"text": " x"}]}\n\n')
        await asyncio.sleep(3600)
        return response

    async def __aenter__(self) -> "StallingEngine":
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/health", lambda r: web.Response(text="ok"))
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


# -- freeze: SIGSTOP on an engine process ------------------------------------------------------------------------

def test_a_frozen_engine_fails_its_streams_cleanly_and_its_unanswered_requests_move(emulator_processes):
    a, frozen = emulator_processes("--mixed", "1", "--overhead-s", "0.01")
    b, _ = emulator_processes("--mixed", "1", "--overhead-s", "0.01")
    ups = (Upstream(a[0]["url"], "mixed", "a"), Upstream(b[0]["url"], "mixed", "b"))
    # Long timeouts: what ends these requests is the engine leaving rotation, not a timeout.
    config = ProxyConfig(upstreams=ups, port=0, **{**QUICK, "first_token_timeout_s": 60,
                                                   "stream_idle_timeout_s": 60, "read_timeout_s": 60})

    async def main(url):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
            stream = await s.post(url + "/v1/completions", json={"prompt": "a b", "max_tokens": 2000, "stream": True})
            assert stream.headers["x-omnisim-decode-instance"] == "a"
            received = await stream.content.readline()
            whole = asyncio.create_task(post(s, url, {"prompt": "a b", "max_tokens": 5}))  # to b (round robin)
            third = asyncio.create_task(post(s, url, {"prompt": "a b", "max_tokens": 300}))  # to a, unanswered
            await asyncio.sleep(0.05)
            frozen.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            async for line in stream.content:
                received += line
            events = sse_events(received.decode())
            assert "[DONE]" not in events
            error = json.loads(events[-1])["error"]
            assert error["code"] == 502 and "a: left rotation" in error["message"]
            assert time.monotonic() - started < 3  # health checks, not the 60 s timeouts
            status, headers, _ = await third
            assert status == 200 and headers["x-omnisim-decode-instance"] == "b"  # retried on the other engine
            assert (await whole)[0] == 200
            frozen.send_signal(signal.SIGCONT)

    with ProxyThread(config, RoundRobin()) as proxy:
        run(main(proxy.url))
        counts = proxy.call(answered, proxy.proxy)
        assert counts == {("completions", "200"): 2, ("completions", "502"): 1}


# -- kill ------------------------------------------------------------------------------------------------------

def test_a_killed_engine_mid_stream_ends_it_with_an_error_counted_once():
    async def main():
        async with cluster(mixed=2, model=SLOW) as (fleet, proxy, s):
            resp = await s.post(proxy.url + "/v1/completions", json={"prompt": "a", "max_tokens": 500, "stream": True})
            await resp.content.readline()
            await fleet["mixed-0"].crash()
            text = (await resp.read()).decode()
            assert "[DONE]" not in text and json.loads(sse_events(text)[-1])["error"]["code"] == 502
            status, headers, _ = await post(s, proxy.url, {"prompt": "a", "max_tokens": 2})
            assert status == 200 and headers["x-omnisim-decode-instance"] == "mixed-1"
            assert answered(proxy) == {("completions", "502"): 1, ("completions", "200"): 1}

    run(main())


def test_with_every_engine_dead_the_502_names_engine_ids_not_addresses():
    async def main():
        async with cluster(mixed=1) as (fleet, proxy, s):
            await fleet["mixed-0"].crash()
            status, _, text = await post(s, proxy.url, {"prompt": "a", "max_tokens": 2})
            assert status == 502 and "mixed-0" in text
            assert "127.0.0.1" not in text and fleet["mixed-0"].url.split(":")[-1] not in text
            assert answered(proxy) == {("completions", "502"): 1}

    run(main())


# -- slow: an engine that stalls -------------------------------------------------------------------------------

def test_no_first_token_in_time_is_retried_on_another_engine():
    async def main():
        async with StallingEngine("first") as stall, Fleet([EngineGroup("mixed", 1, FAST)]) as fleet:
            ups = [Upstream(stall.url, "mixed", "stall"), Upstream(fleet.servers[0].url, "mixed", "good")]
            async with proxied(ups, first_token_timeout_s=0.5) as (proxy, s):
                started = time.monotonic()
                status, headers, text = await post(s, proxy.url, {"prompt": "a", "max_tokens": 3, "stream": True})
                assert status == 200 and headers["x-omnisim-decode-instance"] == "good"
                assert sse_events(text)[-1] == "[DONE]"
                assert 0.5 <= time.monotonic() - started < 2
                assert stall.received == 1  # not retried on the same engine
                assert proxy.metrics.retries._value.get() == 1
                assert answered(proxy) == {("completions", "200"): 1}

    run(main())


def test_a_stream_that_stalls_ends_after_the_idle_timeout_with_an_error():
    async def main():
        async with StallingEngine("mid") as stall:
            async with proxied([Upstream(stall.url, "mixed", "stall")], stream_idle_timeout_s=0.5) as (proxy, s):
                started = time.monotonic()
                status, _, text = await post(s, proxy.url, {"prompt": "a", "max_tokens": 3, "stream": True})
                assert status == 200 and 0.5 <= time.monotonic() - started < 2
                error = json.loads(sse_events(text)[-1])["error"]
                assert error["code"] == 502 and "stream_idle_timeout_s=0.5" in error["message"]
                assert answered(proxy) == {("completions", "502"): 1}

    run(main())


def test_with_only_a_stalling_engine_the_client_gets_502_after_the_first_token_timeout():
    async def main():
        async with StallingEngine("first") as stall:
            async with proxied([Upstream(stall.url, "mixed", "stall")], first_token_timeout_s=0.5) as (proxy, s):
                started = time.monotonic()
                status, _, text = await post(s, proxy.url, {"prompt": "a", "max_tokens": 3, "stream": True})
                assert status == 502 and "first_token_timeout_s=0.5" in text
                assert time.monotonic() - started < 2 and stall.received == 1  # nowhere else: no second try
                assert answered(proxy) == {("completions", "502"): 1}

    run(main())


# -- flap ------------------------------------------------------------------------------------------------------

def test_flapping_health_every_request_ends_clearly_and_is_counted_once():
    async def main():
        async with cluster(mixed=2, model=SLOW) as (fleet, proxy, s):
            stop = asyncio.Event()

            async def flap():
                while not stop.is_set():
                    fleet["mixed-0"].healthy = not fleet["mixed-0"].healthy
                    await asyncio.sleep(0.12)
                fleet["mixed-0"].healthy = True

            flapper = asyncio.create_task(flap())
            n = 40
            results = []
            for k in range(n // 10):
                results += await asyncio.gather(*(post(s, proxy.url, {"prompt": "a b", "max_tokens": 20,
                                                                      "stream": bool(i % 2)})
                                                  for i in range(10)))
            stop.set()
            await flapper
            statuses = [st for st, _, _ in results]
            assert set(statuses) <= {200, 502, 503}
            assert statuses.count(200) >= n // 2
            for st, _, text in results:
                if st == 200 and text.startswith("data:"):
                    events = sse_events(text)
                    assert events[-1] == "[DONE]" or json.loads(events[-1])["error"]["code"] == 502
            assert total(proxy) == n

    run(main())


# -- PD with one role down -------------------------------------------------------------------------------------

@pytest.mark.parametrize("down", ["decode-0", "prefill-0"])
def test_pd_with_one_role_down_answers_503_at_once_and_prefills_nothing(down):
    async def main():
        async with cluster(prefill=1, decode=1) as (fleet, proxy, s):
            fleet[down].healthy = False
            await wait_until(lambda: not proxy.upstreams[down].healthy)
            before = len(fleet["prefill-0"].received)
            started = time.monotonic()
            status, headers, text = await post(s, proxy.url, {"prompt": "a b", "max_tokens": 3})
            assert status == 503 and headers["Retry-After"] == "1" and "no_instance" in text
            assert time.monotonic() - started < 0.5
            assert len(fleet["prefill-0"].received) == before  # no wasted prefill
            assert answered(proxy) == {("completions", "503"): 1}

    run(main())


# -- hostile clients ---------------------------------------------------------------------------------------------

async def raw_http(url: str, data: bytes, timeout: float = 5) -> bytes:
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


def test_hostile_inputs_are_answered_4xx_and_counted():
    async def main():
        async with cluster(mixed=1) as (fleet, proxy, s):
            url = proxy.url + "/v1/completions"
            deep = b'{"prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            async with s.post(url, data=deep, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400 and "nested" in await r.text()
            nested_messages = {"messages": [{"role": "user", "content": json.loads("[" * 500 + "]" * 500)}]}
            status, _, _ = await post(s, proxy.url, nested_messages, path="/v1/chat/completions")
            assert 400 <= status < 500
            for prompt in ([1 << 64], [-1], [[1, 1 << 70]]):
                status, _, text = await post(s, proxy.url, {"prompt": prompt, "max_tokens": 1})
                assert status == 400 and "token ids" in text, text
            status, _, _ = await post(s, proxy.url, {"prompt": "a"}, headers={"X-Prefix-Hashes": str(1 << 80),
                                                                              "X-Hash-Block-Tokens": "16"})
            assert status in (200, 400)
            body = b'{"prompt": "a", "max_tokens": 1}'
            for header in (b"X-Request-Id: \xff\xfe\x80", b"Authorization: Bearer \xff\xfe",
                           b"X-Prompt-Tokens: \xff"):
                head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header
                        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
                answer = await raw_http(proxy.url, head + body)
                assert answer.split(b" ", 2)[1] in (b"200", b"400"), answer[:200]
            status, _, text = await post(s, proxy.url, {"prompt": "a"}, path="/v1/nothing")
            assert status == 404 and json.loads(text)["error"]["code"] == 404
            counts = answered(proxy)
            assert total(proxy) == 10 and counts[("other", "404")] == 1
            assert counts[("completions", "400")] >= 5

    run(main())


def test_an_undecodable_api_key_is_refused_401():
    async def main():
        async with cluster(mixed=1, api_key="secret") as (fleet, proxy, s):
            body = b'{"prompt": "a", "max_tokens": 1}'
            head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
            assert (await raw_http(proxy.url, head + body)).startswith(b"HTTP/1.1 401")
            assert answered(proxy) == {("completions", "401"): 1}

    run(main())


def test_a_client_that_stalls_after_its_headers_gets_408():
    async def main():
        async with cluster(mixed=1) as (fleet, proxy, s):
            head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"prompt\":")
            started = time.monotonic()
            answer = await raw_http(proxy.url, head)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 2
            assert answered(proxy) == {("completions", "408"): 1}

    run(main())


def test_a_client_that_stalls_in_its_headers_is_disconnected():
    async def main():
        async with cluster(mixed=1) as (fleet, proxy, s):
            started = time.monotonic()
            answer = await raw_http(proxy.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            assert answer == b"" and 0.4 < time.monotonic() - started < 2  # client_read_timeout_s=0.5
            assert proxy.metrics.errors.labels("client_header_timeout")._value.get() == 1
            assert (await post(s, proxy.url, {"prompt": "a", "max_tokens": 1}))[0] == 200  # others unaffected

    run(main())


def test_a_kept_alive_connection_that_stalls_in_its_next_headers_is_closed():
    async def main():
        async with cluster(mixed=1) as (fleet, proxy, s):
            host, port = proxy.url.split("//")[1].split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # one whole request, kept alive
                await writer.drain()
                assert (await asyncio.wait_for(reader.read(65536), 5)).startswith(b"HTTP/1.1 200")
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the next one stalls in its headers
                await writer.drain()
                started = time.monotonic()
                assert await asyncio.wait_for(reader.read(65536), 5) == b""  # closed, not left open for 75 s
                assert time.monotonic() - started < 2  # client_read_timeout_s=0.5
            finally:
                writer.close()

    run(main())


# -- settings ----------------------------------------------------------------------------------------------------

def test_timeouts_are_checked():
    ups = (Upstream("http://127.0.0.1:1"),)
    for name in ("first_token_timeout_s", "stream_idle_timeout_s", "client_read_timeout_s"):
        for bad in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=name):
                ProxyConfig(upstreams=ups, **{name: bad})


def test_the_api_key_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    config, _, _ = load(["--upstream", "mixed=http://127.0.0.1:1"])
    assert config.api_key == "from-env"
    config, _, _ = load(["--upstream", "mixed=http://127.0.0.1:1", "--api-key", "flag"])
    assert config.api_key == "flag"


def test_cli_answers_bad_settings_with_one_line_and_exit_2(tmp_path):
    cases = {"malformed.yaml": "upstreams: [{url: x\n  bad: [\n",
             "negative.yaml": "upstreams: [{url: 'http://127.0.0.1:1', role: mixed}]\nhealth_interval_s: -1\n"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases["busy.yaml"] = (f"upstreams: [{{url: 'http://127.0.0.1:1', role: mixed}}]\n"
                              f"port: {busy.getsockname()[1]}\n")
        for name, text in cases.items():
            (tmp_path / name).write_text(text)
            done = subprocess.run([sys.executable, "-m", "backends.proxy.cli", "--config", str(tmp_path / name)],
                                  cwd=REPO, capture_output=True, text=True, timeout=20)
            assert done.returncode == 2, (name, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("omnisim-proxy: ") and "Traceback" not in done.stderr


def test_loadgen_exits_nonzero_when_nothing_was_served(tmp_path, capsys):
    from backends.loadgen.__main__ import main

    config = ProxyConfig(upstreams=(Upstream("http://127.0.0.1:1"),), port=0, **QUICK)
    with ProxyThread(config, RoundRobin()) as proxy:
        code = main(["--url", proxy.url, "--model", "m", "--workload",
                     str(REPO / "conf" / "workload" / "poisson.yaml"), "--set", "max_requests=3",
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("loadgen: nothing was served at")
