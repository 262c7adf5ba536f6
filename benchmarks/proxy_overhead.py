"""The proxy's added latency and its throughput per CPU core, against a fleet of emulated engines on loopback.

    python benchmarks/proxy_overhead.py [--rate 1000] [--seconds 5] [--engines 4] [--tokens 4] [--pd]

Layout (2 cores): the proxy alone on core 0; the emulated fleet (time_scale 0: engines answer as fast as they can)
and this client on core 1; low-priority (nice 19) busy loops on both cores keep them awake, so p99 measures the
proxy rather than idle-core wake-ups (REFERENCE.md); they stop with the benchmark (and after --max-wall-s anyway).

1. Direct: open-loop streaming requests at --rate, round robin over the engines, straight from the client.
2. Via the proxy (RoundRobin policy), same rate and requests. Added latency = via-proxy minus direct percentile
   of end-to-end latency (whole SSE stream read), p50 and p99.
3. Saturation: --concurrency closed-loop clients through the proxy; max_rps = completed requests / CPU seconds the
   proxy process used (requests per CPU-second: its throughput on one fully used core).
Then the same 2-3 for vllm-router (Rust, PyPI ``vllm-router``) when it is installed, and the ratio.

The last line printed is a JSON object: p50_added_ms, p99_added_ms, max_rps (and vllm_router: {...} when measured).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CORES = sorted(os.sched_getaffinity(0))
PROXY_CORE, CLIENT_CORE = CORES[0], CORES[-1]


def _pin(core: int, nice: int = 0):
    def setup():
        os.sched_setaffinity(0, {core})
        if nice:
            os.nice(nice)
    return setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants (all threads included)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, frontier = 0.0, [pid]
    while frontier:
        p = frontier.pop()
        total += stats.get(p, (0, 0.0))[1]
        frontier += [c for c, (ppid, _) in stats.items() if ppid == p]
    return total


class Processes:
    """Every process the benchmark starts; all are killed on exit, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args, core: int, nice: int = 0, **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, preexec_fn=_pin(core, nice), cwd=REPO, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


SPIN = "import time, os\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


async def _wait_ready(url: str, path: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            try:
                async with s.get(url + path, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url}{path} not ready after {timeout} s")


async def _one(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, float, bool]:
    """(ttft_s, e2e_s, ok) of one streaming request read to its end."""
    t0 = time.perf_counter()
    ttft = float("nan")
    try:
        async with session.post(url + "/v1/completions", data=body,
                                headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                await r.read()
                return ttft, time.perf_counter() - t0, False
            done = False
            async for chunk in r.content.iter_any():
                if ttft != ttft:
                    ttft = time.perf_counter() - t0
                if b"[DONE]" in chunk:
                    done = True
            return ttft, time.perf_counter() - t0, done
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return ttft, time.perf_counter() - t0, False


_PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                   "remote_block_ids": None, "remote_host": None, "remote_port": None}


async def _one_pd(session: aiohttp.ClientSession, urls: tuple[str, str], body: bytes) -> tuple[float, float, bool]:
    """vLLM's PD protocol done by the client itself (the no-proxy baseline of a disaggregated request)."""
    t0 = time.perf_counter()
    request = json.loads(body)
    prefill = {**request, "max_tokens": 1, "stream": False, "kv_transfer_params": _PREFILL_PARAMS}
    try:
        async with session.post(urls[0] + "/v1/completions", json=prefill) as r:
            params = (await r.json())["kv_transfer_params"]
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, KeyError):
        return float("nan"), time.perf_counter() - t0, False
    ttft, e2e, ok = await _one(session, urls[1], json.dumps({**request, "kv_transfer_params": params}).encode())
    return ttft, time.perf_counter() - t0, ok


async def open_loop(urls: list, rate: float, seconds: float, body: bytes, warmup_s: float = 1.0) -> dict:
    """Requests at a fixed rate (round robin over ``urls``; (prefill, decode) pairs: the client does PD itself);
    latencies of those sent after the warm-up."""
    n = int(rate * (seconds + warmup_s))
    results: list = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i in range(n):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            url = urls[i % len(urls)]
            send = _one_pd if isinstance(url, tuple) else _one
            tasks.append(asyncio.create_task(send(session, url, body)))
        sent_s = loop.time() - start
        results = await asyncio.gather(*tasks)
    keep = results[int(rate * warmup_s):]
    e2e = np.array([r[1] for r in keep])
    ok = np.array([r[2] for r in keep])
    return {"requests": len(keep), "errors": int((~ok).sum()), "send_rate": n / sent_s,
            "p50_ms": float(np.percentile(e2e, 50) * 1e3), "p99_ms": float(np.percentile(e2e, 99) * 1e3),
            "ttft_p50_ms": float(np.nanpercentile([r[0] for r in keep], 50) * 1e3)}


async def closed_loop(url: str, concurrency: int, seconds: float, body: bytes, pid: int) -> dict:
    done = errors = 0
    stop = False

    async def worker(session):
        nonlocal done, errors
        while not stop:
            _, _, ok = await _one(session, url, body)
            done += ok
            errors += not ok

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(1.0)  # warm up
        done0, cpu0, t0 = done, _cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(seconds)
        completed, cpu, wall = done - done0, _cpu_seconds(pid) - cpu0, time.monotonic() - t0
        stop = True
        await asyncio.gather(*workers)
    return {"completed": completed, "errors": errors, "proxy_cpu_s": cpu, "achieved_rps": completed / wall,
            "max_rps": completed / cpu if cpu > 0 else float("nan")}


