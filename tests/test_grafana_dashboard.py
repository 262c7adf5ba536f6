"""The Grafana dashboard's every panel queries metrics (and labels) that a live scrape of the proxy and of the
engines has. Against the emulator here; tests/test_vllm_e2e.py checks the engine panels against real vLLM."""
from __future__ import annotations

import asyncio

import aiohttp

from backends.emulator import EngineGroup, Fleet, LinearStepTime
from backends.grafana import missing, panel_queries
from backends.proxy import Proxy, ProxyConfig
from omnisim.policies import RoundRobin

FAST = LinearStepTime(overhead_s=0.001, prefill_token_s=1e-6, decode_seq_s=1e-5)


def test_every_panel_has_its_metrics_in_a_live_scrape():
    queries = panel_queries()
    assert len(queries) >= 16 and all(expr.strip() for _, expr in queries)

    async def scrape():
        async with Fleet([EngineGroup("prefill", 1, FAST), EngineGroup("decode", 1, FAST)]) as fleet:
            proxy = Proxy(ProxyConfig(upstreams=fleet.upstreams(), port=0), RoundRobin())
            await proxy.start()
            try:
                async with aiohttp.ClientSession() as s:
                    for stream in (False, True):  # some traffic, so every labelled series has a child
                        body = {"prompt": "the quick brown fox " * 8, "max_tokens": 4, "stream": stream}
                        async with s.post(proxy.url + "/v1/completions", json=body) as r:
                            assert r.status == 200
                            await r.read()
                    async with s.post(proxy.url + "/v1/completions", json={"max_tokens": 1}) as r:
                        assert r.status == 400  # an error, for the errors panel
                    texts = []
                    for url in [proxy.url] + [u["url"] for u in fleet.upstreams()]:
                        async with s.get(url + "/metrics") as r:
                            texts.append(await r.text())
                    return texts
            finally:
                await proxy.stop()

    proxy_text, *engines = asyncio.run(scrape())
    assert missing(proxy_text, queries, "omnisim_") == []
    for text in engines:
        assert missing(text, queries, "vllm:") == []


def test_the_check_finds_what_is_missing():
    queries = [("p", "sum by (instance, kind) (rate(omnisim_proxy_errors_total[1m]))"),
               ("q", "vllm:num_requests_running")]
    scrape = 'omnisim_proxy_errors_total{cause="x"} 1\n'
    assert missing(scrape, queries, "omnisim_") == ["p: no omnisim_proxy_errors_total sample carries the label 'kind'"]
    assert missing("", queries, "vllm:") == ["q: no samples of vllm:num_requests_running"]
