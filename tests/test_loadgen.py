"""The load generator: prompts made to size and to prefix structure, open-loop replay, one record per request."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from backends.common.tokens import prompt_tokens
from backends.emulator import EngineGroup, Fleet, LinearStepTime
from backends.loadgen import LoadGenerator, PromptSynthesizer
from backends.proxy import Proxy, ProxyConfig
from omnisim.core import Request
from omnisim.metrics import SLO, SUMMARY_FILE, records_frame, summarize, write_run
from omnisim.policies import RoundRobin

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
MODEL = LinearStepTime(overhead_s=0.002, prefill_token_s=1e-5, decode_seq_s=1e-4)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_prompts_have_the_requested_length_and_share_exactly_the_shared_blocks():
    synth = PromptSynthesizer(seed=7)
    a = Request("a", 0.0, 1100, 5, (11, 22, 33), 512)
    b = Request("b", 0.0, 1100, 5, (11, 22, 44), 512)
    c = Request("c", 0.0, 300, 5, (11,), 512)
    pa, pb, pc = (prompt_tokens({"prompt": synth.prompt(r)}) for r in (a, b, c))
    assert (len(pa), len(pb), len(pc)) == (1100, 1100, 300)
    assert pa[:1024] == pb[:1024] and pa[1024:] != pb[1024:]
    assert pc == pa[:300]  # a partial last block is the start of the same block
    assert PromptSynthesizer(seed=7).prompt(a) == synth.prompt(a)
    assert PromptSynthesizer(seed=8).prompt(a) != synth.prompt(a)
    u, v = Request("u", 0.0, 50, 1), Request("v", 0.0, 50, 1)
    assert synth.prompt(u) != synth.prompt(v)  # no hashes: nothing shared
    ids = PromptSynthesizer(seed=1, prompt_format="token_ids", vocab_size=100).prompt(a)
    assert len(ids) == 1100 and 0 <= min(ids) and max(ids) < 100
    with pytest.raises(ValueError, match="prompt_format"):
        PromptSynthesizer(prompt_format="bytes")


def test_open_loop_replay_keeps_the_recorded_arrival_times_and_records_everything(tmp_path):
    requests = [Request(f"r{i}", 0.05 * i, 40 + i, 3 + i % 4) for i in range(20)]

    async def main():
        async with Fleet([EngineGroup("mixed", 2, MODEL)]) as fleet:
            gen = LoadGenerator(fleet.servers[0].url, seed=1)
            return await gen.run(requests)

    records = records_frame(run(main()))
    assert list(records["request_id"]) == [r.id for r in requests]
    assert (records["status"] == "ok").all()
    lateness = records["arrival_s"].to_numpy() - np.array([r.arrival_s for r in requests])
    assert lateness.min() >= 0 and np.median(lateness) < 0.01
    assert (records["output_tokens"].to_numpy() == [r.output_tokens for r in requests]).all()
    assert (records["prompt_tokens"].to_numpy() == [r.prompt_tokens for r in requests]).all()
    assert (records["first_token_s"] > records["arrival_s"]).all()
    assert (records["finish_s"] >= records["first_token_s"]).all()
    summary = summarize(records, SLO())
    write_run(tmp_path, records, summary)
    written = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert written["requests"] == written["completed"] == 20
    assert (tmp_path / "requests.parquet").exists()


def test_through_the_proxy_records_carry_instances_phase_times_and_cache_hits():
    shared = tuple(range(100, 104))
    requests = [Request(f"r{i}", 0.02 * i, 600, 4, shared[: 1 + i % 4], 128) for i in range(8)]

    async def main():
        async with Fleet([EngineGroup("prefill", 1, MODEL), EngineGroup("decode", 1, MODEL)]) as fleet:
            proxy = Proxy(ProxyConfig(upstreams=fleet.upstreams(), port=0), RoundRobin())
            await proxy.start()
            try:
                return await LoadGenerator(proxy.url, stream=True, seed=3).run(requests)
            finally:
                await proxy.stop()

    r = records_frame(run(main()))
    assert (r["status"] == "ok").all(), r["error"].tolist()
    assert set(r["prefill_instance"]) == {"prefill-0"} and set(r["decode_instance"]) == {"decode-0"}
    assert (r["prefill_dispatch_s"] >= r["arrival_s"]).all()
    assert (r["prefill_end_s"] > r["prefill_dispatch_s"]).all()
    assert (r["decode_dispatch_s"] >= r["prefill_end_s"]).all()
    assert (r["first_token_s"] > r["decode_dispatch_s"]).all()
    assert r["prefill_start_s"].isna().all() and r["kv_transfer_end_s"].isna().all()
    # the first request computes its prefix; later ones hit the prefill engine's cache (16-token blocks)
    assert r["cached_tokens"].iloc[0] == 0 and (r["cached_tokens"].iloc[1:] >= 128).all()


def test_refused_failed_and_truncated_requests_each_get_a_record():
    async def truncating(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"text":" x"}]}\n\n')
        return resp  # ends without [DONE]

    async def malformed(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":["x"]}\n\ndata: [DONE]\n\n')  # choices that are not objects
        return resp

    async def main():
        async with Fleet([EngineGroup("mixed", 1, LinearStepTime(overhead_s=0.02))]) as fleet:
            proxy = Proxy(ProxyConfig(upstreams=fleet.upstreams(), port=0, max_inflight=2), RoundRobin())
            await proxy.start()
            try:
                burst = [Request(f"b{i}", 0.0, 10, 20) for i in range(6)]
                limited = await LoadGenerator(proxy.url, seed=0).run(burst)
            finally:
                await proxy.stop()
        app = web.Application()
        app.router.add_post("/v1/completions", truncating)
        app.router.add_post("/v1/chat/completions", malformed)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        try:
            cut = await LoadGenerator(f"http://127.0.0.1:{port}", model="m").run([Request("t", 0.0, 5, 5)])
            odd = await LoadGenerator(f"http://127.0.0.1:{port}", model="m", endpoint="chat").run(
                [Request("o", 0.0, 5, 5), Request("p", 0.0, 5, 5)])
        finally:
            await runner.cleanup()
        dead = await LoadGenerator(f"http://127.0.0.1:{port}", model="m", request_timeout_s=2).run(
            [Request("d", 0.0, 5, 5)])
        return limited, cut, odd, dead

    limited, cut, odd, dead = run(main())
    limited = records_frame(limited)
    assert len(limited) == 6
    assert sorted(limited["status"]) == ["dropped"] * 4 + ["ok"] * 2
    assert limited.loc[limited["status"] == "dropped", "error"].str.startswith("HTTP 429").all()
    cut = records_frame(cut)
    assert cut["status"].iloc[0] == "error" and "without [DONE]" in cut["error"].iloc[0]
    odd = records_frame(odd)  # a malformed answer is that request's error record, never the replay's crash
    assert list(odd["status"]) == ["error"] * 2 and odd["error"].str.startswith("malformed SSE event").all()
    dead = records_frame(dead)
    assert dead["status"].iloc[0] == "error" and dead["error"].iloc[0]


def test_a_completion_chunk_with_empty_text_is_the_first_token_a_chat_role_chunk_is_not():
    # vLLM streams a chunk per token, with empty text while the token ends inside a UTF-8 character
    async def completion(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"text":""}]}\n\n')
        await asyncio.sleep(0.2)
        await resp.write(b'data: {"choices":[{"index":0,"text":" x"}]}\n\ndata: [DONE]\n\n')
        return resp

    async def chat(request):  # the role chunk first: no token yet
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
        await asyncio.sleep(0.2)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":" x"}}]}\n\ndata: [DONE]\n\n')
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", completion)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            plain = await LoadGenerator(url, model="m").run([Request("c", 0.0, 5, 2)])
            chatted = await LoadGenerator(url, model="m", endpoint="chat").run([Request("h", 0.0, 5, 1)])
        finally:
            await runner.cleanup()
        return records_frame(plain).iloc[0], records_frame(chatted).iloc[0]

    plain, chatted = run(main())
    assert plain["status"] == "ok" and plain["output_tokens"] == 2  # both chunks are tokens
    assert plain["finish_s"] - plain["first_token_s"] > 0.15  # the first token is the empty-text chunk
    assert chatted["status"] == "ok" and chatted["output_tokens"] == 1
    assert chatted["finish_s"] - chatted["first_token_s"] < 0.1  # the role chunk is no token


def test_settings_are_checked():
    with pytest.raises(ValueError, match="endpoint"):
        LoadGenerator("http://x", endpoint="embeddings")
    with pytest.raises(ValueError, match="chat requests need text"):
        LoadGenerator("http://x", endpoint="chat", prompt_format="token_ids")
    with pytest.raises(ValueError, match="time_scale"):
        LoadGenerator("http://x", time_scale=0)


def test_cli_replays_a_workload_file_and_writes_the_run(tmp_path):
    fleet = subprocess.Popen([sys.executable, "-m", "backends.emulator", "--mixed", "2", "--overhead-s", "0.002"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, text=True)
    try:
        url = json.loads(fleet.stdout.readline())["upstreams"][0]["url"]
        cmd = [sys.executable, "-m", "backends.loadgen", "--url", url, "--workload",
               str(REPO / "conf" / "workload" / "poisson.yaml"), "--set", "max_requests=12", "--set", "rate=40",
               "--slo", str(REPO / "conf" / "slo" / "default.yaml"), "--out", str(tmp_path / "run"), "--seed", "2"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
        assert summary["requests"] == summary["completed"] == 12
        bad = subprocess.run(cmd[:-4] + ["--set", "bogus=1", "--out", str(tmp_path / "bad")], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "no key 'bogus'" in bad.stderr
    finally:
        fleet.kill()
        fleet.wait(10)
        fleet.stdout.close()


def test_cli_without_a_served_model_says_so_and_exits_2(tmp_path, capsys):
    from backends.loadgen.__main__ import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    code = main(["--url", url, "--workload", str(REPO / "conf" / "workload" / "poisson.yaml"),
                 "--set", "max_requests=2", "--out", str(tmp_path / "run")])
    assert code == 2 and "loadgen: model: cannot read the served model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
