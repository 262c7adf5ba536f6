"""Decode TPOT with and without expert balancing in the simulator, on OmniInfer's DeepSeek-R1 7P8-1D32 deployment
(experiment=omniinfer_r1_7p1d: decode EP32 with 32 redundant slots, prefill EP8).

    python benchmarks/placement_sim.py [--requests 1500] [--rates 10.3,20] [--loads zipf,drifting]

For every (expert load, request rate) the same workload runs with each placement setting; the table gives mean and
p90 TPOT, p90 TTFT, the decode instance's mean MoE imbalance factor, the moves and stall, and TPOT's change against
static. OmniInfer reports TPOT -36% for its whole stack (placement plus its other modules), not for placement alone.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from omnisim.app import CONF_DIR, run_experiment

SETTINGS = {
    "static": ("static", "none"),
    "deepseek_eplb offline": ("deepseek_eplb", "none"),
    "deepseek_eplb sync (vLLM)": ("deepseek_eplb", "vllm"),
    "omni_placement_static": ("omni_placement_static", "none"),
    "omni_placement": ("omni_placement", "omni"),
    "migration_aware": ("migration_aware", "periodic"),
    "predictive": ("predictive", "periodic"),
}


def run(load: str, rate: float, requests: int, placement: str, rebalance: str, out: Path) -> dict:
    overrides = ["experiment=omniinfer_r1_7p1d", f"placement={placement}", f"expert_load={load}",
                 f"rebalance={rebalance}", f"workload.rate={rate}", f"workload.max_requests={requests}", "seed=0"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return run_experiment(cfg, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--rates", default="10.3,20")
    p.add_argument("--loads", default="zipf,drifting")
    p.add_argument("--settings", default=",".join(SETTINGS))
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="placement-sim-"))
    for load in args.loads.split(","):
        for rate in (float(r) for r in args.rates.split(",")):
            print(f"\nexpert_load={load}, {rate:g} req/s, {args.requests} requests")
            print(f"  {'placement':27s}{'TPOT ms':>9s}{'p90':>8s}{'vs static':>11s}{'TTFT p90':>10s}"
                  f"{'decode imb':>11s}{'moves':>8s}{'stall s':>9s}{'QPM':>8s}")
            base = None
            for label in args.settings.split(","):
                placement, rebalance = SETTINGS[label]
                out = root / f"{load}-{rate}-{placement}-{rebalance}"
                s = run(load, rate, args.requests, placement, rebalance, out)
                tpot = s["tpot_s"]["mean"] * 1e3
                base = tpot if base is None else base
                print(f"  {label:27s}{tpot:9.2f}{s['tpot_s']['p90'] * 1e3:8.2f}{(tpot / base - 1) * 100:10.1f}%"
                      f"{s['ttft_s']['p90'] * 1e3:10.0f}{s.get('moe_imbalance_mean.decode-0', float('nan')):11.3f}"
                      f"{s.get('moe_moves.decode-0', 0):8.0f}{s.get('moe_stall_s.decode-0', 0):9.2f}{s['qpm']:8.1f}")


if __name__ == "__main__":
    main()
