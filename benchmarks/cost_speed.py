"""Nanoseconds per step_time() call of the cost models (the simulator calls it up to a million times per run).

    python benchmarks/cost_speed.py [--calls N]
"""
from __future__ import annotations

import argparse
import random
import time

from omnisim.cost import HardwareSpec, ModelSpec, Parallelism, RooflineModel, TableModel

DEEPSEEK = ModelSpec(name="deepseek_r1", layers=61, hidden=7168, heads=128, kv_heads=128, intermediate=18432,
                     vocab=129280, dtype_bytes=1, attention="mla", q_lora_rank=1536, kv_lora_rank=512,
                     qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts=256, top_k=8,
                     expert_intermediate=2048, shared_experts=1, first_dense_layers=3, num_expert_groups=8,
                     topk_groups=4)
LLAMA = ModelSpec(name="llama3_8b", layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256)
H100 = HardwareSpec(name="h100", bf16_tflops=989, int8_tflops=1979, hbm_GB=80, hbm_TBps=3.35, intra_node_GBps=450,
                    inter_node_GBps=50, devices_per_node=8)


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
    models = {
        "roofline llama3_8b h100 tp1": RooflineModel(LLAMA, H100),
        "roofline llama3_8b h100 tp4": RooflineModel(LLAMA, H100, Parallelism(tp=4)),
        "roofline deepseek_r1 h100 dp8 ep8 overlap": RooflineModel(DEEPSEEK, H100, Parallelism(dp=8, ep=8),
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
