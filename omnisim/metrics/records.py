"""Per-request records: one schema for simulated and real runs, so sim-vs-real comparison is a join."""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd

_TIME_COLUMNS = (
    "prefill_dispatch_s", "prefill_start_s", "prefill_end_s", "decode_dispatch_s",
    "kv_transfer_end_s", "first_token_s", "finish_s",
)

# Column -> pandas dtype, in order. Times are float64 seconds since the run's time origin, NaN when not applicable or
# never reached. output_tokens counts tokens actually generated; cached_tokens counts prompt tokens served from a
# prefix cache. prefill_instance is "" when there was no separate prefill (colocated) or none was reached.
RECORD_COLUMNS = MappingProxyType({
    "request_id": "string",
    "arrival_s": "float64",
    "prompt_tokens": "int64",
    "output_tokens": "int64",
    "cached_tokens": "int64",
    "prefill_instance": "string",
    "decode_instance": "string",
    **{name: "float64" for name in _TIME_COLUMNS},
    "preemptions": "int64",
    "status": "string",
    "error": "string",
})

# Columns a run may add after RECORD_COLUMNS, in this order: client is the closed-loop client (0..concurrency-1)
# that sent the request (omnisim.workload.ClosedLoopWorkload). Open-loop runs have none of them.
OPTIONAL_RECORD_COLUMNS = MappingProxyType({
    "client": "int64",
})

STATUSES = ("ok", "dropped", "error")


def records_frame(rows: list[tuple]) -> pd.DataFrame:
    """Turn plain tuples in RECORD_COLUMNS order into a validated records DataFrame (column-wise, so it is fast).
    Rows may carry the first k OPTIONAL_RECORD_COLUMNS after those, the same k in every row."""
    dtypes = {**RECORD_COLUMNS, **OPTIONAL_RECORD_COLUMNS}
    width = len(rows[0]) if rows and len(RECORD_COLUMNS) <= len(rows[0]) <= len(dtypes) else len(RECORD_COLUMNS)
    if set(map(len, rows)) - {width}:
        i, row = next((i, row) for i, row in enumerate(rows) if len(row) != width)
        raise ValueError(f"records row {i} has {len(row)} values, expected {width} (RECORD_COLUMNS order)")
    columns = list(zip(*rows)) if rows else [()] * width
    data = {name: _column(name, dtypes[name], values) for name, values in zip(list(dtypes)[:width], columns)}
    frame = pd.DataFrame(data)
    validate_records(frame)
    return frame


def _column(name: str, dtype: str, values: tuple):
    if dtype == "string":
        if set(map(type, values)) - {str}:
            i, value = next((i, v) for i, v in enumerate(values) if type(v) is not str)
            raise ValueError(f"records column {name!r}, row {i}: expected str, got {value!r}")
        return pd.array(values, dtype="string")
    if dtype == "float64":
        try:
            return np.array(values, dtype=np.float64)  # None -> NaN
        except (TypeError, ValueError) as exc:
            raise ValueError(f"records column {name!r}: values are not numbers ({exc})") from None
    array = np.asarray(values)
    if len(values) and array.dtype.kind not in "iu":
        bad = next(i for i, v in enumerate(values) if not isinstance(v, (int, np.integer)) or isinstance(v, bool))
        raise ValueError(f"records column {name!r}, row {bad}: expected int, got {values[bad]!r}")
    return array.astype(np.int64)


def validate_records(df: pd.DataFrame) -> None:
    """Raise ValueError naming the first missing/extra/misordered column, bad dtype or bad value."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"records must be a pandas DataFrame, got {type(df).__name__}")
    expected = list(RECORD_COLUMNS)
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise ValueError(f"records are missing column(s): {', '.join(missing)}")
    extra = [str(c) for c in df.columns if c not in RECORD_COLUMNS and c not in OPTIONAL_RECORD_COLUMNS]
    if extra:
        raise ValueError(f"records have unexpected column(s): {', '.join(extra)}")
    expected += [c for c in OPTIONAL_RECORD_COLUMNS if c in df.columns]
    if list(df.columns) != expected:
        raise ValueError(f"records columns are out of order: expected {expected}, got {list(df.columns)}")
    for name, dtype in {**RECORD_COLUMNS, **OPTIONAL_RECORD_COLUMNS}.items():
        if name not in df.columns:
            continue
        if str(df[name].dtype) != dtype:
            raise ValueError(f"records column {name!r} has dtype {df[name].dtype}, expected {dtype}")
        if dtype == "string" and df[name].isna().any():
            row = int(np.flatnonzero(df[name].isna().to_numpy())[0])
            raise ValueError(f"records column {name!r}, row {row}: missing value (use \"\" for none)")
    bad_status = ~df["status"].isin(STATUSES).to_numpy()
    if bad_status.any():
        row = int(np.flatnonzero(bad_status)[0])
        raise ValueError(f"records column 'status', row {row}: {df['status'].iloc[row]!r} is not one of {STATUSES}")
    duplicated = df["request_id"].duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise ValueError(f"records column 'request_id', row {row}: duplicate id {df['request_id'].iloc[row]!r}")
    for name in ("prompt_tokens", "output_tokens", "cached_tokens", "preemptions", "client"):
        if name not in df.columns:
            continue
        negative = df[name].to_numpy() < 0
        if negative.any():
            row = int(np.flatnonzero(negative)[0])
            raise ValueError(f"records column {name!r}, row {row}: negative value {df[name].iloc[row]}")
    bad_arrival = ~np.isfinite(df["arrival_s"].to_numpy())
    if bad_arrival.any():
        row = int(np.flatnonzero(bad_arrival)[0])
        raise ValueError(f"records column 'arrival_s', row {row}: arrival time must be finite")
    unfinished = (df["status"].to_numpy() == "ok") & ~np.isfinite(df["finish_s"].to_numpy())
    if unfinished.any():
        row = int(np.flatnonzero(unfinished)[0])
        raise ValueError(f"records column 'finish_s', row {row}: status 'ok' needs a finite finish time")


def read_records(path: str | Path) -> pd.DataFrame:
    """Read a requests.parquet written by write_run (or a real load generator) and validate it."""
    frame = pd.read_parquet(path)
    try:
        validate_records(frame)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return frame
