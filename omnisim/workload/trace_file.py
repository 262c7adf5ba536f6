"""Finding trace files and reading CSV columns fast, with FILE:LINE errors for bad rows."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

# omnisim/workload/trace_file.py -> the repository root (omnisim may be a namespace package without __file__).
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_trace_path(path: str | Path, field: str = "workload.path") -> Path:
    """An existing file: ``path`` as given (absolute, or relative to the current directory), else relative to the
    repository root, so config defaults such as ``../shared/traces/...`` work from any Hydra run directory."""
    given = Path(path).expanduser()
    tried = [given] if given.is_absolute() else [Path.cwd() / given, REPO_ROOT / given]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{field}: trace file not found: {path} (tried {', '.join(str(p) for p in tried)})")


# No model serves a prompt of a billion tokens: a larger count in a trace is a corrupt value, not a request.
MAX_TOKENS = 1_000_000_000


def undecodable(path: Path, error: UnicodeDecodeError) -> ValueError:
    """A ValueError naming the first line of ``path`` that is not UTF-8 (a file in another encoding, or binary)."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return ValueError(f"{path}:{line_number}: not UTF-8 text (byte {raw[bad.start]:#04x} at column "
                                  f"{bad.start + 1}); traces are UTF-8 CSV or JSON lines")
    return ValueError(f"{path}: not UTF-8 text ({error.reason})")


def read_csv_table(path: Path, columns: list[str]) -> pd.DataFrame:
    """All values of ``columns`` as strings (other columns are dropped). Errors name the file and line."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, engine="c", encoding="utf-8")
    except UnicodeDecodeError as e:
        raise undecodable(path, e) from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file (expected a header with columns {columns})") from None
    except pd.errors.ParserError:
        raise_at_row(path, _first_bad_field_count_row(path), None, "wrong number of fields")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}:1: missing column {missing[0]!r} (header has {list(table.columns)})")
    if table.empty:
        raise ValueError(f"{path}: no data rows after the header")
    return table[columns]


def parse_counts(path: Path, table: pd.DataFrame, column: str) -> np.ndarray:
    """Column ``column`` as int64 token counts; a non-numeric, negative, fractional or absurdly large (over
    MAX_TOKENS) value fails with FILE:LINE."""
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(values) & (values >= 0) & (values == np.floor(values)))
    if bad.any():
        row = int(np.argmax(bad))
        raise_at_row(path, row, column, f"{table[column].iloc[row]!r} is not a non-negative integer")
    huge = values > MAX_TOKENS
    if huge.any():
        row = int(np.argmax(huge))
        raise_at_row(path, row, column, f"{table[column].iloc[row]!r} tokens is more than any model serves "
                     f"(at most {MAX_TOKENS:,})")
    return values.astype(np.int64)


def raise_at_row(path: Path, row: int, column: str | None, problem: str) -> NoReturn:
    """Raise ValueError("FILE:LINE: column 'C': problem") for data row ``row`` (0-based, header excluded)."""
    line, fields, header = _locate_row(path, row)
    if header is not None and fields is not None and len(fields) != len(header):
        absent = header[len(fields)] if len(fields) < len(header) else None
        detail = f"missing column {absent!r}" if absent else "extra field"
        problem = f"expected {len(header)} fields, got {len(fields)} ({detail})"
        column = None
    where = f" column {column!r}:" if column else ""
    raise ValueError(f"{path}:{line}:{where} {problem}")


def _locate_row(path: Path, row: int) -> tuple[int | str, list[str] | None, list[str] | None]:
    # Slow path, only taken on error: count rows the way pandas does (blank lines skipped, quoted newlines kept).
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        index = -1
        for fields in reader:
            if not fields:
                continue
            index += 1
            if index == row:
                return reader.line_num, fields, header
    return "?", None, header


def _first_bad_field_count_row(path: Path) -> int:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        rows = (fields for fields in reader if fields)
        for index, fields in enumerate(rows):
            if len(fields) != len(header):
                return index
    return 0
