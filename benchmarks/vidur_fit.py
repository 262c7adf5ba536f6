"""Fits a hardware profile's GEMM coefficients to the kernel times Vidur published for some models, and reports the
roofline's error on models it was not fitted to.

    V=vidur/data/profiling/compute/a100   # a checkout of microsoft/vidur; nothing of it is in this repository
    python benchmarks/vidur_fit.py --hardware a100 \\
        --fit $V/codellama/CodeLlama-34b-Instruct-hf $V/Qwen/Qwen-72B $V/internlm/internlm-20b \\
              $V/meta-llama/Llama-2-7b-hf \\
        --hold-out $V/meta-llama/Llama-2-70b-hf $V/meta-llama/Meta-Llama-3-8B $V/meta-llama/Meta-Llama-3-70B

Every model folder's ``mlp.csv`` gives its four GEMMs per layer (qkv, o, gate_up, down) at every power-of-two token
count and tensor-parallel degree it has (``vidur_profile.vidur_rows``; the shapes come from the table itself). The
GEMMs of the ``--fit`` models are fitted by least squares in log time (``roofline_fit.fit_roofline``) for the
profile's ``gemm_efficiency`` (BF16), ``memory_efficiency`` and ``kernel_latency_s`` at its ``roofline_smoothing``,
and their five small kernels (norms, rope, activation, residual add) for ``elementwise_efficiency`` at that per-kernel
cost, on the token counts whose traffic outweighs it (``roofline_fit.fit_memory_fraction``); then every model, fitted
and held out, is priced by the profile as it is and as fitted: per GEMM and per layer without attention
(``RooflineModel.breakdown``: the GEMMs, norms, rope, activation and residual add, with their per-kernel costs) and
its small kernels, median and worst error per model and degree. The last line is a JSON object: the profile's and the
fitted coefficients, the fit's own error, and a row per model and degree.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from operator_profile import load, roofline_s  # noqa: E402
from roofline_fit import fit_memory_fraction, fit_roofline  # noqa: E402
from vidur_profile import SMALL_OPS, _read, vidur_model, vidur_rows  # noqa: E402

FITTED = ("gemm_efficiency", "memory_efficiency", "kernel_latency_s", "elementwise_efficiency")


def degrees(directory: Path) -> list[int]:
    """The tensor-parallel degrees a Vidur model folder's mlp.csv has rows of."""
    frame = _read(Path(directory) / "mlp.csv")
    if "num_tensor_parallel_workers" not in frame.columns:
        raise ValueError(f"{directory}/mlp.csv: not a Vidur profile, missing column num_tensor_parallel_workers")
    return sorted({int(v) for v in frame["num_tensor_parallel_workers"].dropna().unique()})


def model_rows(directory: Path, hw) -> dict[int, tuple]:
    """{tp: (model, rows priced by hw)} of one Vidur model folder."""
    model = vidur_model(directory)
    out = {}
    for tp in degrees(directory):
        if model.heads % tp or model.intermediate % tp:
            continue  # a degree the shapes do not divide by (vLLM refuses it too)
        out[tp] = (model, vidur_rows(directory, model, hw, tp))
    if not out:
        raise ValueError(f"{directory}: no tensor-parallel degree of mlp.csv divides the model's heads")
    return out


