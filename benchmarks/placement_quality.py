"""Placement quality on DeepSeek-R1 (58 MoE layers x 256 experts, 32 redundant slots) at EP32 (prefill,
hierarchical: 4 nodes, 8 expert groups), EP144 and EP288 (decode).

    python benchmarks/placement_quality.py [--minutes 30] [--seeds 1] [--part static|drifting|both]

Part 1, one rebalance from the static layout on several load matrices (expected token counts): max/mean rank load
(sum over layers of the max / sum of the mean) per policy; checks that omni_placement and the own policies are no
worse than DeepSeek EPLB.

Part 2, drifting loads with migration counted: a MoeRuntime per policy serves a drifting load (fast: 4 of the 16
hottest experts per layer change every 60 s; slow: 2 every 300 s) for --minutes simulated minutes (rebalance every
60 s on the last 60 s of noisy counts; EP32: 4,096 tokens per rank per 1 s prefill step, EP144/EP288: 64 tokens per
rank per 50 ms decode step). Synchronous runs move everything at once and stall; asynchronous ones move one slot
per rank per step behind a double buffer. Reported: the mean step imbalance the simulator would apply,
the mean large-batch max/mean of the served placement, moves and bytes moved, stall seconds, and the overhead
``f * (imbalance - 1) + (stall + 0.05 * async transfer time) / duration`` with f = 0.4 the MoE share of a balanced
step (0.05: the slowdown double-buffered copies cause while they share the links).
"""
from __future__ import annotations

import argparse

import numpy as np

from omnisim.core import ExpertLoad, Placement, Topology
from omnisim.moe import BurstyLoad, DriftingLoad, MixedLoad, MoeRuntime, RebalanceConfig, ZipfLoad
from omnisim.policies.placement import (DeepSeekEplb, MigrationAwarePlacement, OmniPlacement, OmniPlacementStatic,
                                        PredictivePlacement, StaticPlacement)
from omnisim.policies.placement.layout import contiguous_layout, step_imbalance

LAYERS, EXPERTS, TOP_K, REDUNDANT = 58, 256, 8, 32
EXPERT_BYTES = 3 * 7168 * 2048          # FP8 DeepSeek-R1 expert
MOE_FRACTION, ASYNC_INTERFERENCE = 0.4, 0.05
TOPOLOGIES = {"EP32": Topology(32, 9, 4, 8), "EP144": Topology(144, 2, 18, 8), "EP288": Topology(288, 1, 36, 8)}
# (tokens per rank per step, step seconds)
TRAFFIC = {"EP32": (4096, 1.0), "EP144": (64, 0.05), "EP288": (64, 0.05)}


def load_matrices(seed: int) -> dict[str, np.ndarray]:
    burst = BurstyLoad(ZipfLoad(0.5, 0.2, seed=seed), rate_per_s=0.05, duration_s=60.0, experts=4, boost=6.0,
                       seed=seed)
    t_burst = next(t for t in np.arange(0.0, 3600.0, 1.0) if burst._active(t)[1] > burst._active(t)[0])
    mixed = MixedLoad([ZipfLoad(0.6, 0.2, seed=seed), ZipfLoad(0.6, 0.2, variant=1, seed=seed)], [[0.5, 0.5]])
    shares = {
        "zipf 0.3": ZipfLoad(0.3, 0.2, seed=seed).shares(0, LAYERS, EXPERTS),
        "zipf 0.6": ZipfLoad(0.6, 0.2, seed=seed).shares(0, LAYERS, EXPERTS),
        "zipf 0.9": ZipfLoad(0.9, 0.2, seed=seed).shares(0, LAYERS, EXPERTS),
        "drifting t=10min": DriftingLoad(0.6, 0.2, seed=seed).shares(600.0, LAYERS, EXPERTS),
        "bursty (in burst)": burst.shares(t_burst, LAYERS, EXPERTS),
        "mixed 50/50": mixed.shares(0.0, LAYERS, EXPERTS),
    }
    return {name: s * 1e6 for name, s in shares.items()}


def static_part(seeds: int) -> None:
    # fresh objects per case: the predictive policy learns from the loads it is shown
    policies = {"static": StaticPlacement, "deepseek_eplb": DeepSeekEplb,
                "omni_placement_static": OmniPlacementStatic, "omni_placement": OmniPlacement,
                "migration_aware": MigrationAwarePlacement,
                "migration_aware free": lambda: MigrationAwarePlacement(expert_bytes=1.0),
                "predictive": PredictivePlacement}
    print("Part 1: max/mean rank load after one rebalance from the static layout (lower is better); "
          "'free': moves cost nothing")
    worse = []
    for ep, topo in TOPOLOGIES.items():
        print(f"\n{ep} ({topo.num_ranks} ranks x {topo.slots_per_rank} slots, {topo.num_nodes} nodes)")
        print(f"  {'load':22s}" + "".join(f"{name[:21]:>22s}" for name in policies))
        for seed in range(seeds):
            for name, counts in load_matrices(seed).items():
                start = Placement(contiguous_layout(LAYERS, EXPERTS, topo))
                ratios = {p: step_imbalance(make().rebalance(ExpertLoad(counts), start, topo).phy2log, counts,
                                            topo.num_ranks) for p, make in policies.items()}
                print(f"  {name + f' s{seed}':22s}" + "".join(f"{r:22.4f}" for r in ratios.values()))
                worse += [(ep, name, seed, p, ratios[p], ratios["deepseek_eplb"]) for p in policies
                          if p not in ("static", "deepseek_eplb") and ratios[p] > ratios["deepseek_eplb"] * (1 + 1e-6)]
    print("\nworse than DeepSeek EPLB:", "none" if not worse else "")
    for ep, name, seed, p, r, d in worse:
        print(f"  {ep} {name} s{seed}: {p} {r:.4f} > {d:.4f} ({(r / d - 1) * 100:+.2f}%)")


