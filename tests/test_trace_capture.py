"""The proxy records the traffic it serves as a Mooncake-style trace that the simulator replays: observe, replay,
calibrate."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from hydra import compose, initialize_config_dir

from backends.emulator import EngineGroup, Fleet, LinearStepTime
from backends.proxy import Proxy, ProxyConfig
from backends.proxy.cli import main as proxy_main
from backends.proxy.trace_recorder import StreamTokenCounter, TraceRecorder
from omnisim.app import CONF_DIR, build_experiment
from omnisim.core import Request
from omnisim.policies import RoundRobin
from omnisim.sim import Simulation
from omnisim.workload.mooncake import load_mooncake_trace

pytestmark = pytest.mark.timeout(60)
FAST = LinearStepTime(overhead_s=0.001, prefill_token_s=1e-6, decode_seq_s=1e-5)
SHARED = " ".join(f"word{i}" for i in range(200))  # a long common prefix: several 16-token blocks


async def serve_some(trace, pd: bool):
    groups = [EngineGroup("prefill", 1, FAST), EngineGroup("decode", 1, FAST)] if pd else \
        [EngineGroup("mixed", 2, FAST)]
    async with Fleet(groups) as fleet:
        proxy = Proxy(ProxyConfig(upstreams=fleet.upstreams(), port=0, record_trace=str(trace)), RoundRobin())
        await proxy.start()
        sent = []
        try:
            async with aiohttp.ClientSession() as s:
                async def one(i):
                    prompt = (SHARED if i % 2 == 0 else f"other text {i} ") + f" question {i}"
                    body = {"prompt": prompt, "max_tokens": 3 + i, "stream": i % 3 == 0}
                    async with s.post(proxy.url + "/v1/completions", json=body) as r:
                        await r.read()
                        return r.status
                for i in range(8):  # arrivals spread out, answers overlapping
                    sent.append(asyncio.create_task(one(i)))
                    await asyncio.sleep(0.01)
                statuses = await asyncio.gather(*sent)
                async with s.post(proxy.url + "/v1/completions", json={"max_tokens": 2}) as r:
                    assert r.status == 400  # never accepted: not in the trace
        finally:
            await proxy.stop()
    return statuses


@pytest.mark.parametrize("pd", [False, True], ids=["colocated", "pd"])
def test_the_recorded_trace_has_what_was_served_and_replays_in_the_simulator(tmp_path, pd):
    trace = tmp_path / "captured.jsonl"
    statuses = asyncio.run(serve_some(trace, pd))
    assert statuses == [200] * 8
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert [r["output_length"] for r in rows] == [3 + i for i in range(8)]  # streamed or not, tokens generated
    stamps = [r["timestamp"] for r in rows]
    assert stamps == sorted(stamps) and stamps[-1] >= 60  # arrival order, 10 ms apart
    shared = [r["hash_ids"] for r in rows[0::2]]
    common = min(len(h) for h in shared) - 2  # the blocks before the one that holds "question i"
    assert common >= 4 and all(h[:common] == shared[0][:common] for h in shared)
    assert len({h[-1] for h in shared}) == len(shared)  # their tails differ
    others = [set(r["hash_ids"]) for r in rows[1::2]]
    assert all(not (o & set(shared[0])) for o in others)  # no content in common, no ids in common

    # the loader reads it as it is; the simulator replays every request with its lengths and prefixes
    stamps_ms, prompts, outputs, hashes, _ = load_mooncake_trace(trace, 16)
    assert list(prompts) == [r["input_length"] for r in rows]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["workload=mooncake", f"workload.path={trace}",
                                           "workload.hash_block_tokens=16", "workload.spread_buckets=false",
                                           "proxy=prefix_aware", "backend.progress=false"])
    experiment, _ = build_experiment(cfg)
    records = Simulation(experiment).run().records
    assert len(records) == 8 and (records.status == "ok").all()
    assert sorted(records.output_tokens) == sorted(r["output_length"] for r in rows)


def test_the_recorder_writes_in_arrival_order_and_never_overwrites(tmp_path):
    clock = iter([0.0, 0.001, 0.002, 0.003]).__next__
    path = tmp_path / "t.jsonl"
    rec = TraceRecorder(path, 16, clock)
    a = rec.arrived(Request("a", 0, 40, 5, (11, 22), 16))  # 3 blocks: 2 hashed, the partial tail gets its own
    b = rec.arrived(Request("b", 0, 16, 5, (11,), 16))
    c = rec.arrived(Request("c", 0, 20, 5, (), 0))  # unhashed: ids of its own
    rec.ended(b, 5)
    assert path.read_text() == ""  # b waits for a, which arrived first
    rec.ended(a, None)  # a did not complete
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["error", "ok"] and rows[0]["output_length"] == 5
    assert rows[0]["hash_ids"][:1] == rows[1]["hash_ids"] and len(rows[0]["hash_ids"]) == 3
    rec.close()  # c was cut off: written as not completed
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 3 and rows[2]["status"] == "error" and len(set(rows[2]["hash_ids"]) & {0, 1, 2}) == 0
    assert c == 2
    with pytest.raises(ValueError, match="exists"):
        TraceRecorder(path, 16, clock)
    with pytest.raises(ValueError, match="does not exist"):
        TraceRecorder.check_new(tmp_path / "no" / "dir" / "t.jsonl")


def test_stream_token_counting():
    c = StreamTokenCounter()
    for chunk in (b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"te', b'xt":"b"}]}\n\n',
                  b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\ndata: [DONE]\n\n'):
        c.feed(chunk)
    assert c.result() == 2  # the role-only event carries no token
    c = StreamTokenCounter()
    c.feed(b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[],"usage":{"completion_tokens":7}}\n\n')
    assert c.result() == 7  # the engine's own count wins


def test_the_cli_refuses_an_existing_trace_file(tmp_path, capsys):
    (tmp_path / "old.jsonl").write_text("{}\n")
    assert proxy_main(["--upstream", "mixed=http://127.0.0.1:1", "--port", "0",
                       "--record-trace", str(tmp_path / "old.jsonl")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "old.jsonl").read_text() == "{}\n"
