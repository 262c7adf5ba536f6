"""The omnisim proxy: an asyncio OpenAI-compatible HTTP proxy that routes with any omnisim proxy policy.

Programmatic API (what backends/vllm, backends/ascend and the emulator backend call)::

    from backends.proxy import Proxy, ProxyConfig, ProxyThread, Upstream

    config = ProxyConfig(
        upstreams=(Upstream("http://127.0.0.1:8100", "prefill"),     # ids default to f"{role}-{i}" per role
                   Upstream("http://127.0.0.1:8200", "decode")),     # roles: "prefill" | "decode" | "mixed"
        port=0,                                                      # 0 = pick a free port; read proxy.port
        pd_mode="kv_transfer_params",   # vLLM's protocol (NixlConnector, Mooncake...) or "shared_storage"
    )                                   # (prefill with max_tokens=1, then decode the same prompt: ExampleConnector)

    # inside a running asyncio loop
    proxy = Proxy(config, policy)       # policy: any omnisim.core.ProxyPolicy object (e.g. omnisim.policies.RoundRobin())
    await proxy.start()                 # binds config.host:port, starts health checks / metrics polling / KV events
    ...  proxy.url  ...                 # "http://127.0.0.1:<port>"
    await proxy.stop()                  # cancels in-flight work, closes sockets

    # from synchronous code (tests, launchers): the same proxy on its own event loop in a daemon thread
    with ProxyThread(config, policy) as proxy:
        requests.post(proxy.url + "/v1/completions", json={...})

    # as a process:  omnisim-proxy --config proxy.yaml      (see backends/proxy/cli.py for the YAML keys)
    #                omnisim-proxy --upstream prefill=http://127.0.0.1:8100 --upstream decode=http://127.0.0.1:8200 \
    #                              --policy round_robin --port 8000            (--policy NAME = conf/proxy/NAME.yaml)

Endpoints: POST /v1/completions and /v1/chat/completions (streaming SSE and not), GET /v1/models, /health,
/metrics (Prometheus). Every response to a routed request carries timing headers, all relative to the proxy's
receipt of the request, in seconds: x-omnisim-prefill-instance, x-omnisim-decode-instance,
x-omnisim-prefill-dispatch-s, x-omnisim-prefill-end-s, x-omnisim-decode-dispatch-s (absent where not applicable).

Prefix index (what ``view.cached_tokens`` answers): ``prefix_source="kv_events"`` subscribes to each upstream's
ZMQ KV-event publisher (vLLM's wire format, backends/common/kv_wire.py). With ``tokenizer`` set to the model's
tokenizer (``tokenizer: /path/to/model`` in the YAML, ``--tokenizer`` on the command line) the proxy tokenizes
prompts exactly as vLLM does and maps each engine's block hashes to its own through the token ids in the
BlockStored events, so it knows exactly how many prompt tokens each vLLM instance has cached
(backends/common/engine_block_map.py); ``prefix_block_tokens`` must then be the engines' ``--block-size``. Without
a tokenizer, "kv_events" matches the events' hashes as they are, which is exact against the emulator (it hashes
as backends/common/tokens.py does) and never matches vLLM. ``"history"`` (the default) is the proxy's own record
of which instance prefilled which prefix blocks (approximate: no evictions seen). ``"none"`` turns prefix
matching off. Responses carry ``x-omnisim-predicted-cached-tokens``: the prompt tokens the index expected cached
on the instance that prefilled the request (compare vLLM's ``usage.prompt_tokens_details.cached_tokens``).

Request extensions (optional): headers ``X-Prefix-Hashes: 12,34,56`` with ``X-Hash-Block-Tokens: 512`` give the
request's prefix-block hashes exactly (the load generator sends the workload's); ``X-Prompt-Tokens: 1234`` gives
the exact prompt length. Without them the proxy estimates from the prompt (see backends/common/tokens.py); with a
``tokenizer`` its own count and hashes are exact and win over X-Prompt-Tokens.

Faults (engines frozen, killed, stalling, flapping; PD with one role down; hostile clients) and the timeouts
(``first_token_timeout_s``, ``stream_idle_timeout_s``, ``read_timeout_s``, ``client_read_timeout_s``): README.md,
"Failure behaviour (the proxy)"; tests/test_proxy_faults.py.
"""
from backends.proxy.config import ProxyConfig, Upstream, upstreams_from_urls
from backends.proxy.proxy import Proxy
from backends.proxy.proxy_thread import ProxyThread

__all__ = ["Proxy", "ProxyConfig", "ProxyThread", "Upstream", "upstreams_from_urls"]
