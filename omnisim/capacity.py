"""Capacity at an SLO: the highest load at which a config still meets its SLO at a given attainment ("QPM at SLA",
the figure published serving systems quote), found by bracketing and bisection over runs.

    omnisim-capacity experiment=omniinfer_r1_7p1d                       # open loop: workload.rate
    omnisim-capacity workload=closed_loop --knob workload.concurrency   # closed loop: clients
    omnisim-capacity experiment=omniinfer_r1_7p1d --attainment 0.9 --tolerance 0.02 --max-runs 16

A run meets the SLO when at least ``attainment`` of its requests meet both thresholds of its ``slo`` (TTFT and
TPOT; OmniInfer's SLA by default): requests the proxy dropped count as missing it, requests rejected for their
length (status "error") are left out, as they would be at any load. Runs are made on the config's backend (the
simulator unless ``backend=`` says otherwise) with the same overrides as ``omnisim`` and the knob set per run. The
search starts at the configured value, doubles or halves it until one run meets the SLO and one does not, then
bisects until the two are within ``tolerance`` (relative; one client for an integer knob). The last line printed
is a JSON object with ``rate`` (the knob's highest value that met the SLO), ``qpm_at_sla`` (the load that run
offered, in requests per minute: its ``offered_rate_per_s`` x 60, which for ``workload.rate`` is the rate itself),
``attainment`` (in that run), ``knob`` and ``runs`` (every run made, in order, each with its ``qpm``: completed
requests per minute over the whole run, drain included, which a finite run's long outputs pull far below the
offered load).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Callable

MEETS_DEFAULT = 0.9


@dataclass
class Capacity:
    knob: str
    rate: float | None  # None: not even the lowest value tried met the SLO
    qpm_at_sla: float | None
    attainment: float | None
    runs: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"knob": self.knob, "rate": self.rate, "qpm_at_sla": self.qpm_at_sla, "attainment": self.attainment,
                "runs": self.runs}


def run_attainment(summary: dict) -> float:
    """The share of requests that met the SLO, counting dropped ones as missing it (length rejections left out)."""
    completed, dropped = summary["completed"], summary["dropped"]
    if completed + dropped == 0:
        return 0.0
    return (summary["slo_attainment"] or 0.0) * completed / (completed + dropped)


def simulate(overrides: list[str]) -> dict:
    """One run of the config ``overrides`` compose to, as ``omnisim`` makes it (no files written): its summary."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from omnisim.app import CONF_DIR, build_experiment
    from omnisim.metrics import summarize

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    experiment, backend = build_experiment(cfg)
    result = backend.run(experiment, None)
    if len(result.records) == 0:
        raise ValueError("the workload produced no requests (check workload.max_requests, workload.duration_s)")
    summary = summarize(result.records, experiment.slo, result.instances)
    summary.update(result.extra)
    return summary


