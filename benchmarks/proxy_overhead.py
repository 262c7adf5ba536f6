"""The proxy's added latency and its throughput per CPU core, against a fleet of emulated engines on loopback.

    python benchmarks/proxy_overhead.py [--rate 1000] [--seconds 5] [--repeat 3] [--engines 4] [--tokens 4]
                                        [--prompt-words 16] [--pd] [--realtime]

Layout (2 cores): the proxy alone on core 0. This process, on core 1, runs the emulated fleet (time_scale 0:
engines answer as fast as they can) and the client in one event loop: the direct and the proxied paths then do the
same client and engine work on that core, and the proxied path adds only the proxy's hops. (With the fleet in a
process of its own beside the client, every proxied request made those two wake each other up on one core: scheduler
delays of milliseconds that the direct path never had.) Busy loops under the idle scheduling policy (SCHED_IDLE) on
both cores keep them out of deep idle states, whose wake-ups cost milliseconds on these VMs (REFERENCE.md), and give
way at once to any other task; nice-19 loops could hold a core until the next 4 ms scheduler tick. ``--realtime``
(root) runs this process and the proxy under SCHED_FIFO, so other users' processes on a shared machine cannot delay
them (the kernel keeps 5% of each core for everyone else). Each window reports "foreign CPU": the share of the two
cores used by processes outside the benchmark; figures from windows where it is high are not the proxy's alone.

Each repeat (``--repeat``) measures, back to back so that they see alike background conditions:
1. Direct: open-loop streaming requests at --rate, round robin over the engines, straight from the client.
2. Via each proxy (omnisim with RoundRobin; vllm-router when installed), same rate and requests. Added latency =
   via-proxy minus direct percentile of end-to-end latency (whole SSE stream read), p50 and p99.
3. Saturation: --concurrency closed-loop clients through each proxy; max_rps = completed requests / CPU seconds the
   proxy process used (requests per CPU-second: its throughput on one fully used core; the client's core saturates
   first here, so this is the proxy's CPU cost per request, not an observed maximum).

Printed: one line per window, then medians and [min, max] over the repeats. The last line is a JSON object:
p50_added_ms, p99_added_ms, max_rps, achieved_rps (medians), their [min, max] (*_range), the largest foreign CPU
share, and vllm_router {...} with max_rps_ratio_vs_vllm_router when measured.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
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
sys.path.insert(0, str(REPO))  # the fleet runs in this process: this tree's emulator, as the proxy is this tree's

from backends.emulator import EngineGroup, Fleet, LinearStepTime  # noqa: E402

CORES = sorted(os.sched_getaffinity(0))
PROXY_CORE, CLIENT_CORE = CORES[0], CORES[-1]
ENGINE_STEP = LinearStepTime(overhead_s=0.0005, prefill_token_s=5e-5, decode_seq_s=2e-4)
SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


def _pin(core: int, idle: bool = False):
    def setup():
        os.sched_setaffinity(0, {core})
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
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


def _busy_seconds(cores: set[int]) -> float:
    """CPU seconds ``cores`` spent on anything but idle (steal included: the hypervisor took them)."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            total += user + nice + system + irq + softirq + steal
    return total / os.sysconf("SC_CLK_TCK")


class ForeignCpu:
    """Share of the benchmark's two cores used by processes outside it while a window ran (all of its own
    processes are pinned to those cores)."""

    CORES = {PROXY_CORE, CLIENT_CORE}

    def __enter__(self) -> "ForeignCpu":
        self.t0, self.busy0, self.ours0 = time.monotonic(), _busy_seconds(self.CORES), _cpu_seconds(os.getpid())
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self.t0
        foreign = (_busy_seconds(self.CORES) - self.busy0) - (_cpu_seconds(os.getpid()) - self.ours0)
        self.share = max(0.0, foreign / (wall * len(self.CORES)))


class NoGarbageCollection:
    """Collect now and not during the window: this process's own full collections (its window keeps thousands of
    tasks alive) stalled the client and the fleet for 17-28 ms at a random point of some windows."""

    def __enter__(self) -> None:
        gc.collect()
        gc.disable()

    def __exit__(self, *exc) -> None:
        gc.enable()


