"""Simulator speed and memory: simulated requests per CPU-second and peak RSS.

  python benchmarks/sim_speed.py --case a   # Llama-2-70B on A100, 4 colocated TP4 replicas, 10,000 requests with
                                            # Azure-conversation lengths, Poisson 4 req/s   (target >= 30,000 req/CPU-s)
  python benchmarks/sim_speed.py --case b   # DeepSeek-R1 7P1D on 910C, the Azure conversation trace at 10x its rate,
                                            # tiled to fill one simulated hour              (target < 60 s wall, < 2 GB)
  python benchmarks/sim_speed.py --case b cluster.decode.dp_mode=ranks cluster.decode.max_num_seqs=32
                                            # the same with the decode instance's 32 DP ranks as engine cores

Configs are composed from conf/ exactly as `omnisim` composes them. The timed part is the whole simulation: workload
generation or trace replay, every engine step, and the records DataFrame; not imports or config composition.
The last line printed is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from omnisim.app import CONF_DIR, build_experiment
from omnisim.core import Request
from omnisim.sim import Simulation

AZURE = "../shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
CASES = {
    "a": ["model=llama2_70b", "hardware=a100", "cluster=colocated4_tp4", "workload=poisson", "workload.rate=4.0",
          "workload.max_requests=10000", "~workload.lengths",
          f"+workload.lengths={{_target_: omnisim.workload.EmpiricalLengths, path: '{AZURE}', "
          "prompt_column: ContextTokens, output_column: GeneratedTokens}"],
    "b": ["model=deepseek_r1", "hardware=ascend_910c", "cluster=r1_7p1d", "workload=azure", "workload.rate_scale=10.0",
          "cost.moe_dispatch=all_to_all"],
}


class Tiled:
    """Replays a workload back to back until ``duration_s`` (case b: the 350 s the trace lasts at 10x, ten times)."""

    def __init__(self, inner, duration_s: float) -> None:
        self.inner, self.duration_s = inner, duration_s

    def requests(self):
        offset, n = 0.0, 0
        while True:
            last = 0.0
            for r in self.inner.requests():
                t = offset + r.arrival_s
                if t >= self.duration_s:
                    return
                yield Request(f"r{n}", t, r.prompt_tokens, r.output_tokens, r.prefix_hashes, r.hash_block_tokens)
                n += 1
                last = r.arrival_s
            offset += last + 1e-3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-requests", type=int, default=0, help="case a: fewer requests (a smoke test's size)")
    ap.add_argument("--duration-s", type=float, default=3600.0, help="case b: simulated seconds of tiled trace")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides, applied after the case's")
    args = ap.parse_args()
    if args.max_requests < 0 or args.duration_s <= 0:
        ap.error("--max-requests must be >= 0 and --duration-s > 0")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        overrides = [f"seed={args.seed}", *CASES[args.case]]
        if args.max_requests and args.case == "a":
            overrides.append(f"workload.max_requests={args.max_requests}")
        overrides += args.overrides
        cfg = compose("config", overrides=overrides)
    experiment, _ = build_experiment(cfg)
    if args.case == "b":
        experiment = experiment.__class__(**{**experiment.__dict__, "workload": Tiled(experiment.workload, args.duration_s)})
    wall, cpu = time.perf_counter(), time.process_time()
    result = Simulation(experiment).run()
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    n = len(result.records)
    ok = int((result.records.status == "ok").sum())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"case {args.case}: {n} requests ({ok} completed) over {result.extra['simulated_s']:.0f} simulated s "
          f"in {cpu:.2f} CPU-s / {wall:.2f} wall-s; peak RSS {peak_mb:.0f} MB")
    print(json.dumps({"case": args.case, "requests": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                      "requests_per_cpu_s": round(n / cpu, 1), "peak_rss_mb": round(peak_mb, 1),
                      "simulated_s": round(result.extra["simulated_s"], 1)}))


if __name__ == "__main__":
    main()
