"""Nanoseconds per step_time() call of the cost models (the simulator calls it up to a million times per run).

    python benchmarks/cost_speed.py [--calls N]
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from omnisim.cost import Parallelism, RooflineModel, TableModel

CONF = Path(__file__).resolve().parents[1] / "conf"


def load(group: str, name: str):
    """The shipped conf/GROUP/NAME.yaml spec, so the figures are for the models users run."""
    return instantiate(OmegaConf.load(CONF / group / f"{name}.yaml"))


def batches(n: int, seed: int = 0) -> list[tuple]:
    """Mixed steps: a third prefill-only, a third decode-only, a third both."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = rng.randint(1, 8192) if i % 3 != 1 else 0
        cached = rng.randint(0, 4096)
        d = rng.randint(1, 256) if i % 3 != 0 else 0
        out.append((p, p * (cached + (p + 1) / 2), cached + p, d, d * rng.randint(1, 8192), 1.0 + rng.random()))
    return out


def ns_per_call(model, args: list[tuple]) -> float:
    step = model.step_time
    start = time.perf_counter()
    for a in args:
        step(*a)
    return (time.perf_counter() - start) / len(args) * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300_000)
    calls = parser.parse_args().calls
    args = batches(calls)
    table = TableModel.from_measurements([
        {"prefill_tokens": p, "decode_seqs": d, "decode_context": c, "step_s": 0.01 + 1e-5 * p + 1e-4 * d + 1e-8 * c}
        for p, d, c in ((0, 1, 100), (0, 8, 900), (0, 64, 9000), (0, 32, 200), (512, 0, 0), (2048, 4, 400),
                        (4096, 0, 0), (1024, 16, 5000))])
    llama, deepseek, h100 = load("model", "llama3_8b"), load("model", "deepseek_r1"), load("hardware", "h100")
    models = {
        "roofline llama3_8b h100 tp1": RooflineModel(llama, h100),
        "roofline llama3_8b h100 tp4": RooflineModel(llama, h100, Parallelism(tp=4)),
        "roofline deepseek_r1 h100 dp8 ep8 overlap": RooflineModel(deepseek, h100, Parallelism(dp=8, ep=8),
                                                                   comm_overlap=0.5),
        "table (fitted)": table,
    }
    loop = time.perf_counter()
    for a in args:
        pass
    loop_ns = (time.perf_counter() - loop) / len(args) * 1e9
    print(f"calls per model: {calls}; bare loop overhead {loop_ns:.0f} ns/call (included below)")
    for name, model in models.items():
        ns_per_call(model, args[: calls // 10])  # warm-up
        best = min(ns_per_call(model, args) for _ in range(3))
        print(f"{name:45s} {best:7.0f} ns/call")


if __name__ == "__main__":
    main()