class Processes:
    """Every process the benchmark starts; all are killed on exit, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args, core: int, idle: bool = False, **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, preexec_fn=_pin(core, idle), cwd=REPO, **kw)
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
    loop = asyncio.get_running_loop()
    results: list = [None] * n
    remaining = n
    finished = loop.create_future()

    async def one(i: int, url) -> None:
        nonlocal remaining
        results[i] = await (_one_pd if isinstance(url, tuple) else _one)(session, url, body)
        remaining -= 1
        if not remaining:
            finished.set_result(None)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks = []  # the loop keeps only weak references to tasks
        with NoGarbageCollection(), ForeignCpu() as foreign:
            start = loop.time()
            for i in range(n):
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, urls[i % len(urls)])))
            sent_s = loop.time() - start
            await finished  # not gather(): setting it up over thousands of tasks delayed the last requests
    keep = results[int(rate * warmup_s):]
    e2e = np.array([r[1] for r in keep])
    ok = np.array([r[2] for r in keep])
    return {"requests": len(keep), "errors": int((~ok).sum()), "send_rate": n / sent_s,
            "p50_ms": float(np.percentile(e2e, 50) * 1e3), "p99_ms": float(np.percentile(e2e, 99) * 1e3),
            "ttft_p50_ms": float(np.nanpercentile([r[0] for r in keep], 50) * 1e3), "foreign_cpu": foreign.share}


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
        with NoGarbageCollection(), ForeignCpu() as foreign:
            done0, cpu0, t0 = done, _cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(seconds)
            completed, cpu, wall = done - done0, _cpu_seconds(pid) - cpu0, time.monotonic() - t0
        stop = True
        await asyncio.gather(*workers)
    return {"completed": completed, "errors": errors, "proxy_cpu_s": cpu, "achieved_rps": completed / wall,
            "max_rps": completed / cpu if cpu > 0 else float("nan"), "foreign_cpu": foreign.share}


def _window(name: str, w: dict, direct: dict | None = None) -> str:
    added = (f"p50 +{w['p50_ms'] - direct['p50_ms']:.3f} ms  p99 +{w['p99_ms'] - direct['p99_ms']:.3f} ms  "
             if direct else "")
    return (f"  {name:12s} {added}(e2e p50 {w['p50_ms']:.3f} / p99 {w['p99_ms']:.3f} ms, errors {w['errors']}, "
            f"sent {w['send_rate']:.0f}/s, foreign CPU {w['foreign_cpu']:.0%})")


def _spread(values: list[float]) -> tuple[float, list[float]]:
    return float(np.median(values)), [float(min(values)), float(max(values))]


async def run(args, procs: Processes) -> dict:
    prompt = " ".join(f"w{i % 1000}" for i in range(args.prompt_words))  # words: one emulator token each
    body = json.dumps({"model": "omnisim-emulated", "prompt": prompt, "max_tokens": args.tokens,
                       "stream": True, "ignore_eos": True}).encode()
    prefill_n = args.engines // 2 if args.pd else 0
    groups = ([EngineGroup("prefill", prefill_n, ENGINE_STEP), EngineGroup("decode", args.engines - prefill_n,
                                                                            ENGINE_STEP)]
              if args.pd else [EngineGroup("mixed", args.engines, ENGINE_STEP)])
    async with Fleet(groups, time_scale=0) as fleet:
        upstreams = fleet.upstreams()
        prefills = [u["url"] for u in upstreams if u["role"] == "prefill"]
        decodes = [u["url"] for u in upstreams if u["role"] == "decode"]
        targets = ([(prefills[i % len(prefills)], decodes[i % len(decodes)])
                    for i in range(max(len(prefills), len(decodes)))] if args.pd else [u["url"] for u in upstreams])

        proxies = {}  # name -> (url, pid)
        port = _free_port()
        ups = [arg for u in upstreams for arg in ("--upstream", f"{u['role']}={u['url']}")]
        p = procs.start([sys.executable, "-m", "backends.proxy.cli", *ups, "--policy", "round_robin",
                         "--port", str(port), "--loop", args.proxy_loop], PROXY_CORE, stdout=subprocess.DEVNULL)
        proxies["omnisim"] = (f"http://127.0.0.1:{port}", p.pid)
        if not args.no_router and shutil.which("vllm-router"):
            port = _free_port()
            workers = (["--vllm-pd-disaggregation", *[a for u in prefills for a in ("--prefill", u)],
                        *[a for u in decodes for a in ("--decode", u)]] if args.pd else
                       ["--worker-urls", *[u["url"] for u in upstreams]])
            p = procs.start(["vllm-router", *workers, "--policy", "round_robin", "--port", str(port),
                             "--host", "127.0.0.1", "--log-level", "error", "--disable-retries",
                             "--disable-circuit-breaker", "--max-concurrent-requests", "4096",
                             "--queue-size", "4096"], PROXY_CORE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            proxies["vllm-router"] = (f"http://127.0.0.1:{port}", p.pid)
        for url, _ in proxies.values():
            await _wait_ready(url, "/health")

        # The first window of a fresh process ran slow (direct p99 2.5 ms against 0.8 later): warm every path first
        for urls in (targets, *([url] for url, _ in proxies.values())):
            await open_loop(urls, args.rate, 1.0, body, warmup_s=0.0)
        rows: dict[str, list[dict]] = {name: [] for name in proxies}
        for r in range(args.repeat):
            print(f"repeat {r + 1}/{args.repeat}", flush=True)
            direct = await open_loop(targets, args.rate, args.seconds, body)
            print(_window("direct", direct), flush=True)
            for name, (url, pid) in proxies.items():
                via = await open_loop([url], args.rate, args.seconds, body)
                print(_window(name, via, direct), flush=True)
                rows[name].append({"p50_added_ms": via["p50_ms"] - direct["p50_ms"],
                                   "p99_added_ms": via["p99_ms"] - direct["p99_ms"],
                                   "errors": via["errors"] + direct["errors"],
                                   "foreign_cpu": max(via["foreign_cpu"], direct["foreign_cpu"])})
            for name, (url, pid) in proxies.items():
                sat = await closed_loop(url, args.concurrency, args.seconds, body, pid)
                print(f"  {name:12s} saturated: {sat['max_rps']:.0f} req per CPU-s, {sat['achieved_rps']:.0f} "
                      f"req/s, errors {sat['errors']}, foreign CPU {sat['foreign_cpu']:.0%}", flush=True)
                rows[name][-1].update(max_rps=sat["max_rps"], achieved_rps=sat["achieved_rps"],
                                      errors=rows[name][-1]["errors"] + sat["errors"],
                                      foreign_cpu=max(rows[name][-1]["foreign_cpu"], sat["foreign_cpu"]))

    summary = {}
    for name, rs in rows.items():
        s = {}
        for key in ("p50_added_ms", "p99_added_ms", "max_rps", "achieved_rps"):
            s[key], s[f"{key}_range"] = _spread([x[key] for x in rs])
        s["errors"] = sum(x["errors"] for x in rs)
        s["foreign_cpu_max"] = max(x["foreign_cpu"] for x in rs)
        summary[name] = s
        print(f"{name:12s} median of {len(rs)} [min, max]: p50 +{s['p50_added_ms']:.3f} ms "
              f"{np.round(s['p50_added_ms_range'], 3).tolist()}, p99 +{s['p99_added_ms']:.3f} ms "
              f"{np.round(s['p99_added_ms_range'], 3).tolist()}, {s['max_rps']:.0f} req per CPU-s "
              f"{np.round(s['max_rps_range']).tolist()}; errors {s['errors']}, foreign CPU up to "
              f"{s['foreign_cpu_max']:.0%}", flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop requests per second")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per window (after 1 s warm-up)")
    p.add_argument("--repeat", type=int, default=3, help="repeats of every measurement (medians are reported)")
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--pd", action="store_true", help="disaggregated: half prefill, half decode engines, vLLM's "
                                                     "kv_transfer_params protocol (the client does it when direct)")
    p.add_argument("--tokens", type=int, default=4, help="streamed output tokens per request")
    p.add_argument("--prompt-words", type=int, default=16, help="prompt length (the proxy tokenizes and hashes "
                                                                "every prompt: OmniInfer's average is 3,500)")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients for the saturation phase")
    p.add_argument("--proxy-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="the omnisim proxy's event loop (auto: uvloop when installed)")
    p.add_argument("--realtime", action="store_true", help="SCHED_FIFO for this process and the proxies (root): "
                                                           "shields the measurement from other users' processes")
    p.add_argument("--no-spin", action="store_true", help="no idle-priority busy loops")
    p.add_argument("--no-router", action="store_true", help="skip vllm-router even if installed")
    p.add_argument("--max-wall-s", type=float, default=900.0, help="busy loops and the whole run stop by then")
    args = p.parse_args(argv)
    if (args.repeat < 1 or args.seconds <= 0 or args.rate <= 0 or args.prompt_words < 1
            or args.engines < (2 if args.pd else 1)):
        p.error("--repeat >= 1, --seconds > 0, --rate > 0, --prompt-words >= 1 and --engines >= 1 (2 with --pd) "
                "are needed")
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("benchmark ran too long")))
    signal.alarm(int(args.max_wall_s))
    os.sched_setaffinity(0, {CLIENT_CORE})
    procs = Processes()
    try:
        if not args.no_spin:
            for core in {PROXY_CORE, CLIENT_CORE}:
                procs.start([sys.executable, "-c", SPIN.format(limit=args.max_wall_s)], core, idle=True)
        if args.realtime:  # the proxies, started later, inherit it
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            except PermissionError:
                p.error("--realtime: SCHED_FIFO needs root (CAP_SYS_NICE)")
        summary = asyncio.run(run(args, procs))
    finally:
        signal.alarm(0)
        procs.stop_all()
    result = dict(summary["omnisim"])
    result.update(rate=args.rate, tokens=args.tokens, prompt_words=args.prompt_words, engines=args.engines, pd=args.pd, repeat=args.repeat,
                  realtime=args.realtime, proxy_loop=args.proxy_loop if args.proxy_loop != "auto" else (
                      "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"))
    if "vllm-router" in summary:
        result["vllm_router"] = summary["vllm-router"]
        result["max_rps_ratio_vs_vllm_router"] = result["max_rps"] / summary["vllm-router"]["max_rps"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
