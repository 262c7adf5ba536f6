"""The simulator against real vLLM on this machine: the same workloads on ``backend=vllm`` and ``backend=sim``.

    python benchmarks/fidelity.py --case cpu [--repeats 3] [--quick] [--out fidelity.json] [--serving vllm_cpu]
    python benchmarks/fidelity.py --case cpu --rescore fidelity.json [...]   # saved real runs, today's simulator

Cases (real vllm-cpu serving the tiny random Llama, one OpenMP thread per engine, behind the omnisim proxy and
load generator; the simulator with ``serving=vllm_cpu``, whose costs benchmarks/serving_costs.py measured):
- colocated: one instance (experiment=cpu_tiny_colocated), two Poisson loads (3 and 8 req/s);
- colocated2: two instances sharing the cores on a prefix-sharing workload (experiment=cpu_tiny_colocated2, 16
  shared 384-token prefixes), routed by round_robin and by prefix_aware;
- pd: 1P1D through vLLM's ExampleConnector (experiment=cpu_tiny_1p1d).
(colocated runs on the first of colocated2's two servers while the other idles: one start of them for both.)
``--quick`` (the smoke test's size): one server, the first colocated load with 12 requests, no repeat.
Calibration and validation are disjoint: the serving costs come from single requests and fixed batches
(serving_costs.py), the step times from in-process engine steps (cost_calibration.py); the loads here (rates,
lengths, seeds, the routing policies) are used for nothing but this comparison.

Every server first runs one step of each token count 1..WARM_TOKENS (eager PyTorch builds kernels per GEMM shape
on first use; the simulator is told, serving.warm_tokens). Each real run is repeated (prefix caches and the
connector's files cleared in between); the simulator runs once (it is deterministic) with
``serving.background_cores`` = the CPU that other processes used during the real runs
(measured from /proc/stat minus our processes) and ``serving.steal`` = the part of the CPU time our processes
wanted that the hypervisor gave to other guests (/proc/stat's steal), so it is told how busy the machine was, not
fitted to it; "sim@0bg" is the simulation of a quiet machine (neither).
Printed: per case, workload and policy, TTFT / TPOT / E2E p50 and p90 and output tokens/s, real (median of the
repeats) and its spread (largest distance of a repeat from that median, in %), sim, and the error in %; load
averages with every real run. Last line: a JSON object with ``max_abs_error_pct`` (over every p50/p90),
``real_spread_pct`` (the largest spread), ``within_target`` (every p50/p90 within 10% or within its spread),
``policy_ranking_agrees`` (the simulator orders the two policies by TTFT p50 and by E2E p50 as real vLLM does) and
``cases``. ``--rescore`` simulates the runs of saved ``--out`` files again (each told its runs' background and
steal) against their real figures, without servers: how coefficients or a model change fare on earlier runs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serving_costs  # noqa: E402
from serving_costs import WARM_TOKENS, config, log, servers, wait_quiet, warm_up  # noqa: E402

from backends.vllm.host_load import HostLoad  # noqa: E402

METRICS = [("ttft_s", "p50"), ("ttft_s", "p90"), ("tpot_s", "p50"), ("tpot_s", "p90"), ("e2e_s", "p50"),
           ("e2e_s", "p90")]
TARGET_PCT = 10.0
# Outputs long enough for TPOT to mean something; prompts up to a few hundred tokens.
LENGTHS = ["workload.lengths.prompt.low=40", "workload.lengths.prompt.high=400", "workload.lengths.output.low=8",
           "workload.lengths.output.high=48"]


def poisson(rate: float, n: int, seed: int) -> list[str]:
    return [*LENGTHS, f"workload.rate={rate}", f"workload.max_requests={n}", f"seed={seed}"]


def cases(quick: bool) -> list[dict]:
    """Each case: its experiment and the runs on one set of servers (workload overrides, policy)."""
    n = 12 if quick else 60
    colocated = {"name": "colocated", "experiment": "cpu_tiny_colocated", "runs": [
        {"workload": "rate3", "proxy": "round_robin", "overrides": poisson(3, n, 101)},
        {"workload": "rate8", "proxy": "round_robin", "overrides": poisson(8, n, 102)},
    ]}
    if quick:
        colocated["runs"] = colocated["runs"][:1]
        return [colocated]
    colocated["servers"] = "cpu_tiny_colocated2"  # the first of those two servers; the other idles meanwhile
    prefix = ["workload.rate=6", f"workload.max_requests={n}", "workload.lengths.output.low=8",
              "workload.lengths.output.high=32", "seed=103"]
    return [
        colocated,
        {"name": "colocated2", "experiment": "cpu_tiny_colocated2", "runs": [
            {"workload": "prefix_rate6", "proxy": "round_robin", "overrides": prefix},
            {"workload": "prefix_rate6", "proxy": "prefix_aware", "overrides": prefix},
        ]},
        {"name": "pd", "experiment": "cpu_tiny_1p1d", "runs": [
            {"workload": "rate3", "proxy": "round_robin", "overrides": poisson(3, n, 104)},
        ]},
    ]


def reset_caches(launches, work_dirs: list[Path]) -> None:
    """Empty every server's prefix cache (vLLM's dev-mode endpoint) and the ExampleConnector's files, so a repeat
    starts as cold as the simulator does."""
    for x in launches:
        req = urllib.request.Request(x.url + "/reset_prefix_cache?reset_external=true", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30):
            pass
    for d in work_dirs:
        if d.is_dir():
            for child in d.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def real_run(case: dict, run: dict, launches, pids: dict, kv_dirs: list[Path], out: Path) -> dict:
    from omnisim.app import run_experiment

    base_port = min(x.port for x in launches)
    cfg = config(case["experiment"], "backend=vllm", "backend.start_servers=false", f"backend.base_port={base_port}",
                  f"proxy={run['proxy']}", *run["overrides"])
    reset_caches(launches, kv_dirs)
    wait_quiet()
    time.sleep(2.0)  # vLLM's shm queues stop polling 1 s after their last message: start every repeat idle
    with HostLoad(own=pids.values()) as load:
        summary = run_experiment(cfg, out)
    summary["host"] = load.summary()
    return summary


def sim_run(case: dict, run: dict, serving: str, background: float, steal: float, out: Path) -> dict:
    from omnisim.app import run_experiment

    cfg = config(case["experiment"], "backend=sim", "backend.progress=false", f"proxy={run['proxy']}",
                  f"serving={serving}", f"serving.background_cores={background:.4f}", f"serving.steal={steal:.4f}",
                  f"serving.warm_tokens={WARM_TOKENS}", *run["overrides"])
    return run_experiment(cfg, out)


def simulate(case: dict, run: dict, serving: str, background: float, steal: float, work: Path) -> tuple[dict, dict]:
    """The run simulated told ``background`` and ``steal``, and simulated on a quiet machine (neither)."""
    name = f"{case['name']}-{run['workload']}-{run['proxy']}"
    return (sim_run(case, run, serving, background, steal, work / f"{name}-sim"),
            sim_run(case, run, serving, 0.0, 0.0, work / f"{name}-sim0"))


def pick(summary: dict, metric: str, stat: str) -> float:
    value = summary[metric][stat]
    return float("nan") if value is None else float(value)


ROWS = [*METRICS, ("output_tokens_per_s", None)]  # what every case prints, in order


def row_name(metric: str, stat: str | None) -> str:
    return metric if stat is None else f"{metric.removesuffix('_s')}_{stat}"


def figure(summary: dict, metric: str, stat: str | None) -> float:
    return pick(summary, metric, stat) if stat else float(summary[metric])


def sim_columns(real: float, metric: str, stat: str | None, sim: dict, quiet: dict) -> dict:
    """A row's simulated figures against ``real``: the simulation told the background, and of a quiet machine."""
    out = {}
    for key, summary in (("sim", sim), ("sim_quiet", quiet)):
        value = figure(summary, metric, stat)
        out[key] = value
        out["error_pct" if key == "sim" else "error_quiet_pct"] = (value - real) / real * 100 if real else float("nan")
    return out