def measure(name: str, url: str, pid: int, direct: dict, args, body: bytes) -> dict:
    asyncio.run(_wait_ready(url, "/health"))
    via = asyncio.run(open_loop([url], args.rate, args.seconds, body))
    sat = asyncio.run(closed_loop(url, args.concurrency, args.seconds, body, pid))
    out = {"p50_added_ms": via["p50_ms"] - direct["p50_ms"], "p99_added_ms": via["p99_ms"] - direct["p99_ms"],
           "max_rps": sat["max_rps"], "achieved_rps": sat["achieved_rps"], "open_loop": via, "saturation": sat}
    print(f"{name:12s} p50 +{out['p50_added_ms']:.3f} ms  p99 +{out['p99_added_ms']:.3f} ms  "
          f"(e2e p50 {via['p50_ms']:.3f} / p99 {via['p99_ms']:.3f} ms, errors {via['errors']}, "
          f"sent {via['send_rate']:.0f}/s)   saturated: {sat['max_rps']:.0f} req per CPU-s, "
          f"{sat['achieved_rps']:.0f} req/s, errors {sat['errors']}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop requests per second")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase (after 1 s warm-up)")
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--pd", action="store_true", help="disaggregated: half prefill, half decode engines, vLLM's "
                                                     "kv_transfer_params protocol (the client does it when direct)")
    p.add_argument("--tokens", type=int, default=4, help="streamed output tokens per request")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients for the saturation phase")
    p.add_argument("--proxy-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="the omnisim proxy's event loop (auto: uvloop when installed)")
    p.add_argument("--no-spin", action="store_true", help="no low-priority busy loops")
    p.add_argument("--no-router", action="store_true", help="skip vllm-router even if installed")
    p.add_argument("--max-wall-s", type=float, default=600.0, help="spinners and the whole run stop by then")
    args = p.parse_args(argv)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("benchmark ran too long")))
    signal.alarm(int(args.max_wall_s))
    os.sched_setaffinity(0, {CLIENT_CORE})
    body = json.dumps({"model": "omnisim-emulated", "prompt": "hello " * 16, "max_tokens": args.tokens,
                       "stream": True, "ignore_eos": True}).encode()
    procs = Processes()
    try:
        if not args.no_spin:
            for core in {PROXY_CORE, CLIENT_CORE}:
                procs.start([sys.executable, "-c", SPIN.format(limit=args.max_wall_s)], core, nice=19)
        shape = (["--prefill", str(args.engines // 2), "--decode", str(args.engines - args.engines // 2)]
                 if args.pd else ["--mixed", str(args.engines)])
        fleet = procs.start([sys.executable, "-m", "backends.emulator", *shape, "--time-scale", "0",
                             "--overhead-s", "0.0005"], CLIENT_CORE, stdout=subprocess.PIPE, text=True)
        upstreams = json.loads(fleet.stdout.readline())["upstreams"]
        engines = [u["url"] for u in upstreams]
        for u in engines:
            asyncio.run(_wait_ready(u, "/health"))
        prefills = [u["url"] for u in upstreams if u["role"] == "prefill"]
        decodes = [u["url"] for u in upstreams if u["role"] == "decode"]
        targets = [(prefills[i % len(prefills)], decodes[i % len(decodes)])
                   for i in range(max(len(prefills), len(decodes)))] if args.pd else engines
        direct = asyncio.run(open_loop(targets, args.rate, args.seconds, body))
        print(f"{'direct':12s} e2e p50 {direct['p50_ms']:.3f} ms / p99 {direct['p99_ms']:.3f} ms, "
              f"errors {direct['errors']}, sent {direct['send_rate']:.0f}/s", flush=True)

        port = _free_port()
        ups = [arg for u in upstreams for arg in ("--upstream", f"{u['role']}={u['url']}")]
        proxy = procs.start([sys.executable, "-m", "backends.proxy.cli", *ups, "--policy", "round_robin",
                             "--port", str(port), "--loop", args.proxy_loop], PROXY_CORE, stdout=subprocess.DEVNULL)
        result = measure("omnisim", f"http://127.0.0.1:{port}", proxy.pid, direct, args, body)
        result.update(rate=args.rate, tokens=args.tokens, engines=args.engines, pd=args.pd, direct=direct,
                      proxy_loop=args.proxy_loop if args.proxy_loop != "auto" else (
                          "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"))
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(10)

        if not args.no_router and shutil.which("vllm-router"):
            port = _free_port()
            workers = (["--vllm-pd-disaggregation", *[a for u in prefills for a in ("--prefill", u)],
                        *[a for u in decodes for a in ("--decode", u)]] if args.pd else ["--worker-urls", *engines])
            router = procs.start(["vllm-router", *workers, "--policy", "round_robin",
                                  "--port", str(port), "--host", "127.0.0.1", "--log-level", "error",
                                  "--disable-retries", "--disable-circuit-breaker",
                                  "--max-concurrent-requests", "4096", "--queue-size", "4096"], PROXY_CORE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rr = measure("vllm-router", f"http://127.0.0.1:{port}", router.pid, direct, args, body)
            result["vllm_router"] = {k: rr[k] for k in ("p50_added_ms", "p99_added_ms", "max_rps", "achieved_rps")}
            result["max_rps_ratio_vs_vllm_router"] = result["max_rps"] / rr["max_rps"]
    finally:
        signal.alarm(0)
        procs.stop_all()
    summary = {k: result[k] for k in ("p50_added_ms", "p99_added_ms", "max_rps", "achieved_rps", "rate",
                                      "tokens", "engines", "pd", "proxy_loop")}
    for k in ("vllm_router", "max_rps_ratio_vs_vllm_router"):
        if k in result:
            summary[k] = result[k]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
