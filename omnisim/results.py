"""A sweep's results in one call: ``omnisim.results.load(path)`` -> one tidy row per run.

    runs = omnisim.results.load("multirun/2026-12-02/10-00-00-000000")      # a multirun directory
    runs = omnisim.results.load(["outputs/.../run-a", "outputs/.../run-b"])  # or run directories
    requests = omnisim.results.load(path, records=True)                    # every request of every run

A run directory is one that holds Hydra's ``.hydra/`` (``omnisim`` writes one per run); a directory is searched
recursively for them, in sorted order. Per run: ``run_dir``, ``complete`` (it has a ``summary.json``: the run
ended; failed and cut-off runs are kept, with ``complete`` False, rather than silently dropped), one ``choice.GROUP``
column per config group option (``choice.proxy`` = round_robin), one column per override the run was given (by its
key, e.g. ``workload.rate``, values parsed as YAML), and the summary flattened with dots (``ttft_s.p90``,
``utilisation.decode``). ``records=True`` instead returns every run's ``requests.parquet`` concatenated, with
``run_dir`` and the same override columns in front.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml


def run_dirs(path: str | Path | Iterable[str | Path]) -> list[Path]:
    """The run directories under ``path`` (or the given list of them, each searched the same way)."""
    roots = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    found: list[Path] = []
    for root in roots:
        if not root.is_dir():
            raise ValueError(f"omnisim.results: {root} is not a directory")
        if (root / ".hydra").is_dir():
            found.append(root)
            continue
        found.extend(sorted(p.parent for p in root.rglob(".hydra") if p.is_dir()))
    if not found:
        raise ValueError(f"omnisim.results: no run directories (with a .hydra/ folder) under "
                         f"{', '.join(map(str, roots))}")
    return found


def _overrides(run: Path) -> dict:
    path = run / ".hydra" / "overrides.yaml"
    out = {}
    for item in (yaml.safe_load(path.read_text()) or []) if path.is_file() else []:
        key, sep, value = str(item).partition("=")
        if not sep:
            continue
        try:
            out[key.lstrip("+~")] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.lstrip("+~")] = value
    return out


def _choices(run: Path) -> dict:
    path = run / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    choices = ((yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {}))
    return {f"choice.{k}": v for k, v in choices.items() if not k.startswith("hydra/")}


def _summary(run: Path) -> dict | None:
    path = run / "summary.json"
    if not path.is_file():
        return None
    import json

    data = json.loads(path.read_text())
    return pd.json_normalize(data, sep=".").iloc[0].to_dict()


def load(path: str | Path | Iterable[str | Path], records: bool = False) -> pd.DataFrame:
    """One row per run (or, with ``records``, one per request of every run); see the module docstring."""
    rows, frames = [], []
    for run in run_dirs(path):
        meta = {"run_dir": str(run), **_choices(run), **_overrides(run)}
        if records:
            parquet = run / "requests.parquet"
            if parquet.is_file() and (run / "summary.json").is_file():
                from omnisim.metrics import read_records

                frame = read_records(parquet)
                for i, (key, value) in enumerate(meta.items()):
                    frame.insert(i, key, [value] * len(frame))
                frames.append(frame)
            continue
        summary = _summary(run)
        rows.append({**meta, "complete": summary is not None, **(summary or {})})
    if records:
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return pd.DataFrame(rows)
