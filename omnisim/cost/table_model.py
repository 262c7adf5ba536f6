"""Step times from measurements: a small linear model per regime, least-squares fitted to measured rows."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

CHECKOUT = Path(__file__).resolve().parents[2]  # where conf/cost/tables/ lives in a source checkout
REQUIRED = ("prefill_tokens", "decode_seqs", "decode_context", "step_s")
OPTIONAL = ("prefill_attention", "prefill_context", "moe_imbalance")
# Features of each regime, in coefficient order; "imbalance" is (moe_imbalance - 1) * (prefill_tokens + decode_seqs).
PREFILL_FEATURES = ("intercept", "prefill_tokens", "prefill_attention", "prefill_context", "decode_seqs",
                    "decode_context", "imbalance")
DECODE_FEATURES = ("intercept", "decode_seqs", "decode_context", "imbalance")
OPTIONAL_FEATURE = {"prefill_attention": "prefill_attention", "prefill_context": "prefill_context",
                    "moe_imbalance": "imbalance"}
# What a table file records about its measurement, as '# key: value' comment lines before the header row.
PROVENANCE = ("engine", "model", "hardware", "parallel", "date", "command")


class TableModel:
    """StepTimeModel read from measured steps (conf/cost/table.yaml): a CSV with a header row naming the columns
    prefill_tokens, decode_seqs, decode_context, step_s and optionally prefill_attention, prefill_context,
    moe_imbalance (the step_time arguments; no other columns; lines starting with '#' are comments).

    Two regimes, as DistServe models them: steps with prefill tokens, and decode-only steps. Each is
    step_s = intercept + sum(coefficient * feature) over that regime's features, fitted by least squares on relative
    error with every coefficient kept >= 0 (a negative one is dropped and the rest refitted), so predictions grow
    with every argument. Optional columns absent from the data leave their feature out.

    A table describes the one setup it was measured on, recorded in '# key: value' lines before the header
    (``PROVENANCE``: engine and version, model, hardware, parallel as ``tp=1 dp=1 ep=1``, date, command). The app
    passes the experiment's ``model``, ``hardware`` and ``parallel``: a table measured for another model, hardware or
    parallelism (or one that does not say) is refused, rather than timing one setup with another's measurements.
    A relative ``path`` is looked up in the current directory, then in the omnisim checkout (so conf/cost/tables/...
    works from anywhere).
    """

    def __init__(self, path: str | Path, model: Any = None, hardware: Any = None, parallel: Any = None) -> None:
        self.path = _resolve(Path(path))
        self.labels = (model, hardware, parallel)
        cols, self.measured_on = _read_csv(self.path)
        _check_setup(self.path, self.measured_on, model, hardware, parallel)
        self._fit(cols, source=str(self.path))

    @classmethod
    def from_measurements(cls, rows: Iterable[Mapping[str, float]] | Any, source: str = "measurements"
                          ) -> "TableModel":
        """Fit to in-memory rows: an iterable of mappings with the CSV's column names, or a pandas DataFrame."""
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict("records")
        rows = list(rows)
        if not rows:
            raise ValueError(f"{source}: no rows to fit")
        columns = list(rows[0].keys())
        _check_columns(columns, source)
        data = []
        for i, row in enumerate(rows):
            if row.keys() != set(columns):  # values are read by name below, so key order may differ
                raise ValueError(f"{source}: row {i} has columns {sorted(row)}, expected {sorted(columns)}")
            data.append(_parse_row([row[c] for c in columns], columns, f"{source}: row {i}"))
        table = cls.__new__(cls)
        table.path = None
        table.labels = (None, None, None)
        table.measured_on = {}
        table._fit(_to_arrays(columns, data), source=source)
        return table

    fit = from_measurements

    # ---- fitting ------------------------------------------------------------------------------------------------
    def _fit(self, cols: dict[str, np.ndarray], source: str) -> None:
        self.source = source
        tokens = cols["prefill_tokens"] + cols["decode_seqs"]
        features = {
            "intercept": np.ones_like(tokens), "prefill_tokens": cols["prefill_tokens"],
            "prefill_attention": cols.get("prefill_attention"), "prefill_context": cols.get("prefill_context"),
            "decode_seqs": cols["decode_seqs"], "decode_context": cols["decode_context"],
            "imbalance": (cols["moe_imbalance"] - 1.0) * tokens if "moe_imbalance" in cols else None,
        }
        step = cols["step_s"]
        has_prefill = cols["prefill_tokens"] > 0
        self.coefficients: dict[str, dict[str, float]] = {}
        self.fit_error: dict[str, float] = {}
        for regime, names, mask in (("prefill", PREFILL_FEATURES, has_prefill),
                                    ("decode", DECODE_FEATURES, ~has_prefill)):
            if not mask.any():
                continue
            usable = [n for n in names if features[n] is not None]
            if mask.sum() < len(usable):
                raise ValueError(f"{source}: {int(mask.sum())} {regime} rows cannot fit {len(usable)} coefficients "
                                 f"({', '.join(usable)}); measure more {regime} steps")
            x = np.column_stack([features[n][mask] for n in usable])
            coef = _nonnegative_relative_lstsq(x, step[mask])
            fitted = dict.fromkeys(names, 0.0)
            fitted.update(zip(usable, coef.tolist()))
            self.coefficients[regime] = fitted
            rel = (x @ coef - step[mask]) / step[mask]
            self.fit_error[regime] = float(np.sqrt(np.mean(rel ** 2)))
        p = self.coefficients.get("prefill")
        d = self.coefficients.get("decode")
        self._prefill = tuple(p[n] for n in PREFILL_FEATURES) if p else None
        # Decode-only steps use the decode fit, or the prefill fit's decode terms when no decode-only rows exist.
        self._decode = tuple(d[n] for n in DECODE_FEATURES) if d else (p["intercept"], p["decode_seqs"],
                                                                         p["decode_context"], p["imbalance"])

    # ---- the hot path -------------------------------------------------------------------------------------------
    def step_time(self, prefill_tokens: int, prefill_attention: float, prefill_context: int,
                  decode_seqs: int, decode_context: int, moe_imbalance: float = 1.0) -> float:
        if prefill_tokens:
            c = self._prefill
            if c is None:
                raise ValueError(f"{self.source}: no measured rows with prefill_tokens > 0, cannot price a prefill "
                                 f"step")
            return (c[0] + c[1] * prefill_tokens + c[2] * prefill_attention + c[3] * prefill_context
                    + c[4] * decode_seqs + c[5] * decode_context
                    + c[6] * (moe_imbalance - 1.0) * (prefill_tokens + decode_seqs))
        c = self._decode
        return c[0] + c[1] * decode_seqs + c[2] * decode_context + c[3] * (moe_imbalance - 1.0) * decode_seqs

    def __repr__(self) -> str:
        return f"TableModel({self.source}, fit_error={self.fit_error})"


