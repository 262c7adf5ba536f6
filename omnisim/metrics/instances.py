"""Per-instance rows (one per engine instance) that backends hand over next to the request records."""
from __future__ import annotations

import numpy as np
import pandas as pd

INSTANCE_COLUMNS = ("instance_id", "role", "busy_s", "duration_s")


def validate_instances(df: pd.DataFrame) -> None:
    """Raise ValueError naming a missing column or a bad value. Extra numeric columns (steps, tokens, ...) are fine."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"instances must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in INSTANCE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"instances are missing column(s): {', '.join(missing)}")
    for name in ("busy_s", "duration_s"):
        if not pd.api.types.is_numeric_dtype(df[name]):
            raise ValueError(f"instances column {name!r} must be numeric, got {df[name].dtype}")
        values = df[name].to_numpy(dtype=np.float64)
        bad = ~(np.isfinite(values) & (values >= 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"instances column {name!r}, row {row}: expected a finite value >= 0, got {values[row]}")


def utilisation(df: pd.DataFrame) -> pd.Series:
    """busy_s / duration_s per instance (NaN where duration_s is 0), indexed like df."""
    validate_instances(df)
    duration = df["duration_s"].to_numpy(dtype=np.float64)
    busy = df["busy_s"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(duration > 0, busy / duration, np.nan)
    return pd.Series(fraction, index=df.index, name="utilisation")
