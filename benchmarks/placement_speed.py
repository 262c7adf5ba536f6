"""How fast placement policies rebalance DeepSeek-R1 (58 MoE layers x 256 experts onto 288 slots), and how much one
MoeRuntime.step call costs the simulator.

    python benchmarks/placement_speed.py [--repeats 7]

Target: a full rebalance computes in under 100 ms. Each figure is the median of the repeats (the VM's two cores are
shared, so medians, not minima or means); one warm-up call first.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from hydra.utils import get_class

from omnisim.app import compose_option, config_options
from omnisim.core import ExpertLoad, Placement, Topology
from omnisim.moe import DriftingLoad, MoeRuntime, RebalanceConfig, ZipfLoad
from omnisim.policies.placement import StaticPlacement
from omnisim.policies.placement.layout import contiguous_layout

# Every conf/placement policy, built with its constructor's default settings (as these figures always were).
POLICIES = {name: get_class(compose_option("placement", name)["_target_"]) for name in config_options("placement")}

TOPOLOGIES = {"EP32": Topology(32, 9, 4, 8), "EP144": Topology(144, 2, 18, 8), "EP288": Topology(288, 1, 36, 8)}


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def rebalance_speed(repeats: int, topologies: dict) -> None:
    load = ExpertLoad(ZipfLoad(0.6, 0.2, seed=0).shares(0.0, 58, 256) * 1e6)
    print(f"full rebalance, 58 x 256 -> 288 slots, median of {repeats} (ms; target < 100)")
    print(f"{'policy':24s}" + "".join(f"{ep:>9s}" for ep in topologies))
    for name, cls in POLICIES.items():
        row = []
        for topo in topologies.values():
            start = Placement(contiguous_layout(58, 256, topo))
            row.append(median_ms(lambda: cls().rebalance(load, start, topo), repeats))
        print(f"{name:24s}" + "".join(f"{ms:9.1f}" for ms in row))


def runtime_speed(steps: int) -> None:
    print(f"\nMoeRuntime.step, EP144, 58 x 256 top-8, decode batches of 96..160 tokens, 40 ms steps, "
          f"{steps * 0.04 / 60:.1f} min simulated")
    rng = np.random.default_rng(0)
    tokens = rng.integers(96, 160, steps)
    cases = {
        "static, zipf (no rebalancing)": (ZipfLoad(0.6, 0.2), POLICIES["static"](), RebalanceConfig()),
        "static, drifting": (DriftingLoad(0.6, 0.2), StaticPlacement(), RebalanceConfig()),
        "omni_placement, drifting, 60 s": (DriftingLoad(0.6, 0.2), POLICIES["omni_placement"](),
                                           RebalanceConfig(period_s=60, window_s=60)),
        "migration_aware, drifting, 60 s": (DriftingLoad(0.6, 0.2), POLICIES["migration_aware"](),
                                            RebalanceConfig(period_s=60, window_s=60)),
    }
    for label, (load, policy, rebalance) in cases.items():
        rt = MoeRuntime.for_ep(58, 256, 8, 144, load, policy, rebalance, 3 * 7168 * 2048, seed=0)
        began = time.perf_counter()
        now = 0.0
        for t in tokens:
            _, stall = rt.step(now, int(t))
            now += 0.04 + stall
        per_call = (time.perf_counter() - began) / len(tokens) * 1e6
        print(f"  {label:34s} {per_call:8.1f} us per call (amortised, rebalances included)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--topologies", default=",".join(TOPOLOGIES), help=f"some of {','.join(TOPOLOGIES)}")
    p.add_argument("--steps", type=int, default=30_000, help="MoeRuntime.step calls per case (30,000 = 20 min)")
    args = p.parse_args()
    unknown = set(args.topologies.split(",")) - set(TOPOLOGIES)
    if unknown or args.repeats < 1 or args.steps < 1:
        p.error(f"--topologies from {sorted(TOPOLOGIES)} (not {sorted(unknown)}), --repeats and --steps >= 1")
    rebalance_speed(args.repeats, {k: TOPOLOGIES[k] for k in args.topologies.split(",")})
    runtime_speed(args.steps)


if __name__ == "__main__":
    main()