def _nonnegative_relative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||(x @ c - y) / y|| with c >= 0: least squares on scaled columns; while a coefficient is negative, drop
    the most negative one and refit (enough for a handful of nearly independent features)."""
    w = x / y[:, None]
    scale = np.abs(w).max(axis=0)
    scale[scale == 0] = 1.0
    w = w / scale
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol = np.linalg.lstsq(w[:, active], np.ones(len(y)), rcond=None)[0]
        if sol.min() >= 0:
            coef[active] = sol
            break
        del active[int(np.argmin(sol))]
    return coef / scale


def _check_columns(columns: list[str], source: str) -> None:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    unknown = [c for c in columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise ValueError(f"{source}: unknown column(s) {', '.join(unknown)} (allowed: "
                         f"{', '.join(REQUIRED + OPTIONAL)})")
    if len(set(columns)) != len(columns):
        raise ValueError(f"{source}: duplicate column names in {columns}")


def _parse_row(values: list[Any], columns: list[str], where: str) -> list[float]:
    row = {}
    for name, raw in zip(columns, values):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name}={raw!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: {name}={raw!r} must be a finite number >= 0")
        row[name] = value
    if row["step_s"] <= 0:
        raise ValueError(f"{where}: step_s={row['step_s']} must be > 0")
    if row["decode_context"] < row["decode_seqs"]:
        raise ValueError(f"{where}: decode_context={row['decode_context']} is below decode_seqs="
                         f"{row['decode_seqs']} (each sequence has at least one context token)")
    if row["prefill_tokens"] == 0 and row["decode_seqs"] == 0:
        raise ValueError(f"{where}: an empty step (prefill_tokens=0 and decode_seqs=0)")
    if "prefill_context" in row and row["prefill_context"] < row["prefill_tokens"]:
        raise ValueError(f"{where}: prefill_context={row['prefill_context']} is below prefill_tokens="
                         f"{row['prefill_tokens']}")
    if "moe_imbalance" in row and row["moe_imbalance"] < 1:
        raise ValueError(f"{where}: moe_imbalance={row['moe_imbalance']} must be >= 1 (max over mean)")
    return [row[c] for c in columns]


def _resolve(path: Path) -> Path:
    if path.is_absolute() or path.exists() or not (CHECKOUT / path).exists():
        return path
    return CHECKOUT / path


def _check_setup(path: Path, measured_on: dict[str, str], model: Any, hardware: Any, parallel: Any) -> None:
    """The experiment's model, hardware and parallelism are those the table was measured on."""
    wanted = {}
    if model is not None:
        wanted["model"] = getattr(model, "name", str(model))
    if hardware is not None:
        wanted["hardware"] = getattr(hardware, "name", str(hardware))
    if parallel is not None:
        wanted["parallel"] = f"tp={parallel.tp} dp={parallel.dp} ep={parallel.ep}"
    for key, want in wanted.items():
        got = measured_on.get(key)
        if got is None:
            raise ValueError(f"cost.path: {path} does not record the {key} it was measured on (a '# {key}: ...' "
                             f"line before the header); the experiment runs {key} {want}")
        if " ".join(got.split()) != want:
            raise ValueError(f"cost.path: {path} was measured on {key} {got}, the experiment runs {key} {want}: "
                             f"measure a table for it (benchmarks/cost_calibration.py) or use cost=roofline")