def configured_value(overrides: list[str], knob: str) -> float:
    """The knob's value in the composed config (the search's starting point)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from omnisim.app import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    value = OmegaConf.select(cfg, knob, default=None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"--knob {knob}: the composed config has {value!r} there; give a key holding a positive "
                         f"number (workload.rate, workload.rate_scale, workload.concurrency)")
    return float(value)


def find_capacity(overrides: list[str], *, knob: str = "workload.rate", attainment: float = MEETS_DEFAULT,
                  tolerance: float = 0.02, max_runs: int = 16, integer: bool | None = None, start: float | None = None,
                  run: Callable[[list[str]], dict] = simulate, progress: Callable[[dict], None] | None = None
                  ) -> Capacity:
    """The highest value of ``knob`` whose run meets the SLO at ``attainment``; see the module docstring."""
    if not 0.0 < attainment <= 1.0:
        raise ValueError(f"attainment: expected a fraction in (0, 1], got {attainment}")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance: expected a relative width in (0, 1), got {tolerance}")
    if max_runs < 2:
        raise ValueError(f"max_runs: at least 2 runs are needed to bracket the capacity, got {max_runs}")
    bad = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == knob]
    if bad:
        raise ValueError(f"{bad[0]}: the search sets {knob} itself (give a starting point with --start)")
    value = float(start) if start is not None else configured_value(overrides, knob)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"start: expected a positive number, got {value}")
    integer = knob.endswith("concurrency") if integer is None else integer
    result = Capacity(knob, None, None, None)
    tried: dict[float, dict] = {}

    def meets(v: float) -> bool:
        if v not in tried:
            shown = int(v) if integer else v
            summary = run([*overrides, f"{knob}={shown}"])
            row = {knob: shown, "attainment": run_attainment(summary), "qpm": summary["qpm"],
                   "offered_qpm": (summary.get("offered_rate_per_s") or 0.0) * 60.0,
                   "goodput_qpm": summary["goodput_qpm"], "ttft_p90_s": summary["ttft_s"]["p90"],
                   "tpot_p90_s": summary["tpot_s"]["p90"], "completed": summary["completed"],
                   "dropped": summary["dropped"]}
            row["meets"] = row["attainment"] >= attainment
            tried[v] = row
            result.runs.append(row)
            if progress is not None:
                progress(row)
        return tried[v]["meets"]

    def step(v: float, up: bool) -> float:
        nxt = v * 2 if up else v / 2
        return float(max(1, round(nxt))) if integer else nxt

    value = float(max(1, round(value))) if integer else value
    lo = hi = None
    while len(result.runs) < max_runs:  # bracket: lo meets, hi does not
        if meets(value):
            lo = value
            if hi is not None:
                break
            value = step(value, up=True)
        else:
            hi = value
            if lo is not None:
                break
            if integer and value <= 1:
                break  # one client misses the SLO: no load meets it
            value = step(value, up=False)
    while lo is not None and hi is not None and len(result.runs) < max_runs:
        if (hi - lo <= 1) if integer else (hi / lo - 1 <= tolerance):
            break
        mid = float(math.floor((lo + hi) / 2)) if integer else math.sqrt(lo * hi)
        if meets(mid):
            lo = mid
        else:
            hi = mid
    if lo is not None:
        best = tried[lo]
        result.rate, result.qpm_at_sla, result.attainment = best[knob], best["offered_qpm"], best["attainment"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omnisim-capacity", description=__doc__.split("\n\n")[0],
                                epilog="Overrides are those of omnisim, e.g. experiment=omniinfer_r1_7p1d.")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for omnisim")
    p.add_argument("--knob", default="workload.rate", help="the load to search (default workload.rate)")
    p.add_argument("--attainment", type=float, default=MEETS_DEFAULT, help="share of requests meeting the SLO")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative width of the final bracket")
    p.add_argument("--max-runs", type=int, default=16)
    p.add_argument("--start", type=float, help="the first value tried (default: the config's)")
    args = p.parse_args(argv)

    def show(row: dict) -> None:
        print(f"  {args.knob}={row[args.knob]:<10g} attainment {row['attainment']:.3f}  offered QPM "
              f"{row['offered_qpm']:8.1f}  completed QPM {row['qpm'] or 0:8.1f}  "
              f"TTFT p90 {_ms(row['ttft_p90_s'])}  TPOT p90 {_ms(row['tpot_p90_s'])}  "
              f"{'meets' if row['meets'] else 'misses'}", file=sys.stderr, flush=True)

    try:
        found = find_capacity(args.overrides, knob=args.knob, attainment=args.attainment, tolerance=args.tolerance,
                              max_runs=args.max_runs, start=args.start, progress=show)
    except (ValueError, FileNotFoundError) as e:
        print(f"omnisim-capacity: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra's own errors (unknown key or group): one line, as omnisim prints them
        if type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        print(f"omnisim-capacity: error: {e}", file=sys.stderr)
        return 2
    if found.rate is None:
        print(f"no {args.knob} tried met the SLO at attainment {args.attainment}", file=sys.stderr)
    else:
        print(f"capacity: {args.knob}={found.rate:g}, {found.qpm_at_sla:.1f} QPM offered at attainment "
              f"{found.attainment:.3f} (>= {args.attainment}), {len(found.runs)} runs", file=sys.stderr)
    print(json.dumps(found.as_dict()))
    return 0 if found.rate is not None else 1


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:7.1f} ms"


if __name__ == "__main__":
    sys.exit(main())
