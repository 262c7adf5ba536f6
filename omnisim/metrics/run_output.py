"""One run's output directory: parquet tables, plots, and summary.json written last as the completion marker."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from omnisim.metrics.instances import validate_instances
from omnisim.metrics.plots import write_plots
from omnisim.metrics.records import validate_records
from omnisim.metrics.slo import SLO

SUMMARY_FILE = "summary.json"
_RESERVED_TABLES = {"requests", "instances"}
_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def write_run(out_dir, records: pd.DataFrame, summary: dict, instances: pd.DataFrame | None = None,
              tables: dict[str, pd.DataFrame] | None = None, plots: bool = True) -> list[Path]:
    """Write requests.parquet, instances.parquet (if given), NAME.parquet for each extra table, plots/*.png (unless
    ``plots`` is false: in a sweep of many small runs drawing them costs more than simulating) and,
    last and atomically, summary.json. A directory without summary.json is an incomplete (or failed) run: an
    existing summary.json is removed first, so a rewrite that fails midway does not look complete.
    Returns the paths written, summary.json last."""
    validate_records(records)
    if instances is not None:
        validate_instances(instances)
    tables = dict(tables or {})
    for name, table in tables.items():
        if not isinstance(name, str) or not _TABLE_NAME.fullmatch(name) or name in _RESERVED_TABLES:
            raise ValueError(f"write_run: bad table name {name!r} (letters, digits, _.-; not requests/instances)")
        if not isinstance(table, pd.DataFrame):
            raise ValueError(f"write_run: table {name!r} must be a pandas DataFrame, got {type(table).__name__}")
    text = json.dumps(json_ready(summary), indent=2, allow_nan=False)  # fail before touching the directory

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)
    paths = [out / "requests.parquet"]
    records.to_parquet(paths[-1], index=False)
    if instances is not None:
        paths.append(out / "instances.parquet")
        instances.to_parquet(paths[-1], index=False)
    for name, table in tables.items():
        paths.append(out / f"{name}.parquet")
        try:
            table.to_parquet(paths[-1], index=False)
        except (ValueError, TypeError, pa.ArrowException) as exc:
            raise ValueError(f"write_run: table {name!r} cannot be written to parquet: {exc}") from exc
    slo = summary.get("slo")
    if plots:
        paths += write_plots(records, out / "plots", instances, slo=SLO(**slo) if isinstance(slo, dict) else None)

    temporary = out / f".{SUMMARY_FILE}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, summary_path)
    paths.append(summary_path)
    return paths


def json_ready(value, path: str = "summary"):
    """A copy of value with numpy scalars/arrays as plain Python, tuples as lists, NaN/inf as None and keys as str.
    Raises ValueError naming the offending key for anything JSON cannot hold."""
    if isinstance(value, dict):
        return {str(k): json_ready(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()  # nested lists of Python scalars; a 0-d array becomes its scalar
    if isinstance(value, (list, tuple)):
        return [json_ready(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    raise ValueError(f"{path}: {type(value).__name__} cannot be written to JSON")