def compare(reals: list[dict], sim: dict, quiet: dict) -> list[dict]:
    """Per metric: the real repeats' median and spread, the simulation told the background, its error, and the
    simulation of a quiet machine (background 0) with its error."""
    rows = []
    for metric, stat in ROWS:
        values = [figure(s, metric, stat) for s in reals]
        real = statistics.median(values)
        spread = max(abs(v - real) for v in values) / real * 100 if real else float("nan")
        rows.append({"metric": row_name(metric, stat), "real": real, "real_runs": values, "spread_pct": spread,
                     **sim_columns(real, metric, stat, sim, quiet), "reported": stat is not None})
    return rows


def fmt(value: float, metric: str) -> str:
    return f"{value:9.1f}" if metric.startswith("output") else f"{value * 1e3:9.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["cpu"], required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one colocated load, 12 requests, one repeat")
    parser.add_argument("--serving", default="vllm_cpu", help="conf/serving option the simulator runs with")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write every figure as JSON here")
    parser.add_argument("--rescore", type=Path, nargs="+", default=None,
                        help="saved --out files: simulate their runs again against their real figures (no servers)")
    parser.add_argument("--wait-quiet", type=float, nargs=2, metavar=("LOAD", "MAX_WAIT_S"), default=(0.0, 0.0),
                        help="before each real run wait up to MAX_WAIT_S for a 1-min load average below LOAD")
    args = parser.parse_args(argv)
    serving_costs.QUIET["load"], serving_costs.QUIET["max_wait_s"] = args.wait_quiet
    repeats = 1 if args.quick else args.repeats
    if args.rescore:
        for path in args.rescore:
            print(f"{path}:")
            report(rescore(json.loads(path.read_text()), args.serving), args)
        return
    work = Path(tempfile.mkdtemp(prefix="omnisim-fidelity-"))
    results = []
    chosen = [c for c in cases(args.quick) if not args.only or c["name"] in args.only]
    by_servers: dict[str, list[dict]] = {}
    for case in chosen:  # cases on the same servers run on one start of them
        by_servers.setdefault(case.get("servers", case["experiment"]), []).append(case)
    try:
        for server_experiment, group in by_servers.items():
            with servers(server_experiment) as (_, settings, launches, pids):
                kv_dirs = [Path(settings.work_dir) / "kv_store"]
                warm_up(settings, launches, WARM_TOKENS)
                for case in group:
                    for run in case["runs"]:
                        results.append(run_case(case, run, launches, pids, kv_dirs, work, repeats, args.serving))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)


