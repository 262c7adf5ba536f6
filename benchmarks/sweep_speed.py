"""Sweep wall time on this machine: a 48-point multirun of OmniInfer's DeepSeek-R1 7P1D setup (3,000 requests each)
with the default joblib launcher, the same sweep on a local Ray head (hydra/launcher=ray), the launchers' overhead per
job (the same points with one request each, where a job is almost all overhead), and the capacity search's answer for
the setup with the runs it took.

    python benchmarks/sweep_speed.py                        # all of it: joblib, Ray, overhead, capacity
    python benchmarks/sweep_speed.py --launchers joblib     # only joblib
    python benchmarks/sweep_speed.py --tiny                 # 4 points of 30 requests (the smoke test's size)
    python benchmarks/sweep_speed.py --overhead-only --repeat 2   # one-request sweeps, joblib and Ray alternated

The points: proxy in {round_robin, least_load, omni_proxy, kv_aware} x workload.rate in {8, 10.3, 12, 14} x seed in
{0, 1, 2}, as `omnisim -m experiment=omniinfer_r1_7p1d proxy=... workload.rate=... seed=...` runs them, with
plots=false (a run's plots cost about as much CPU as its simulation; --plots keeps them). Both launchers get one
job per core: joblib's default n_jobs=-1, a Ray head with --num-cpus = the core count. The machine's load average
is printed before and after: wall times taken on a shared machine say so. Last line: JSON of every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnisim import results  # noqa: E402
from omnisim.sweeps import LocalRayHead  # noqa: E402

FULL = {"proxy": "round_robin,least_load,omni_proxy,kv_aware", "workload.rate": "8,10.3,12,14", "seed": "0,1,2"}
TINY = {"proxy": "round_robin,least_load", "seed": "0,1"}


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def sweep(points: dict, extra: list[str], out: Path, launcher: list[str], env=None) -> dict:
    """One multirun through ``launcher``: its wall time and how many of its runs completed."""
    args = [sys.executable, "-m", "omnisim.app", "-m", "experiment=omniinfer_r1_7p1d",
            *(f"{k}={v}" for k, v in points.items()), *extra, "backend.progress=false", f"hydra.sweep.dir={out}",
            *launcher]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-3000:]}")
    runs = results.load(out)
    return {"jobs": len(runs), "complete": int(runs.complete.sum()), "wall_s": round(wall, 1),
            "requests": int(runs.requests.sum())}


def capacity(extra: list[str]) -> dict:
    args = [sys.executable, "-m", "omnisim.capacity", "experiment=omniinfer_r1_7p1d", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode not in (0, 1):  # 1: no load met the SLO, still a JSON answer
        raise SystemExit(f"omnisim-capacity failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"rate_per_s": found["rate"], "qpm_at_sla": found["qpm_at_sla"], "attainment": found["attainment"],
            "runs": len(found["runs"]), "wall_s": round(wall, 1), "command": "omnisim-capacity " + " ".join(args[3:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launchers", nargs="+", default=["joblib", "ray"], choices=["joblib", "ray"])
    p.add_argument("--tiny", action="store_true", help="4 points of 30 requests, capacity at 100 requests")
    p.add_argument("--plots", action="store_true", help="keep each run's plots (default: plots=false)")
    p.add_argument("--no-overhead", action="store_true", help="skip the one-request sweeps")
    p.add_argument("--no-capacity", action="store_true", help="skip omnisim-capacity")
    p.add_argument("--overhead-only", action="store_true",
                   help="only the one-request sweeps, launchers alternated --repeat times (a shared machine's load "
                        "drifts: alternating spreads it over both)")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)

    points = TINY if args.tiny else FULL
    size = ["workload.max_requests=30"] if args.tiny else []  # the experiment's own 3,000 otherwise
    extra = [*size, f"plots={'true' if args.plots else 'false'}"]
    cores = os.cpu_count() or 1
    figures: dict = {"points": points, "requests_per_point": 30 if args.tiny else 3000, "plots": args.plots,
                     "cores": cores, "load_before": load()}
    print(f"load average before: {figures['load_before']}  ({cores} cores)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="omnisim-sweep-speed-"))
    one_request = ["workload.max_requests=1", "plots=false"]
    if args.overhead_only:
        figures["requests_per_point"] = 1
        with LocalRayHead(num_cpus=cores) as head:
            figures["ray_head_start_s"] = round(head.start_s, 1)
            ray = ["hydra/launcher=ray", f"hydra.launcher.ray.init.address={head.address}"]
            for i in range(args.repeat):
                for name, launcher, env in (("joblib", [], None), ("ray", ray, head.env)):
                    f = sweep(points, one_request, work / f"{name}_1req_{i}", launcher, env=env)
                    f["wall_s_per_job"], f["load"] = round(f["wall_s"] / f["jobs"], 2), load()
                    figures.setdefault(f"{name}_1req", []).append(f)
                    print(f"{name}, one request per job, round {i}: {f}", flush=True)
        figures["load_after"] = load()
        print(json.dumps(figures))
        return 0

    if "joblib" in args.launchers:
        figures["joblib"] = sweep(points, extra, work / "joblib", [])
        print(f"joblib: {figures['joblib']}", flush=True)
        if not args.no_overhead:
            figures["joblib_1req"] = sweep(points, one_request, work / "joblib_1req", [])
            print(f"joblib, one request per job: {figures['joblib_1req']}", flush=True)
    if "ray" in args.launchers:
        with LocalRayHead(num_cpus=cores) as head:
            figures["ray_head_start_s"] = round(head.start_s, 1)
            print(f"ray head on {head.address} started in {head.start_s:.1f} s", flush=True)
            ray = ["hydra/launcher=ray", f"hydra.launcher.ray.init.address={head.address}"]
            figures["ray"] = sweep(points, extra, work / "ray", ray, env=head.env)
            print(f"ray: {figures['ray']}", flush=True)
            if not args.no_overhead:
                figures["ray_1req"] = sweep(points, one_request, work / "ray_1req", ray, env=head.env)
                print(f"ray, one request per job: {figures['ray_1req']}", flush=True)
    for name in ("joblib", "ray", "joblib_1req", "ray_1req"):
        if name in figures:
            f = figures[name]
            f["wall_s_per_job"] = round(f["wall_s"] / f["jobs"], 2)
    if "joblib" in figures and "ray" in figures:
        jobs = figures["joblib"]["jobs"]
        figures["ray_minus_joblib_s_per_job"] = round((figures["ray"]["wall_s"] - figures["joblib"]["wall_s"])
                                                      / jobs, 2)
    if not args.no_capacity:
        figures["capacity"] = capacity(["workload.max_requests=100", "--max-runs", "4"] if args.tiny else [])
        print(f"capacity: {figures['capacity']}", flush=True)
    figures["load_after"] = load()
    print(f"load average after: {figures['load_after']}", flush=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
