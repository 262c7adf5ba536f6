"""Checks a hardware profile's TP all-reduce against the NCCL all-reduce times Vidur published, and fits the
bandwidth path's coefficients (HardwareSpec bulk_*) to the large messages of some group sizes.

    N=vidur/data/profiling/network/a100_dgx   # a checkout of microsoft/vidur; nothing of it is in this repository
    python benchmarks/vidur_collectives.py --hardware a100 --network $N --fit-groups 2 8 --hold-out-groups 4

``all_reduce.csv`` holds, per group (``num_workers`` GPUs, ``devices_per_node`` of them per node) and message size
(bytes per rank), the median NCCL kernel time of ``torch.distributed.all_reduce`` (Vidur's collectives profiler:
eager launches back to back, the kernels timed by the profiler). Every row is priced by the profile's
``all_reduce_s`` (the one a step charges) as it is and with the fitted coefficients. The fit takes the one-node
rows of ``--fit-groups`` from ``--bulk-bytes`` (default: the profile's ``bulk_allreduce_bytes``, else vLLM's 8 MiB
custom all-reduce limit) up: least squares in relative time of base + 2(g-1) * alpha + 2(g-1)/g * bytes / (link *
efficiency), which is linear in base, alpha and 1 / efficiency. Below that size vLLM runs its own all-reduce, not
NCCL, and eager NCCL launches of small messages are bound by their launch, so those rows are reported, not fitted;
rows across nodes are reported on the profile's network coefficients. The last line is a JSON object: the profile's
and the fitted coefficients and a row per group and size band.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from omnisim.cost.roofline import all_reduce_s  # noqa: E402
from operator_profile import load  # noqa: E402
from vidur_profile import _need, _read  # noqa: E402

MIB = 1 << 20
VLLM_CUSTOM_ALLREDUCE_BYTES = 8 * MIB  # vllm/distributed/device_communicators/custom_all_reduce.py max_size
COLUMNS = ("num_workers", "devices_per_node", "size", "time_stats.all_reduce.median")
BANDS = ((0, MIB, "<1MiB"), (MIB, 8 * MIB, "1-8MiB"), (8 * MIB, float("inf"), ">=8MiB"))


def read_all_reduce(directory: Path):
    """Vidur's all_reduce.csv of a network folder as a frame with ``workers``, ``per_node``, ``bytes``, ``seconds``."""
    import pandas as pd

    path = Path(directory) / "all_reduce.csv"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (give a Vidur data/profiling/network/<cluster> folder)")
    frame = _read(path)
    _need(frame, COLUMNS, path)
    frame = frame[list(COLUMNS)].dropna()
    if frame.empty:
        raise ValueError(f"{path}: no complete rows")
    out = pd.DataFrame({"workers": frame["num_workers"].astype(int), "per_node": frame["devices_per_node"].astype(int),
                        "bytes": frame["size"].astype(float), "seconds": frame["time_stats.all_reduce.median"] * 1e-3})
    bad = out[(out.workers < 2) | (out.per_node < 1) | (out.bytes <= 0) | (out.seconds <= 0)]
    if len(bad):
        raise ValueError(f"{path}: row {bad.index[0] + 2} has workers < 2, devices_per_node < 1, or a size or time "
                         f"that is not positive")
    return out


def price(frame, hw):
    """The profile's time of each row, its group placed as the row says (``per_node`` of its GPUs per node)."""
    import numpy as np

    out = np.empty(len(frame))
    for (w, n), g in frame.groupby(["workers", "per_node"]):
        placed = dataclasses.replace(hw, devices_per_node=int(n))
        out[frame.index.get_indexer(g.index)] = [all_reduce_s(placed, int(w), b) for b in g.bytes]
    return out


def fit_bulk(frame, hw) -> dict:
    """Bulk coefficients fitted to one-node rows: least squares of (model / measured - 1)."""
    import numpy as np

    steps = 2.0 * (frame.workers.to_numpy() - 1)
    x = np.column_stack([np.ones(len(frame)), steps,
                         steps / frame.workers.to_numpy() * frame.bytes.to_numpy() / (hw.intra_node_GBps * 1e9)])
    t = frame.seconds.to_numpy()
    keep = [0, 1, 2]
    while True:  # drop a latency term the data makes negative (a physical coefficient is >= 0) and refit
        coef = np.linalg.lstsq(x[:, keep] / t[:, None], np.ones(len(t)), rcond=None)[0]
        negative = [k for k, c in zip(keep, coef) if c < 0 and k != 2]
        if not negative:
            break
        keep.remove(negative[0])
    full = dict.fromkeys(range(3), 0.0) | dict(zip(keep, coef))
    if full[2] <= 0:
        raise ValueError("fit: the measured times do not grow with the message size (no bandwidth to fit)")
    return {"bulk_collective_base_s": round(full[0], 8), "bulk_link_latency_s": round(full[1], 9),
            "bulk_bus_efficiency": round(min(1.0, 1.0 / full[2]), 3)}


