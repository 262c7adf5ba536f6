"""``omnisim-proxy``: run the proxy as a process.

    omnisim-proxy --config proxy.yaml
    omnisim-proxy --upstream prefill=http://127.0.0.1:8100 --upstream decode=http://127.0.0.1:8200 \\
                  --policy round_robin --port 8000

The YAML holds backends.proxy.ProxyConfig's keys (upstreams: a list of {url, role, id?, kv_events?, ...}), plus
``proxy:`` (a policy node in conf/proxy/ format, e.g. ``{_target_: omnisim.policies.LeastLoad, seed: ${seed}}``)
and ``seed:`` (default 0). ``--policy NAME`` uses conf/proxy/NAME.yaml instead of the ``proxy:`` node. Command-line
flags override the file. Unknown keys fail, naming the key. The API key: --api-key, else the environment variable
OMNISIM_PROXY_API_KEY, else the file's api_key (the environment keeps it out of process listings and files).

Any bad setting (malformed YAML, an unknown key, a negative value, a port in use) ends it with one line on stderr
and exit status 2.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from backends.proxy.config import ProxyConfig
from backends.proxy.proxy import Proxy

API_KEY_ENV = "OMNISIM_PROXY_API_KEY"
CONF_PROXY = Path(__file__).resolve().parents[2] / "conf" / "proxy"
GC_YOUNG_THRESHOLD = 20_000  # net new container objects between young collections (CPython default 700)


def build_policy(node, seed: int):
    """Instantiate a conf/proxy/-style policy node with ``${seed}`` resolved (the CLI's one use of Hydra)."""
    from omnisim.app import instantiate_node

    return instantiate_node(node, seed)


def policy_node(name: str):
    path = CONF_PROXY / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_PROXY.glob("*.yaml"))
        raise ValueError(f"--policy: no conf/proxy/{name}.yaml; known: {known}")
    return OmegaConf.to_container(OmegaConf.load(path))


def load(argv=None) -> tuple[ProxyConfig, object, str]:
    p = argparse.ArgumentParser(prog="omnisim-proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML file with the proxy's settings")
    p.add_argument("--upstream", action="append", default=[], metavar="ROLE=URL",
                   help="an engine (role prefill, decode or mixed); repeatable")
    p.add_argument("--policy", help="conf/proxy/NAME.yaml (default: the file's proxy: node, else round_robin)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key")
    p.add_argument("--pd-mode", choices=("kv_transfer_params", "shared_storage"))
    p.add_argument("--prefix-source", choices=("history", "kv_events", "none"))
    p.add_argument("--tokenizer", metavar="PATH", help="the model's tokenizer: exact prompt tokens, and exact "
                                                       "prefix matches against vLLM's KV events")
    p.add_argument("--seed", type=int)
    p.add_argument("--record-trace", metavar="FILE", help="write the traffic served as a Mooncake-style trace "
                   "(a new file) that `omnisim workload=mooncake workload.path=FILE` replays")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="event loop: uvloop when installed (auto), else asyncio's")
    args = p.parse_args(argv)

    data: dict = {}
    where = "command line"
    if args.config:
        where = str(args.config)
        if not args.config.is_file():
            raise ValueError(f"--config: no such file {args.config}")
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(args.config), resolve=False)
        except Exception as e:  # yaml's and OmegaConf's parse errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{where}: malformed YAML ({first})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{where}: expected a mapping of settings")
        data = loaded
    node = data.pop("proxy", None)
    seed = data.pop("seed", 0)
    if args.seed is not None:
        seed = args.seed
    for k, raw in enumerate(args.upstream):
        role, sep, url = raw.partition("=")
        if not sep:
            raise ValueError(f"--upstream #{k + 1}: expected ROLE=URL, got {raw!r}")
        data.setdefault("upstreams", [])
        data["upstreams"] = list(data["upstreams"]) + [{"url": url, "role": role}]
    if args.api_key is None and os.environ.get(API_KEY_ENV):
        data["api_key"] = os.environ[API_KEY_ENV]
    for key in ("host", "port", "api_key", "pd_mode", "prefix_source", "tokenizer", "record_trace"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    config = ProxyConfig.from_dict(data, where)
    if args.policy:
        node = policy_node(args.policy)
    elif node is None:
        node = policy_node("round_robin")
    try:
        policy = build_policy(node, int(seed))
    except ValueError:
        raise
    except Exception as e:  # a policy node Hydra cannot build
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{where}: proxy policy: {type(e).__name__}: {first}") from None
    return config, policy, args.loop


def event_loop_runner(choice: str):
    """asyncio.run, or uvloop.run when chosen or installed (about 1.4x the requests per CPU-second here)."""
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return asyncio.run
    return uvloop.run


async def serve(config: ProxyConfig, policy) -> None:
    proxy = Proxy(config, policy)
    try:
        await proxy.start()
    except BaseException:
        await proxy.stop()  # its client session and site, opened before the bind failed
        raise
    # Everything loaded so far (Hydra, policies, aiohttp) lives as long as the process: keep it out of the
    # garbage collector's full passes, which otherwise stall the event loop for milliseconds (p99 latency).
    gc.collect()
    gc.freeze()
    # A served request leaves no reference cycles behind, yet at the default threshold (700 net allocations) the
    # young generation was collected every 17-66 requests, each a 0.36 ms pause of the event loop (2% of the CPU).
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"omnisim-proxy: {type(policy).__name__} on {proxy.url} ({type(loop).__module__.split('.')[0]} loop) -> "
          f"{', '.join(f'{u.id}={u.url}' for u in config.upstreams)}", flush=True)
    try:
        await stop.wait()
    finally:
        await proxy.stop()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, policy, loop = load(argv)
        runner = event_loop_runner(loop)
    except ValueError as e:
        print(f"omnisim-proxy: {e}", file=sys.stderr)
        return 2
    try:
        runner(serve(config, policy))
    except OSError as e:  # the port is in use, the host is not this machine's
        print(f"omnisim-proxy: cannot listen on {config.host}:{config.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. --record-trace names a file that exists
        print(f"omnisim-proxy: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