def _read_csv(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(columns, provenance): the measured rows, and the '# key: value' lines of ``PROVENANCE`` keys."""
    if not path.is_file():
        raise ValueError(f"cost.path: {path} does not exist (looked in the current directory, then in {CHECKOUT})")
    measured_on: dict[str, str] = {}
    with path.open(newline="") as f:
        raw = list(enumerate(f, start=1))
    for n, line in raw:
        key, sep, value = line.lstrip().lstrip("#").partition(":")
        if line.lstrip().startswith("#") and sep and key.strip() in PROVENANCE:
            if key.strip() in measured_on:
                raise ValueError(f"{path}:{n}: '{key.strip()}' given twice")
            measured_on[key.strip()] = value.strip()
    lines = [(n, line) for n, line in raw if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{path}: empty file (expected a header row and measured rows)")
    parsed = list(csv.reader(line for _, line in lines))
    header_line, columns = lines[0][0], [c.strip() for c in parsed[0]]
    _check_columns(columns, f"{path}:{header_line}")
    data = []
    for (line_no, _), values in zip(lines[1:], parsed[1:]):
        if len(values) != len(columns):
            raise ValueError(f"{path}:{line_no}: {len(values)} fields, expected {len(columns)} ({', '.join(columns)})")
        data.append(_parse_row([v.strip() for v in values], columns, f"{path}:{line_no}"))
    if not data:
        raise ValueError(f"{path}: no measured rows after the header")
    return _to_arrays(columns, data), measured_on


def _to_arrays(columns: list[str], data: list[list[float]]) -> dict[str, np.ndarray]:
    matrix = np.asarray(data, dtype=float)
    return {name: matrix[:, i] for i, name in enumerate(columns)}
