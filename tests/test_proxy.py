"""The proxy against emulated engines: routing by every policy, vLLM's PD protocol, limits and faults."""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from backends.common.tokens import block_hashes
from backends.emulator import EngineGroup, Fleet, LinearStepTime
from backends.proxy import Proxy, ProxyConfig, ProxyThread, Upstream
from backends.proxy.upstream_state import UpstreamState
from omnisim.app import compose_option
from omnisim.core import Assignment, BatchSample, Phase, Request
from omnisim.policies import RoundRobin

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
FAST = LinearStepTime(overhead_s=0.002, prefill_token_s=1e-5, decode_seq_s=1e-4)
SLOW = LinearStepTime(overhead_s=0.02, prefill_token_s=1e-5, decode_seq_s=1e-4)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@asynccontextmanager
async def cluster(prefill=0, decode=0, mixed=0, policy=None, model=FAST, fleet_kw=None, **proxy_kw):
    groups = [EngineGroup(r, n, model) for r, n in (("prefill", prefill), ("decode", decode), ("mixed", mixed)) if n]
    async with Fleet(groups, **(fleet_kw or {})) as fleet:
        proxy_kw.setdefault("health_interval_s", 0.05)
        proxy = Proxy(ProxyConfig(upstreams=fleet.upstreams(), port=0, **proxy_kw), policy or RoundRobin())
        await proxy.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                yield fleet, proxy, session
        finally:
            await proxy.stop()