def band_rows(frame, profile_s, fitted_s) -> list[dict]:
    import numpy as np

    rows = []
    for (w, n), g in frame.groupby(["workers", "per_node"]):
        for lo, hi, label in BANDS:
            m = (g.bytes >= lo) & (g.bytes < hi)
            if not m.any():
                continue
            idx = g.index[m]
            row = {"workers": int(w), "per_node": int(n), "band": label, "n": int(m.sum()),
                   "measured_median_us": round(float(np.median(frame.seconds[idx])) * 1e6, 1)}
            for key, s in (("profile", profile_s), ("fitted", fitted_s)):
                e = (s[idx] / frame.seconds[idx].to_numpy() - 1) * 100
                row[f"{key}_median_pct"] = round(float(np.median(e)), 1)
                row[f"{key}_worst_pct"] = round(float(e[np.argmax(np.abs(e))]), 1)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hardware", required=True, help="conf/hardware/NAME.yaml whose all-reduce to check")
    p.add_argument("--network", type=Path, required=True, metavar="DIR",
                   help="a Vidur data/profiling/network/<cluster> folder (its all_reduce.csv)")
    p.add_argument("--fit-groups", type=int, nargs="+", required=True, metavar="G",
                   help="one-node group sizes whose large messages to fit")
    p.add_argument("--hold-out-groups", type=int, nargs="*", default=[], metavar="G",
                   help="one-node group sizes to report on only")
    p.add_argument("--bulk-bytes", type=float, default=None,
                   help="fit messages of at least this many bytes per rank (default: the profile's "
                        "bulk_allreduce_bytes, else 8 MiB)")
    args = p.parse_args(argv)
    if set(args.fit_groups) & set(args.hold_out_groups):
        p.error(f"--hold-out-groups {sorted(set(args.fit_groups) & set(args.hold_out_groups))} also in --fit-groups")
    hw = load("hardware", args.hardware)
    try:
        frame = read_all_reduce(args.network)
    except ValueError as e:
        p.error(str(e))
    one_node = frame[frame.workers == frame.per_node]
    for g in args.fit_groups + args.hold_out_groups:
        if g not in set(one_node.workers):
            p.error(f"group size {g}: {args.network}/all_reduce.csv has no one-node rows of {g} GPUs "
                    f"(it has {sorted(set(one_node.workers))})")
        if g > hw.devices_per_node:
            p.error(f"group size {g}: more than the {hw.devices_per_node} devices of one {args.hardware} node")
    bulk = args.bulk_bytes if args.bulk_bytes is not None else (hw.bulk_allreduce_bytes
                                                                or VLLM_CUSTOM_ALLREDUCE_BYTES)
    if bulk <= 0:
        p.error(f"--bulk-bytes must be > 0, got {bulk}")
    fit_rows = one_node[one_node.workers.isin(args.fit_groups) & (one_node.bytes >= bulk)]
    if fit_rows.empty:
        p.error(f"no one-node rows of groups {args.fit_groups} at or above {bulk:.0f} bytes to fit")
    try:
        fitted = fit_bulk(fit_rows, hw) | {"bulk_allreduce_bytes": float(bulk)}
    except ValueError as e:
        p.error(str(e))
    fitted_hw = dataclasses.replace(hw, **fitted)
    profile_s, fitted_s = price(frame, hw), price(frame, fitted_hw)
    rows = band_rows(frame, profile_s, fitted_s)
    fields = ("collective_base_s", "link_latency_s", "bus_efficiency", "bulk_allreduce_bytes",
              "bulk_collective_base_s", "bulk_link_latency_s", "bulk_bus_efficiency")
    print(f"{args.hardware} against {args.network}/all_reduce.csv: fitted on groups {args.fit_groups} from "
          f"{bulk / MIB:g} MiB ({len(fit_rows)} rows): base {fitted['bulk_collective_base_s'] * 1e6:.1f} us, "
          f"{fitted['bulk_link_latency_s'] * 1e6:.2f} us per ring step, bus efficiency "
          f"{fitted['bulk_bus_efficiency']}")
    print(f"{'group':>8s} {'band':>7s} {'n':>4s} {'measured':>9s}  {'profile median/worst':>21s}  "
          f"{'fitted median/worst':>20s}  role")
    for r in rows:
        role = ("fit" if r["workers"] in args.fit_groups else "held out" if r["workers"] in args.hold_out_groups
                else "reported") if r["workers"] == r["per_node"] else "across nodes"
        print(f"{r['workers']:>3d}/{r['per_node']:<4d} {r['band']:>7s} {r['n']:>4d} {r['measured_median_us']:>7.1f}us  "
              f"{r['profile_median_pct']:+9.1f}% / {r['profile_worst_pct']:+7.1f}%  "
              f"{r['fitted_median_pct']:+8.1f}% / {r['fitted_worst_pct']:+7.1f}%  {role}")
        r["role"] = role
    print(json.dumps({"hardware": args.hardware, "profile": {f: getattr(hw, f) for f in fields},
                      "fitted": {f: getattr(fitted_hw, f) for f in fields}, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