def drifting_runs(step_s: float) -> dict[str, tuple]:
    """Each policy with the execution it is meant for; the own policies in both modes."""
    periodic = dict(period_s=60.0, window_s=60.0, num_redundant_experts=REDUNDANT)
    sync = RebalanceConfig(asynchronous=False, moves_per_rank_per_step=0, **periodic)
    paced = RebalanceConfig(moves_per_rank_per_step=1, **periodic)

    def aware(asynchronous: bool) -> MigrationAwarePlacement:
        if asynchronous:
            return MigrationAwarePlacement(stall_fraction=ASYNC_INTERFERENCE, moves_per_rank_per_step=1, step_s=step_s)
        return MigrationAwarePlacement(stall_fraction=1.0, moves_per_rank_per_step=0)

    return {
        "static": (StaticPlacement(), RebalanceConfig(num_redundant_experts=REDUNDANT, warm_start=False)),
        "deepseek_eplb sync (vLLM)": (DeepSeekEplb(), sync),
        "deepseek_eplb async": (DeepSeekEplb(), paced),
        "omni_placement async": (OmniPlacement(), paced),
        "migration_aware sync": (aware(False), sync),
        "migration_aware async": (aware(True), paced),
        "predictive sync": (PredictivePlacement(aware(False)), sync),
        "predictive async": (PredictivePlacement(aware(True)), paced),
    }


DRIFTS = {"fast": dict(changed_per_period=4, period_s=60.0), "slow": dict(changed_per_period=2, period_s=300.0)}


def drifting_part(minutes: float, seeds: int, exponent: float, drifts: list[str]) -> None:
    for drift in drifts:
        rate = DRIFTS[drift]
        print(f"\nPart 2 ({drift} drift): {rate['changed_per_period']} of the 16 hottest experts per layer change "
              f"every {rate['period_s']:g} s, zipf {exponent} +- 0.2; {minutes:g} min, rebalance every 60 s")
        for ep, topo in TOPOLOGIES.items():
            per_rank, step_s = TRAFFIC[ep]
            tokens = per_rank * topo.num_ranks
            steps_per_call = 1 if step_s >= 1.0 else 4
            print(f"\n{ep}: {tokens} tokens per {step_s * 1000:.0f} ms step")
            print(f"  {'policy':26s}{'imbalance':>10s}{'max/mean':>10s}{'moves':>9s}{'GB':>8s}{'stall s':>9s}"
                  f"{'overhead':>10s}")
            for label, (policy, rebalance) in drifting_runs(step_s).items():
                rows = []
                for seed in range(seeds):
                    load = DriftingLoad(exponent, 0.2, hot_set=16, seed=seed, **rate)
                    rt = MoeRuntime(LAYERS, EXPERTS, TOP_K, topo, load, policy, rebalance, EXPERT_BYTES, seed=seed)
                    now, duration = 0.0, minutes * 60
                    while now < duration:
                        _, stall = rt.step(now, tokens, steps_per_call)
                        now += steps_per_call * step_s + stall
                    summary, tables = rt.summary(), rt.tables()
                    overall = tables["moe_balancedness"].query("layer == -1")["max_over_mean"].mean()
                    async_s = tables["moe_rebalances"]["transfer_s"].sum() if rebalance.asynchronous else 0.0
                    overhead = MOE_FRACTION * (summary["moe_imbalance_mean"] - 1) + \
                        (summary["moe_stall_s"] + ASYNC_INTERFERENCE * async_s) / now
                    rows.append((summary["moe_imbalance_mean"], overall, summary["moe_moves"],
                                 summary["moe_moves"] * EXPERT_BYTES / 1e9, summary["moe_stall_s"], overhead))
                m = np.mean(rows, axis=0)
                print(f"  {label:26s}{m[0]:10.4f}{m[1]:10.4f}{m[2]:9.0f}{m[3]:8.1f}{m[4]:9.2f}{m[5] * 100:9.2f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--part", choices=("static", "drifting", "both"), default="both")
    p.add_argument("--exponent", type=float, default=0.4, help="zipf exponent of the drifting load (+- 0.2/layer)")
    p.add_argument("--drift", choices=("fast", "slow", "both"), default="both")
    args = p.parse_args()
    if args.part in ("static", "both"):
        static_part(args.seeds)
    if args.part in ("drifting", "both"):
        drifting_part(args.minutes, args.seeds, args.exponent, list(DRIFTS) if args.drift == "both" else [args.drift])


if __name__ == "__main__":
    main()