def errors(rows: list[dict], model, hw) -> dict:
    """Median and worst error (%) of the GEMMs and of the layer, priced by ``hw``."""
    out = {}
    for op, key in (("gemm", "gemm"), ("layer_dense", "layer"), ("elementwise", "elementwise")):
        e = [((roofline_s(r, hw, model.dtype_bytes) if op == "gemm" else r["roofline_s"]) / r["seconds"] - 1)
             * 100 for r in rows if r["op"] == op]
        if e:
            out[f"{key}_median_pct"] = round(statistics.median(e), 1)
            out[f"{key}_worst_pct"] = round(max(e, key=abs), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hardware", required=True, help="conf/hardware/NAME.yaml whose GEMM coefficients to fit")
    p.add_argument("--fit", type=Path, nargs="+", required=True, metavar="DIR", help="Vidur model folders to fit on")
    p.add_argument("--hold-out", type=Path, nargs="*", default=[], metavar="DIR",
                   help="Vidur model folders to report on only")
    args = p.parse_args(argv)
    shared = {d.resolve() for d in args.fit} & {d.resolve() for d in args.hold_out}
    if shared:
        p.error(f"--hold-out repeats a --fit folder: {', '.join(sorted(map(str, shared)))}")
    hw = load("hardware", args.hardware)
    try:
        sets = {"fit": {d: model_rows(d, hw) for d in args.fit},
                "held_out": {d: model_rows(d, hw) for d in args.hold_out}}
    except (OSError, ValueError) as e:
        p.error(str(e))

    gemms = [r for by_tp in sets["fit"].values() for _, rows in by_tp.values() for r in rows if r["op"] == "gemm"]
    fit = fit_roofline([r["flops"] for r in gemms], [r["bytes"] for r in gemms], [r["seconds"] for r in gemms],
                       hw.bf16_tflops * 1e12, hw.hbm_TBps * 1e12, hw.roofline_smoothing)  # Vidur's are 16-bit
    # the small kernels' HBM fraction, at the per-kernel cost the GEMMs fitted, from the rows their traffic dominates
    # (at the fitted streaming fraction, at least the kernels' fixed cost): few tokens run one thread block per token
    # over the whole width, a latency no bandwidth explains
    fixed_s = len(SMALL_OPS) * fit["kernel_latency_s"]
    streaming = hw.hbm_TBps * 1e12 * fit["memory_efficiency"]
    small = [r for by_tp in sets["fit"].values() for _, rows in by_tp.values() for r in rows
             if r["op"] == "elementwise" and r["bytes"] / streaming >= fixed_s]
    if not small:
        p.error("the --fit models have no token count whose small kernels move enough bytes to fit their HBM fraction")
    elementwise = fit_memory_fraction([r["bytes"] for r in small], [r["seconds"] for r in small], hw.hbm_TBps * 1e12,
                                      fixed_s)
    fitted = dataclasses.replace(hw, gemm_efficiency=fit["compute_efficiency"],
                                 memory_efficiency=fit["memory_efficiency"], kernel_latency_s=fit["kernel_latency_s"],
                                 elementwise_efficiency=elementwise["memory_fraction"])
    print(f"{args.hardware}: fitted to {len(gemms)} GEMMs of {len(args.fit)} models (n={fit['n']:g}): "
          + ", ".join(f"{k} {getattr(hw, k):.4g} -> {getattr(fitted, k):.4g}" for k in FITTED)
          + f"; fit |error| median {fit['median_abs_error_pct']}%, max {fit['max_abs_error_pct']}% (the small "
          f"kernels' {len(small)} rows: median {elementwise['median_abs_error_pct']}%, max "
          f"{elementwise['max_abs_error_pct']}%)", file=sys.stderr)

    table = []
    print(f"{'set':9s}{'model':34s}{'tp':>3s}  {'layer median / worst':>22s}  {'GEMM median / worst':>22s}  "
          f"{'small kernels':>22s}   (profile -> fitted)", file=sys.stderr)
    for name, folders in sets.items():
        for directory, by_tp in folders.items():
            for tp, (model, rows) in by_tp.items():
                refit = vidur_rows(directory, model, fitted, tp)  # layer rows priced by the fitted profile
                before, after = errors(rows, model, hw), errors(refit, model, fitted)
                table.append({"set": name, "model": model.name, "tp": tp, "profile": before, "fitted": after})
                cell = (lambda key: f"{before[key + '_median_pct']:+.1f}/{before[key + '_worst_pct']:+.1f} -> "
                                    f"{after[key + '_median_pct']:+.1f}/{after[key + '_worst_pct']:+.1f}")
                print(f"{name:9s}{model.name:34s}{tp:3d}  {cell('layer'):>22s}  {cell('gemm'):>22s}  "
                      f"{cell('elementwise'):>22s}", file=sys.stderr)
    print(json.dumps({"hardware": args.hardware, "profile": {k: getattr(hw, k) for k in FITTED},
                      "fitted": {k: getattr(fitted, k) for k in FITTED}, "n": fit["n"], "gemms_fitted": len(gemms),
                      "fit_median_abs_error_pct": fit["median_abs_error_pct"],
                      "fit_max_abs_error_pct": fit["max_abs_error_pct"], "small_kernels_fitted": len(small),
                      "models": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