async def post(session, url, body, path="/v1/completions", headers=None):
    async with session.post(url + path, json=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.text()


async def wait_until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def sse_events(text: str) -> list:
    return [e[5:].strip() for e in text.split("\n\n") if e.strip().startswith("data:")]


# -- vLLM's PD protocol ------------------------------------------------------------------------------------------

def test_pd_kv_transfer_params_are_passed_through_exactly():
    async def main():
        async with cluster(prefill=1, decode=1) as (fleet, proxy, s):
            body = {"prompt": "one two three four five", "max_tokens": 4, "stream": True, "min_tokens": 2,
                    "stream_options": {"include_usage": True}, "temperature": 0.5}
            status, headers, text = await post(s, proxy.url, body, headers={"X-Request-Id": "abc"})
            assert status == 200
            events = sse_events(text)
            assert events[-1] == "[DONE]"
            assert headers["x-omnisim-prefill-instance"] == "prefill-0"
            assert headers["x-omnisim-decode-instance"] == "decode-0"
            pre = fleet["prefill-0"].received[-1]
            dec = fleet["decode-0"].received[-1]
            assert pre["request_id"] == dec["request_id"] == "abc"
            expected_prefill = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
            expected_prefill.update(max_tokens=1, stream=False, kv_transfer_params={
                "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                "remote_block_ids": None, "remote_host": None, "remote_port": None})
            assert pre["body"] == expected_prefill
            sent = fleet["prefill-0"].sent_kv["abc"]
            assert dec["body"] == {**body, "kv_transfer_params": sent}  # exactly what prefill answered
            assert fleet["decode-0"].engine.stats.kv_loaded == 1
            # chat, with max_completion_tokens, not streamed
            chat = {"messages": [{"role": "user", "content": "hi there you"}], "max_completion_tokens": 3}
            status, _, text = await post(s, proxy.url, chat, "/v1/chat/completions")
            assert status == 200
            assert json.loads(text)["usage"]["completion_tokens"] == 3
            pre = fleet["prefill-0"].received[-1]["body"]
            assert pre["max_completion_tokens"] == 1 and pre["max_tokens"] == 1 and pre["stream"] is False
            assert fleet["decode-0"].received[-1]["body"]["max_completion_tokens"] == 3

    run(main())


def test_shared_storage_pd_flow_sends_the_same_prompt_twice():
    async def main():
        async with cluster(prefill=1, decode=1, pd_mode="shared_storage", fleet_kw={"shared_storage": True}) as (
                fleet, proxy, s):
            body = {"prompt": "alpha beta gamma delta", "max_tokens": 5}
            status, _, text = await post(s, proxy.url, body)
            assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 5
            pre = fleet["prefill-0"].received[-1]["body"]
            assert pre == {**body, "max_tokens": 1, "stream": False}
            assert fleet["decode-0"].received[-1]["body"] == body
            assert fleet["decode-0"].engine.stats.kv_loaded == 1  # decode loaded the stored KV, no recompute

    run(main())


# -- routing -----------------------------------------------------------------------------------------------------

class Recording:
    """Wraps a policy and remembers every assignment it made."""

    def __init__(self, inner):
        self.inner = inner
        self.assigned: dict[tuple[str, Phase], str] = {}

    def schedule(self, phase, queue, view):
        out = self.inner.schedule(phase, queue, view)
        for a in out:
            self.assigned[(a.request_id, phase)] = a.instance_id
        return out


POLICIES = sorted(p.stem for p in (REPO / "conf" / "proxy").glob("*.yaml"))


def make_policy(name: str, seed: int = 0):
    root = OmegaConf.create({"seed": seed, "proxy": compose_option("proxy", name)})  # defaults list applied
    return instantiate(root.proxy, _convert_="all")


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_routes_each_request_where_it_decided(name):
    async def main(topology):
        policy = Recording(make_policy(name))
        async with cluster(**topology, policy=policy, queue_timeout_s=20) as (fleet, proxy, s):
            prompts = [" ".join(["w"] * n) for n in (8, 40, 700, 30, 8, 300, 64, 900)]

            async def one(k, prompt):
                return await post(s, proxy.url, {"prompt": prompt, "max_tokens": 3, "stream": k % 2 == 0},
                                  headers={"X-Request-Id": f"r{k}"})

            answers = await asyncio.gather(*(one(k, p) for k, p in enumerate(prompts)))
            answers += [await one(len(prompts) + k, p) for k, p in enumerate(prompts[:3])]
            roles = {u.id: u.role for u in proxy.config.upstreams}
            for k, (status, headers, text) in enumerate(answers):
                assert status == 200, text
                first = policy.assigned[(f"r{k}", Phase.PREFILL)]
                if roles[first] == "prefill":
                    assert headers["x-omnisim-prefill-instance"] == first
                    assert headers["x-omnisim-decode-instance"] == policy.assigned[(f"r{k}", Phase.DECODE)]
                    assert roles[headers["x-omnisim-decode-instance"]] == "decode"
                else:  # served whole where the PREFILL-phase assignment pointed
                    assert headers["x-omnisim-prefill-instance"] == ""
                    assert headers["x-omnisim-decode-instance"] == first
            await wait_until(lambda: all(u.outstanding == 0 for u in proxy.upstreams.values()))
            assert all(u.inflight_prompt_tokens == 0 and u.decode_tokens == 0 for u in proxy.upstreams.values())

    run(main({"prefill": 2, "decode": 2}))
    run(main({"mixed": 3}))


def test_round_robin_alternates_and_dispatch_metrics_count_it():
    async def main():
        async with cluster(mixed=2) as (fleet, proxy, s):
            seen = []
            for _ in range(4):
                status, headers, _ = await post(s, proxy.url, {"prompt": "a b", "max_tokens": 1})
                seen.append(headers["x-omnisim-decode-instance"])
            assert seen == ["mixed-0", "mixed-1", "mixed-0", "mixed-1"]
            async with s.get(proxy.url + "/metrics") as r:
                text = await r.text()
            assert 'omnisim_proxy_dispatches_total{instance="mixed-0",phase="prefill"} 2.0' in text
            assert 'omnisim_proxy_requests_total{endpoint="completions",status="200"} 4.0' in text
            assert "omnisim_proxy_ttft_seconds_count 4.0" in text
            assert 'omnisim_proxy_queue_length{phase="prefill"} 0.0' in text

    run(main())


def test_instance_states_combine_own_accounting_with_engine_metrics():
    async def main():
        async with cluster(prefill=1, decode=1, model=SLOW, metrics_interval_s=0.05) as (fleet, proxy, s):
            long = asyncio.create_task(post(s, proxy.url, {"prompt": "a b c", "max_tokens": 50, "stream": True}))
            dec = proxy.upstreams["decode-0"]
            await wait_until(lambda: dec.outstanding == 1 and dec.engine_running == 1)
            state = proxy.view().instance("decode-0")
            assert (state.num_running, state.num_waiting) == (1, 0)
            assert state.decode_tokens == 3 + 50 and state.kv_usage > 0
            assert proxy.view().instance("prefill-0").inflight_prompt_tokens == 0  # prefill is over
            assert (await long)[0] == 200
            await wait_until(lambda: dec.engine_running == 0)
            assert proxy.view().instance("decode-0").decode_tokens == 0
            # what the proxy saw of engine steps: the stream's chunk gaps and the lone prefill's duration
            (step,) = proxy.view().instance("decode-0").recent_batches
            assert step.decode_seqs == 1 and step.prefill_tokens == 0
            assert step.duration_s == pytest.approx(0.0201, abs=0.008)  # SLOW: 20 ms + 0.1 ms per sequence
            (prefill,) = proxy.view().instance("prefill-0").recent_batches
            assert prefill.prefill_tokens == 3 and 0.02 <= prefill.duration_s < 0.1

    run(main())


def test_an_upstreams_snapshot_is_reused_until_its_state_changes():
    up = UpstreamState(Upstream("http://127.0.0.1:1", "decode", "d"))
    assert up.snapshot() is up.snapshot()  # unchanged: the policy's view reuses it
    changes = [lambda: up.assigned(100, 120), lambda: up.prefilled(100), lambda: up.engine_reported(1, 0, 0.5),
               lambda: up.observed(BatchSample(0.01, 0, 1)), lambda: up.check_failed(1), up.check_passed,
               lambda: up.connection_failed(1), lambda: up.finished(120)]
    for change in changes:
        before = up.snapshot()
        change()
        assert up.snapshot() != before and up.snapshot() == up._build_snapshot()  # never stale
    state = up.snapshot()
    assert (state.healthy, state.num_running, state.decode_tokens, state.kv_usage) == (False, 0, 0, 0.5)


def test_a_16p4d_fleet_runs_in_one_process_behind_the_proxy():
    from backends.loadgen import LoadGenerator

    async def main():
        async with cluster(prefill=16, decode=4, fleet_kw={"time_scale": 0.2}) as (fleet, proxy, s):
            requests = [Request(f"r{i}", 0.01 * i, 200 + 10 * i, 8) for i in range(64)]
            return await LoadGenerator(proxy.url, seed=0, time_scale=0.2).run(requests)

    rows = run(main())
    assert [r[-2] for r in rows] == ["ok"] * 64
    assert {r[5] for r in rows} == {f"prefill-{i}" for i in range(16)}  # round robin reaches every instance
    assert {r[6] for r in rows} == {f"decode-{i}" for i in range(4)}


class OneAtATime:
    """Holds requests until an instance has nothing running (exercises hold and re-dispatch on completion)."""

    def __init__(self):
        self.longest_queue = 0

    def schedule(self, phase, queue, view):
        self.longest_queue = max(self.longest_queue, len(queue))
        free = [s for s in view.candidates(phase) if s.num_running + s.num_waiting == 0]
        return [Assignment(w.request.id, s.id) for w, s in zip(queue, free)]


def test_held_requests_wait_for_room_and_go_on_completion():
    async def main():
        policy = OneAtATime()
        async with cluster(mixed=1, policy=policy, metrics_interval_s=0) as (fleet, proxy, s):
            engine = fleet["mixed-0"].engine
            busiest = 0

            async def watch():
                nonlocal busiest
                while True:
                    busiest = max(busiest, len(engine.running) + len(engine.waiting))
                    await asyncio.sleep(0.001)  # each request keeps the engine busy for >= 6 ms

            watcher = asyncio.create_task(watch())
            answers = await asyncio.gather(*(post(s, proxy.url, {"prompt": "a b c", "max_tokens": 3})
                                             for _ in range(4)))
            watcher.cancel()
            assert [a[0] for a in answers] == [200] * 4
            assert policy.longest_queue >= 2  # requests were held in the proxy...
            assert busiest == 1  # ...so the engine only ever had one at a time
            assert engine.stats.finished == 4

    run(main())


class DeepestPrefix:
    """Requests whose id starts with "pin-" go to the last candidate; the others to the candidate with the most
    cached prompt tokens (ties: the first)."""

    def schedule(self, phase, queue, view):
        cands = view.candidates(phase)
        out = []
        for w in queue:
            best = cands[-1] if w.request.id.startswith("pin-") else max(
                cands, key=lambda c: view.cached_tokens(w.request, c.id))
            out.append(Assignment(w.request.id, best.id))
        return out


@pytest.mark.parametrize("source", ["kv_events", "history"])
def test_prefix_index_from_kv_events_or_routing_history(source):
    async def main():
        async with cluster(mixed=3, policy=DeepestPrefix(), prefix_source=source,
                           fleet_kw={"kv_events": source == "kv_events"}) as (fleet, proxy, s):
            shared = [f"s{i}" for i in range(64)]
            status, headers, _ = await post(s, proxy.url, {"prompt": " ".join(shared + ["first"]), "max_tokens": 1},
                                            headers={"X-Request-Id": "pin-1"})
            assert status == 200 and headers["x-omnisim-decode-instance"] == "mixed-2"
            second = shared + ["second"]
            probe = Request("probe", 0.0, len(second), 1, block_hashes(second, 16), 16)
            await wait_until(lambda: proxy.prefix.cached_tokens(probe, "mixed-2") == 64)
            assert proxy.prefix.cached_tokens(probe, "mixed-0") == 0
            status, headers, text = await post(s, proxy.url, {"prompt": " ".join(second), "max_tokens": 1})
            assert headers["x-omnisim-decode-instance"] == "mixed-2"
            assert json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"] == 64  # 4 blocks of 16
            assert headers["x-omnisim-predicted-cached-tokens"] == "64"  # what the index told the policy

    run(main())


def test_the_prefix_source_decides_where_request_hashes_come_from():
    from backends.proxy.prefix_source import (
        KVEventPrefixSource, NoPrefixSource, RoutingHistoryPrefixSource, prefix_source,
    )
    from backends.proxy.request_parser import RequestParser

    ups = (Upstream("http://127.0.0.1:1", kv_events="tcp://127.0.0.1:1"),)
    words = [f"w{i}" for i in range(40)]
    body = {"prompt": " ".join(words), "max_tokens": 2}
    given = {"X-Prefix-Hashes": "7,8", "X-Hash-Block-Tokens": "512"}
    own = block_hashes(words, 16)
    for source, kind, with_header, without in [("history", RoutingHistoryPrefixSource, (7, 8), own),
                                               ("kv_events", KVEventPrefixSource, own, own),
                                               ("none", NoPrefixSource, (), ())]:
        config = ProxyConfig(upstreams=ups, prefix_source=source)
        chosen = prefix_source(config, exact_tokens=False)
        assert type(chosen) is kind and chosen.name == source and chosen.block_map is None
        parser = RequestParser(config, chosen, None, lambda: 0.0, set())
        assert parser.parse(given, body, "completions").prefix_hashes == with_header, source
        assert parser.parse({}, body, "completions").prefix_hashes == without, source


# -- limits and bad input ----------------------------------------------------------------------------------------

def test_bad_requests_are_refused_with_clear_errors():
    async def main():
        async with cluster(mixed=1, api_key="sekret", max_body_bytes=2000) as (fleet, proxy, s):
            ok = {"Authorization": "Bearer sekret"}
            body = {"prompt": "a b", "max_tokens": 1}
            assert (await post(s, proxy.url, body))[0] == 401
            assert (await post(s, proxy.url, body, headers={"Authorization": "Bearer nope"}))[0] == 401
            async with s.get(proxy.url + "/v1/models") as r:
                assert r.status == 401
            assert (await post(s, proxy.url, body, headers=ok))[0] == 200
            async with s.get(proxy.url + "/v1/models", headers=ok) as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == "omnisim-emulated"
            async with s.post(proxy.url + "/v1/completions", data=b"{not json", headers=ok) as r:
                assert r.status == 400 and "malformed JSON" in (await r.json())["error"]["message"]
            status, _, text = await post(s, proxy.url, {"prompt": "x " * 5000}, headers=ok)
            assert status == 413 and "max_body_bytes" in text
            status, _, text = await post(s, proxy.url, {"prompt": "a", "max_tokens": -1}, headers=ok)
            assert status == 400 and "max_tokens" in text
            status, _, text = await post(s, proxy.url, {"max_tokens": 2}, headers=ok)
            assert status == 400 and "prompt" in text
            status, _, text = await post(s, proxy.url, {"prompt": "a"}, "/v1/chat/completions", headers=ok)
            assert status == 400 and "messages" in text
            status, _, text = await post(s, proxy.url, body, headers={**ok, "X-Prompt-Tokens": "many"})
            assert status == 400 and "X-Prompt-Tokens" in text
            status, _, text = await post(s, proxy.url, body, headers={**ok, "X-Prefix-Hashes": "1,x"})
            assert status == 400 and "X-Prefix-Hashes" in text
            async with s.get(proxy.url + "/health") as r:  # health and metrics need no key
                assert r.status == 200
            assert fleet["mixed-0"].engine.stats.finished == 1  # nothing bad reached the engine

    run(main())


class HoldAll:
    def schedule(self, phase, queue, view):
        return []


def test_overload_answers_429_and_503_with_retry_after():
    async def main():
        async with cluster(mixed=1, model=SLOW, max_inflight=1) as (fleet, proxy, s):
            slow = asyncio.create_task(post(s, proxy.url, {"prompt": "a", "max_tokens": 20}))
            await wait_until(lambda: proxy.api.inflight == 1)
            status, headers, _ = await post(s, proxy.url, {"prompt": "a", "max_tokens": 1})
            assert status == 429 and headers["Retry-After"] == "1"
            assert (await slow)[0] == 200
        async with cluster(mixed=1, policy=HoldAll(), max_queued=1, queue_timeout_s=0.3) as (fleet, proxy, s):
            held = asyncio.create_task(post(s, proxy.url, {"prompt": "a", "max_tokens": 1}))
            await wait_until(lambda: len(proxy.dispatcher.queues[Phase.PREFILL]) == 1)
            status, headers, text = await post(s, proxy.url, {"prompt": "a", "max_tokens": 1})
            assert status == 503 and "Retry-After" in headers and "queue full" in text
            status, headers, text = await held  # then the held one times out
            assert status == 503 and "Retry-After" in headers and "queue_timeout_s" in text
        async with cluster(mixed=1) as (fleet, proxy, s):
            fleet["mixed-0"].healthy = False
            await wait_until(lambda: not proxy.upstreams["mixed-0"].healthy)
            status, headers, text = await post(s, proxy.url, {"prompt": "a", "max_tokens": 1})
            assert status == 503 and "Retry-After" in headers and "no healthy instance" in text
            async with s.get(proxy.url + "/health") as r:
                assert r.status == 503

    run(main())


# -- faults ------------------------------------------------------------------------------------------------------

def test_failed_health_check_leaves_rotation_and_comes_back():
    async def main():
        async with cluster(mixed=2) as (fleet, proxy, s):
            fleet["mixed-0"].healthy = False
            await wait_until(lambda: not proxy.upstreams["mixed-0"].healthy)
            served = [(await post(s, proxy.url, {"prompt": "a", "max_tokens": 1}))[1]["x-omnisim-decode-instance"]
                      for _ in range(4)]
            assert served == ["mixed-1"] * 4
            fleet["mixed-0"].healthy = True
            await wait_until(lambda: proxy.upstreams["mixed-0"].healthy)
            served = {(await post(s, proxy.url, {"prompt": "a", "max_tokens": 1}))[1]["x-omnisim-decode-instance"]
                      for _ in range(4)}
            assert served == {"mixed-0", "mixed-1"}

    run(main())


def test_client_disconnect_cancels_the_upstream_request():
    async def main():
        async with cluster(prefill=1, decode=1, model=SLOW) as (fleet, proxy, s):
            engine = fleet["decode-0"].engine
            async with aiohttp.ClientSession() as client:
                resp = await client.post(proxy.url + "/v1/completions",
                                         json={"prompt": "a b c", "max_tokens": 1000, "stream": True})
                await resp.content.readline()  # streaming has begun
                assert len(engine.running) == 1
                resp.close()  # the client goes away
            await wait_until(lambda: engine.stats.aborted == 1 and not engine.running, timeout=3)
            await wait_until(lambda: proxy.upstreams["decode-0"].outstanding == 0)
            assert engine.stats.finished == 0

    run(main())


def test_a_client_that_closes_after_done_is_answered_not_an_internal_error():
    """A client may close as soon as it reads [DONE] (the load generator does), before the stream's terminating
    chunk: the proxy counts that request answered (200), not a 500 with a logged traceback."""
    from aiohttp import web

    async def stream(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text in ("a", "b"):
            await response.write(b'data: {"choices": [{"text": "%s", "index": 0}]}\n\n' % text.encode())
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(0.5)  # the client has [DONE] and leaves before this stream ends
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", stream)
        app.router.add_get("/health", lambda _r: web.Response(text="ok"))
        app.router.add_get("/metrics", lambda _r: web.Response(text=""))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        proxy = Proxy(ProxyConfig(upstreams=[{"url": f"http://127.0.0.1:{port}"}], port=0), RoundRobin())
        await proxy.start()
        try:
            async with aiohttp.ClientSession() as client:
                async with client.post(proxy.url + "/v1/completions",
                                       json={"prompt": "x", "max_tokens": 2, "stream": True}) as resp:
                    async for line in resp.content:
                        if line.startswith(b"data: [DONE]"):
                            break
                    resp.close()
                await asyncio.sleep(1.0)  # the upstream ends; the proxy writes its terminator to a closed socket
                async with client.get(proxy.url + "/metrics") as m:
                    text = await m.text()
        finally:
            await proxy.stop()
            await runner.cleanup()
        answered = [ln for ln in text.splitlines() if ln.startswith("omnisim_proxy_requests_total{")]
        assert any('status="200"' in ln and ln.endswith(" 1.0") for ln in answered), answered
        assert not any('status="500"' in ln for ln in answered), answered
        assert 'omnisim_proxy_errors_total{kind="internal"}' not in text

    run(main())


def test_upstream_crash_before_the_answer_is_retried_elsewhere():
    async def main():
        async with cluster(mixed=2, model=SLOW) as (fleet, proxy, s):
            first = asyncio.create_task(post(s, proxy.url, {"prompt": "a", "max_tokens": 10}))
            await wait_until(lambda: len(fleet["mixed-0"].engine.running) == 1)
            await fleet["mixed-0"].crash()
            status, headers, text = await first
            assert status == 200 and headers["x-omnisim-decode-instance"] == "mixed-1"
            assert json.loads(text)["usage"]["completion_tokens"] == 10
            assert not proxy.upstreams["mixed-0"].healthy
            assert proxy.metrics.retries._value.get() == 1

    run(main())


@pytest.fixture
def emulator_processes():
    """start(*args) -> (upstream entries, process): an emulated fleet in a process of its own, killed at teardown."""
    procs = []

    def start(*args):
        p = subprocess.Popen([sys.executable, "-m", "backends.emulator", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, cwd=REPO, text=True)
        procs.append(p)
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"emulator {args} did not start")
        return json.loads(line)["upstreams"], p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        p.stdout.close()


def test_instance_killed_mid_stream_gives_a_clean_error_and_traffic_moves_on(emulator_processes):
    a, victim = emulator_processes("--mixed", "1", "--overhead-s", "0.01")
    b, _ = emulator_processes("--mixed", "1", "--overhead-s", "0.01")
    ups = (Upstream(a[0]["url"], "mixed", "a"), Upstream(b[0]["url"], "mixed", "b"))
    config = ProxyConfig(upstreams=ups, port=0, health_interval_s=0.05)

    async def main(proxy_url):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            resp = await s.post(proxy_url + "/v1/completions",
                                json={"prompt": "a b", "max_tokens": 500, "stream": True})
            assert resp.headers["x-omnisim-decode-instance"] == "a"
            received = await resp.content.readline()
            victim.send_signal(signal.SIGKILL)
            async for line in resp.content:
                received += line
            text = received.decode()
            events = sse_events(text)
            assert "[DONE]" not in events  # never a silent truncation: an explicit error, no [DONE]
            error = json.loads(events[-1])["error"]
            assert error["code"] == 502 and "mid-stream" in error["message"]
            status, headers, _ = await post(s, proxy_url, {"prompt": "a b", "max_tokens": 3})
            assert status == 200 and headers["x-omnisim-decode-instance"] == "b"

    with ProxyThread(config, RoundRobin()) as proxy:
        run(main(proxy.url), timeout=30)


def test_cli_serves_from_a_yaml_config(emulator_processes, tmp_path):
    ups, _ = emulator_processes("--prefill", "1", "--decode", "1", "--overhead-s", "0.001")
    cfg = {"port": 0, "upstreams": [{"url": u["url"], "role": u["role"]} for u in ups],
           "proxy": {"_target_": "omnisim.policies.LeastLoad", "seed": "${seed}"}, "seed": 3}
    path = tmp_path / "proxy.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    proc = subprocess.Popen([sys.executable, "-m", "backends.proxy.cli", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True)
    try:
        line = proc.stdout.readline()
        assert "LeastLoad" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" on ")[1].split(" ")[0]

        async def main():
            async with aiohttp.ClientSession() as s:
                return await post(s, url, {"prompt": "a b c", "max_tokens": 2})

        status, headers, _ = run(main())
        assert status == 200 and headers["x-omnisim-prefill-instance"] == "prefill-0"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
    path.write_text("upstreams: [{url: 'http://127.0.0.1:1', role: mixed}]\nbogus: 1\n")
    bad = subprocess.run([sys.executable, "-m", "backends.proxy.cli", "--config", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown key(s) ['bogus']" in bad.stderr


def test_config_is_checked():
    with pytest.raises(ValueError, match="role must be"):
        Upstream("http://127.0.0.1:1", "prefil")
    with pytest.raises(ValueError, match="need decode"):
        ProxyConfig(upstreams=(Upstream("http://127.0.0.1:1", "prefill"),))
    with pytest.raises(ValueError, match="duplicate"):
        ProxyConfig(upstreams=(Upstream("http://127.0.0.1:1", "mixed", "x"), Upstream("http://127.0.0.1:2",
                                                                                      "mixed", "x")))
    with pytest.raises(ValueError, match="upstreams\\[0\\]: unknown key"):
        ProxyConfig.from_dict({"upstreams": [{"url": "http://127.0.0.1:1", "rol": "mixed"}]})
    with pytest.raises(ValueError, match="kv_events needs"):
        ProxyConfig(upstreams=(Upstream("http://127.0.0.1:1"),), prefix_source="kv_events")
    config = ProxyConfig(upstreams=(Upstream("http://a:1", "prefill"), Upstream("http://b:1", "decode"),
                                    Upstream("http://c:1", "prefill")))
    assert [u.id for u in config.upstreams] == ["prefill-0", "decode-0", "prefill-1"]
    with pytest.raises(ValueError, match="schedule"):
        Proxy(config, object())
