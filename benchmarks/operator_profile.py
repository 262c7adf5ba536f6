"""Operator profiler in plain PyTorch: times the operators the roofline prices (GEMMs of a model's real shapes,
attention by phase and context, MoE grouped GEMMs by tokens per expert) on this machine's device with random
weights, writes them as a table with what they were measured on, and prints the roofline's error against them.

    python benchmarks/operator_profile.py --model llama2_70b --tp 2 --hardware a100 --out tables/   # on a GPU
    python benchmarks/operator_profile.py --model tiny_llama --hardware cpu --quick                 # anywhere
    python benchmarks/operator_profile.py --model llama2_70b --tp 2 --hardware a100 \
        --vidur vidur/data/profiling/compute/a100/meta-llama/Llama-2-70b-hf     # against Vidur's published A100 times

Written for a lent GPU (one prepared run: PyTorch only, no vLLM, no network); it runs on a CPU too, which is how CI
checks it, and on an Ascend NPU with ``--device npu`` (torch_npu; checked before anything runs, tested up to there).
Collectives need several devices: their coefficients come from public NCCL/HCCL figures (conf/hardware names each),
not from here. Times are medians of ``--repeats`` runs after a warm-up, synchronised per call on CUDA and NPU.
The roofline figure per operator is the hardware profile's: smooth(FLOPs / (peak * efficiency), bytes / (HBM *
efficiency)) + one kernel's latency (omnisim.cost.RooflineModel's per-operator rule). The last line is a JSON object:
per operator kind the median and worst error (roofline vs measured, %), the rows and the device. ``--vidur DIR``
times nothing: it reads the kernel times Vidur published for that model (benchmarks/vidur_profile.py says which),
an independent check of the roofline on hardware this project has no access to.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(group: str, name: str):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = ROOT / "conf" / group / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"operator_profile: no conf/{group}/{name}.yaml")
    return instantiate(OmegaConf.load(path))


def gemm_shapes(m, tp: int) -> list[tuple[str, int, int]]:
    """(name, K, N) of one layer's GEMMs on one of ``tp`` tensor-parallel devices."""
    if m.attention == "mla":
        q_out = m.heads * (m.qk_nope_head_dim + m.qk_rope_head_dim) // tp
        shapes = [("q_a", m.hidden, m.q_lora_rank or q_out), ("kv_a", m.hidden, m.kv_lora_rank + m.qk_rope_head_dim),
                  ("o", m.heads * m.v_head_dim // tp, m.hidden)]
        if m.q_lora_rank:
            shapes.append(("q_b", m.q_lora_rank, q_out))
    else:
        qkv = (m.heads + 2 * max(1, m.kv_heads // tp) * tp) * m.head_dim // tp
        shapes = [("qkv", m.hidden, qkv), ("o", m.heads * m.head_dim // tp, m.hidden)]
    if m.intermediate and m.dense_layers:
        shapes += [("gate_up", m.hidden, 2 * m.intermediate // tp), ("down", m.intermediate // tp, m.hidden)]
    return shapes


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def profile(model, tp: int, device: str, quick: bool, repeats: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16
    sync = {"cuda": lambda: torch.cuda.synchronize(), "npu": lambda: torch.npu.synchronize()}.get(device,
                                                                                                  lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    b = model.dtype_bytes
    rows = []
    tokens = (1, 16, 128, 512) if quick else (1, 8, 32, 128, 512, 2048, 8192)
    for name, k, n in gemm_shapes(model, tp):
        w = rand(k, n)
        for t in tokens:
            x = rand(t, k)
            rows.append(dict(op="gemm", name=name, m=t, k=k, n=n, flops=2.0 * t * k * n,
                             bytes=b * (k * n + t * k + t * n), seconds=timed(lambda: x @ w, repeats, sync)))
    heads = max(1, model.heads // tp)
    kv_heads = heads if model.attention == "mla" else max(1, model.kv_heads // tp)
    d = model.qk_nope_head_dim + model.qk_rope_head_dim if model.attention == "mla" else model.head_dim
    dv = model.v_head_dim if model.attention == "mla" else model.head_dim
    for ctx in ((64, 256) if quick else (128, 512, 1024, 2048, 4096)):
        q, kk, v = rand(1, heads, ctx, d), rand(1, heads, ctx, d), rand(1, heads, ctx, dv)
        rows.append(dict(op="prefill_attention", name="causal", m=ctx, k=d, n=heads,
                         flops=2.0 * heads * ctx * (ctx + 1) / 2 * (d + dv),
                         bytes=b * heads * ctx * (2 * d + 2 * dv),
                         seconds=timed(lambda: F.scaled_dot_product_attention(q, kk, v, is_causal=True), repeats,
                                       sync)))
    for batch in ((1, 8) if quick else (1, 8, 32, 128)):
        for ctx in ((128, 512) if quick else (512, 2048, 4096)):
            q = rand(batch, heads, 1, d)
            kk, v = rand(batch, kv_heads, ctx, d), rand(batch, kv_heads, ctx, dv)
            rows.append(dict(op="decode_attention", name="sdpa", m=batch, k=ctx, n=heads,
                             flops=2.0 * batch * heads * ctx * (d + dv), bytes=b * batch * kv_heads * ctx * (d + dv),
                             seconds=timed(lambda: F.scaled_dot_product_attention(q, kk, v, enable_gqa=True),
                                           repeats, sync)))
    if model.is_moe:
        experts = 4 if quick else 8  # experts one EP rank holds
        w_up, w_down = rand(experts, model.hidden, 2 * model.expert_intermediate), \
            rand(experts, model.expert_intermediate, model.hidden)
        for per_expert in ((1, 16) if quick else (1, 4, 16, 64, 256)):
            x = rand(experts, per_expert, model.hidden)

            def moe():
                h = torch.bmm(x, w_up)
                return torch.bmm(h[..., :model.expert_intermediate], w_down)

            flops = 2.0 * experts * per_expert * model.hidden * 3 * model.expert_intermediate
            weights = b * experts * 3 * model.hidden * model.expert_intermediate
            rows.append(dict(op="moe", name="grouped_gemm", m=per_expert, k=model.hidden, n=experts, flops=flops,
                             bytes=weights + b * experts * per_expert * 2 * model.hidden,
                             seconds=timed(moe, repeats, sync)))
    return rows


def roofline_s(row: dict, hw, dtype_bytes: float) -> float:
    """The hardware profile's time for one operator, as RooflineModel prices one."""
    peak = {"gemm": hw.gemm_flops(dtype_bytes), "moe": hw.gemm_flops(dtype_bytes),
            "prefill_attention": hw.attention_flops, "decode_attention": hw.attention_flops}[row["op"]]
    mem = hw.hbm_TBps * 1e12 * (hw.decode_attention_efficiency if row["op"] == "decode_attention"
                                else hw.memory_efficiency)
    c, m = row["flops"] / peak, row["bytes"] / mem
    n = hw.roofline_smoothing
    smooth = max(c, m) if math.isinf(n) else (c ** n + m ** n) ** (1.0 / n)
    return smooth + hw.kernel_latency_s


def npu_preflight(parser) -> None:
    """--device npu: torch_npu importable and one NPU visible, else a one-line error naming what is missing. Importing
    torch_npu registers the ``npu`` device and ``torch.npu`` with PyTorch."""
    sys.path.insert(0, str(ROOT))
    from backends.ascend.preflight import AscendUnavailable, missing_packages, npu_count

    if any(hint.startswith("torch-npu") for hint in missing_packages()):
        parser.error("--device npu needs torch_npu (Ascend's PyTorch adapter, matching the installed torch; needs "
                     "the CANN toolkit), not importable here")
    try:
        if npu_count() < 1:
            parser.error("--device npu: torch_npu sees no NPU (check ASCEND_RT_VISIBLE_DEVICES and npu-smi info)")
    except AscendUnavailable as e:
        parser.error(f"--device npu: {e}")
    import torch_npu  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="conf/model/NAME.yaml (its real shapes, random weights)")
    p.add_argument("--hardware", required=True, help="conf/hardware/NAME.yaml to compare the roofline of")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree whose per-device shapes to time")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "npu"), default="auto",
                   help="npu: an Ascend NPU through torch_npu (checked first; exits naming what is missing)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: two threads on two shared cores stall "
                   "at barriers whenever another process runs)")
    p.add_argument("--quick", action="store_true", help="a few small shapes (a smoke test)")
    p.add_argument("--out", type=Path, help="directory for operators_MODEL_HARDWARE.csv")
    p.add_argument("--vidur", type=Path, metavar="DIR", help="compare against Vidur's published profile of the model "
                   "in DIR (mlp.csv, attention.csv) instead of timing anything")
    args = p.parse_args(argv)
    if args.tp < 1 or args.repeats < 1:
        p.error("--tp and --repeats must be >= 1")
    if args.vidur is not None:
        return from_vidur(p, args)
    if args.device == "npu":
        npu_preflight(p)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    model, hw = load("model", args.model), load("hardware", args.hardware)
    began = time.time()
    rows = profile(model, args.tp, device, args.quick, args.repeats)
    name = torch.cuda.get_device_name() if device == "cuda" else torch.npu.get_device_name() if device == "npu" \
        else (platform.processor() or platform.machine())
    engine = f"torch {torch.__version__} (plain PyTorch operators, bf16, random weights)"
    return report(args, rows, hw, model, name, engine, began)


def from_vidur(p, args) -> int:
    """--vidur DIR: the roofline against Vidur's published kernel times of the model."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vidur_profile import vidur_rows

    model, hw = load("model", args.model), load("hardware", args.hardware)
    began = time.time()
    try:
        rows = vidur_rows(args.vidur, model, hw, args.tp)
    except (OSError, ValueError) as e:
        p.error(str(e))
    if not rows:
        p.error(f"--vidur {args.vidur}: no rows at power-of-two sizes for --tp {args.tp}")
    return report(args, rows, hw, model, f"Vidur profile {args.vidur}", "Vidur's published profile (CUDA events)",
                  began)


def report(args, rows: list[dict], hw, model, name: str, engine: str, began: float) -> int:
    """Prices every row by the roofline, prints the table and the JSON summary, writes --out."""
    for row in rows:
        if "roofline_s" not in row:
            row["roofline_s"] = roofline_s(row, hw, model.dtype_bytes)
        row["error_pct"] = (row["roofline_s"] / row["seconds"] - 1.0) * 100.0
    summary = {}
    for op in sorted({r["op"] for r in rows}):
        errors = [r["error_pct"] for r in rows if r["op"] == op]
        summary[op] = {"median_error_pct": round(statistics.median(errors), 1),
                       "worst_error_pct": round(max(errors, key=abs), 1), "rows": len(errors)}
    print(f"{'op':18s}{'name':>14s}{'m':>7s}{'k':>7s}{'n':>7s}{'measured us':>13s}{'roofline us':>13s}{'error':>8s}",
          file=sys.stderr)
    for r in rows:
        print(f"{r['op']:18s}{r['name']:>14s}{r['m']:7d}{r['k']:7d}{r['n']:7d}{r['seconds'] * 1e6:13.1f}"
              f"{r['roofline_s'] * 1e6:13.1f}{r['error_pct']:7.0f}%", file=sys.stderr)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"operators_{args.model}_{args.hardware}.csv"
        with path.open("w", newline="") as f:
            f.write(f"# engine: {engine}\n"
                    f"# model: {args.model}\n# hardware: {args.hardware} (device: {name})\n"
                    f"# parallel: tp={args.tp} dp=1 ep=1\n# date: {time.strftime('%Y-%m-%d')}\n"
                    f"# command: python benchmarks/operator_profile.py {' '.join(sys.argv[1:])}\n")
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps({"device": name, "model": args.model, "hardware": args.hardware, "tp": args.tp,
                      "rows": len(rows), "seconds": round(time.time() - began, 1), "ops": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
