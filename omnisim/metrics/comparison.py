"""Side-by-side comparison of two runs (e.g. simulation vs a real or emulated run of the same workload)."""
from __future__ import annotations

import math
import numbers

import pandas as pd

from omnisim.metrics.latency import request_latencies
from omnisim.metrics.records import RECORD_COLUMNS, validate_records

_LATENCIES = ("ttft_s", "tpot_s", "e2e_s")


def compare_runs(a: pd.DataFrame, b: pd.DataFrame, on: str = "request_id", *, how: str = "inner",
                 suffixes: tuple[str, str] = ("_a", "_b")) -> pd.DataFrame:
    """Join two runs' records on ``on`` and give per-request TTFT/TPOT/E2E of each run and their delta (b - a).

    Columns: the key, status and output_tokens of each run, then for each latency NAME: NAME_a, NAME_b and
    NAME_delta (NaN where either run has no value, e.g. the request did not complete there). ``how`` is the
    pandas join kind ("inner" keeps requests present in both runs).
    """
    if on not in RECORD_COLUMNS:
        raise ValueError(f"compare_runs: on={on!r} is not a records column")
    frames = []
    for records in (a, b):
        validate_records(records)
        frames.append(pd.concat([records[[on, "status", "output_tokens"]], request_latencies(records)], axis=1))
    try:
        joined = frames[0].merge(frames[1], on=on, how=how, suffixes=suffixes, validate="one_to_one")
    except pd.errors.MergeError as exc:
        raise ValueError(f"compare_runs: key {on!r} must be unique in both runs ({exc})") from None
    first, second = suffixes
    columns = [on] + [f"{name}{s}" for name in ("status", "output_tokens") for s in suffixes]
    for name in _LATENCIES:
        joined[f"{name}_delta"] = joined[f"{name}{second}"] - joined[f"{name}{first}"]
        columns += [f"{name}{first}", f"{name}{second}", f"{name}_delta"]
    return joined[columns]


def compare_summaries(a: dict, b: dict, names: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """Two summaries side by side, one row per flattened key ("ttft_s.p99"), with delta (b - a) and ratio (b / a)
    where both values are numbers. Keys present in only one summary show None for the other."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    keys = list(dict.fromkeys([*flat_a, *flat_b]))
    rows = []
    for key in keys:
        x, y = flat_a.get(key), flat_b.get(key)
        numeric = _is_number(x) and _is_number(y)
        rows.append({
            names[0]: x, names[1]: y,
            "delta": float(y - x) if numeric else math.nan,
            "ratio": float(y / x) if numeric and x != 0 else math.nan,
        })
    return pd.DataFrame(rows, index=pd.Index(keys, name="metric"), columns=[*names, "delta", "ratio"])


def _flatten(summary: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
