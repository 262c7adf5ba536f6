"""Recorded expert-load matrices: read and write ``[layers, experts]`` token counts, or ``[windows, layers,
experts]`` sequences of them.

Formats:
- ``.npy``: a 2-D ``[layers, experts]`` or 3-D ``[windows, layers, experts]`` array (vLLM's EPLB
  ``expert_load_window`` has this shape once mapped to logical experts, see ``logical_counts``).
- ``.csv`` with a header: SGLang's expert distribution ``layer_id,expert_id,count``, optionally with a ``window``
  column for a sequence; missing (layer, expert) pairs count 0.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CSV_COLUMNS = ("layer_id", "expert_id", "count")


def _check(counts: np.ndarray, where: str) -> np.ndarray:
    if counts.ndim not in (2, 3):
        raise ValueError(f"{where}: expected [layers, experts] or [windows, layers, experts], got shape {counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{where}: counts must be finite and non-negative")
    if 0 in counts.shape:
        raise ValueError(f"{where}: empty load matrix, shape {counts.shape}")
    return counts


def _read_csv(path: Path) -> np.ndarray:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: header needs columns {', '.join(CSV_COLUMNS)} (optional: window); "
                             f"missing {', '.join(missing)}")
        unknown = [h for h in header if h not in CSV_COLUMNS and h != "window"]
        if unknown:
            raise ValueError(f"{path}: unknown column(s) {', '.join(unknown)}")
        rows = []
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            try:
                layer, expert = int(row["layer_id"]), int(row["expert_id"])
                window = int(row.get("window") or 0)
                count = float(row["count"])
            except ValueError:
                raise ValueError(f"{path} line {line}: layer_id, expert_id and window must be integers and count a "
                                 f"number, got {raw}") from None
            if layer < 0 or expert < 0 or window < 0 or not np.isfinite(count) or count < 0:
                raise ValueError(f"{path} line {line}: ids must be >= 0 and count finite and >= 0, got {raw}")
            rows.append((window, layer, expert, count))
    if not rows:
        raise ValueError(f"{path}: no data rows")
    data = np.array(rows)
    ids = data[:, :3].astype(np.int64)
    out = np.zeros(tuple(ids.max(axis=0) + 1))
    np.add.at(out, (ids[:, 0], ids[:, 1], ids[:, 2]), data[:, 3])
    return out if "window" in header else out[0]


def read_load_matrix(path: str | Path) -> np.ndarray:
    """Counts from a ``.npy`` or ``.csv`` file (see the module doc); float64, 2-D or 3-D."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            counts = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a numeric .npy array ({e})") from None
        return _check(np.asarray(counts, dtype=np.float64), str(path))
    if suffix == ".csv":
        return _check(_read_csv(path), str(path))
    raise ValueError(f"load file {path}: unsupported extension {suffix!r} (use .npy or .csv)")


def write_load_csv(path: str | Path, counts: np.ndarray) -> None:
    """Write ``[layers, experts]`` (or ``[windows, layers, experts]``) counts as SGLang-style CSV."""
    counts = _check(np.asarray(counts, dtype=np.float64), str(path))
    windowed = counts.ndim == 3
    stack = counts if windowed else counts[None]
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["window"] if windowed else []) + list(CSV_COLUMNS))
        for (window, layer, expert), c in np.ndenumerate(stack):
            w.writerow(([window] if windowed else []) + [layer, expert, repr(float(c))])


def logical_counts(physical: np.ndarray, phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-logical-expert counts from per-physical-slot counts (vLLM records load per physical expert):
    ``physical [..., layers, slots]`` with ``phy2log [layers, slots]`` -> ``[..., layers, experts]``."""
    physical = np.asarray(physical, dtype=np.float64)
    if physical.shape[-2:] != phy2log.shape:
        raise ValueError(f"physical counts {physical.shape} do not match phy2log {phy2log.shape}")
    out = np.zeros(physical.shape[:-1] + (num_experts,))
    layers = np.arange(phy2log.shape[0])[:, None]
    np.add.at(out, (..., layers, phy2log), physical)
    return out