def run_case(case: dict, run: dict, launches, pids: dict, kv_dirs: list[Path], work: Path, repeats: int,
             serving: str) -> dict:
    """One workload under one policy: the real repeats, then the simulator told their background, and quiet."""
    name = f"{case['name']}-{run['workload']}-{run['proxy']}"
    reals = []
    for r in range(repeats):
        s = real_run(case, run, launches, pids, kv_dirs, work / f"{name}-{r}")
        reals.append(s)
        log(f"{name} real #{r}: TTFT p50 {s['ttft_s']['p50'] * 1e3:.1f} ms, host {s['host']}")
    background = statistics.mean(s["host"].get("background_cores") or 0.0 for s in reals)
    steal = statistics.mean(s["host"].get("steal_fraction") or 0.0 for s in reals)
    sim, quiet = simulate(case, run, serving, background, steal, work)
    return {"case": case["name"], "workload": run["workload"], "proxy": run["proxy"],
            "requests": reals[0]["requests"], "loadavg_1m": [round(s["host"]["loadavg_1m_end"], 2) for s in reals],
            "background_cores": background, "steal": steal,
            "steal_runs": [round(s["host"].get("steal_fraction") or 0.0, 3) for s in reals],
            "rows": compare(reals, sim, quiet)}


def rescore(saved: dict, serving: str) -> list[dict]:
    """The results of a saved run with the simulator run again (``serving``), the real figures as they were."""
    runs = {(c["name"], r["workload"], r["proxy"]): (c, r) for c in cases(False) for r in c["runs"]}
    named = {row_name(metric, stat): (metric, stat) for metric, stat in ROWS}
    results = []
    with tempfile.TemporaryDirectory(prefix="omnisim-rescore-") as work:
        for res in saved["results"]:
            case, run = runs[(res["case"], res["workload"], res["proxy"])]
            sim, quiet = simulate(case, run, serving, res["background_cores"], res["steal"], Path(work))
            rows = [{**row, **sim_columns(row["real"], *named[row["metric"]], sim, quiet)} for row in res["rows"]]
            results.append({**res, "rows": rows})
    return results


def report(results: list[dict], args) -> None:
    print(f"{'case':<11} {'workload':<13} {'policy':<13} {'metric':<19} {'real':>9} {'spread%':>8} {'sim':>9} "
          f"{'error%':>8} {'sim@0bg':>9} {'error%':>8}   (ms; output tokens/s)")
    errors, spreads, within = [], [], True
    for res in results:
        for row in res["rows"]:
            print(f"{res['case']:<11} {res['workload']:<13} {res['proxy']:<13} {row['metric']:<19} "
                  f"{fmt(row['real'], row['metric'])} {row['spread_pct']:8.1f} {fmt(row['sim'], row['metric'])} "
                  f"{row['error_pct']:+8.1f} {fmt(row['sim_quiet'], row['metric'])} {row['error_quiet_pct']:+8.1f}")
            if row["reported"]:
                errors.append(abs(row["error_pct"]))
                spreads.append(row["spread_pct"])
                within &= abs(row["error_pct"]) <= max(TARGET_PCT, row["spread_pct"])
        print(f"{'':<11} load average (1 min) {res['loadavg_1m']}, other processes' CPU "
              f"{res['background_cores']:.2f} cores, steal {res['steal_runs']}, {res['requests']} requests")
    ranking = policy_ranking(results)
    figures = {"max_abs_error_pct": round(max(errors), 2) if errors else None,
               "real_spread_pct": round(max(spreads), 2) if spreads else None,
               "within_target": within, "policy_ranking_agrees": ranking,
               "cases": sorted({r["case"] for r in results})}
    if args.out:
        args.out.write_text(json.dumps({"results": results, **figures}, indent=1, default=float) + "\n")
    print(json.dumps(figures))


def policy_ranking(results: list[dict]) -> bool | None:
    """True when, for every workload run under two policies, the simulator orders them as real vLLM does by TTFT
    p50 and by E2E p50; None when no workload ran under two policies."""
    by_workload: dict = {}
    for res in results:
        by_workload.setdefault((res["case"], res["workload"]), []).append(res)
    agree = None
    for runs in by_workload.values():
        if len(runs) != 2:
            continue
        for metric in ("ttft_p50", "e2e_p50"):
            a, b = ({r["metric"]: r for r in run["rows"]}[metric] for run in runs)
            same = (a["real"] < b["real"]) == (a["sim"] < b["sim"])
            agree = same if agree is None else agree and same
    return agree


if __name__ == "__main__":
    main()
