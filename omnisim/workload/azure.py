"""Azure LLM inference trace 2023 (Splitwise): ``TIMESTAMP,ContextTokens,GeneratedTokens`` CSV."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

from omnisim.core import Request
from omnisim.workload.limits import Limits
from omnisim.workload.trace_file import parse_counts, raise_at_row, read_csv_table, resolve_trace_path
from omnisim.workload.trace_replay import TraceReplay

AZURE_CONV_PATH = "../shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
COLUMNS = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]


class AzureTrace:
    """Replays an Azure LLM inference trace (conversation or code, 2023 format).

    TIMESTAMP is wall-clock time such as ``2023-11-16 18:17:03.9799600`` (seven fractional digits; ISO 8601 with
    any number of digits and an optional UTC offset is accepted); arrival_s counts from the first row. Rows must be
    sorted by time. A ContextTokens or GeneratedTokens of 0 is replayed as 1 (a request has at least one prompt
    and one output token); no row is dropped. ``seed`` is accepted for a uniform interface: replay is exact and
    uses no randomness. A malformed row fails with ValueError naming FILE:LINE and the column.
    """

    def __init__(
        self,
        seed: int,
        path: str = AZURE_CONV_PATH,
        start_s: float = 0.0,
        rate_scale: float = 1.0,
        max_requests: int | None = None,
        duration_s: float | None = None,
    ) -> None:
        self.seed = int(seed)
        self.path = resolve_trace_path(path)
        times_s, prompts, outputs = load_azure_trace(self.path)
        self._replay = TraceReplay(times_s, prompts, outputs, start_s, Limits(rate_scale, max_requests, duration_s))

    def requests(self) -> Iterator[Request]:
        return self._replay.requests()

    def __repr__(self) -> str:
        return f"AzureTrace(path={str(self.path)!r}, start_s={self._replay.start_s}, {self._replay.limits})"


def load_azure_trace(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds from the first row, ContextTokens, GeneratedTokens) as arrays, counts as read (0 kept)."""
    table = read_csv_table(path, COLUMNS)
    stamps = pd.to_datetime(table["TIMESTAMP"], format="ISO8601", utc=True, errors="coerce")
    if stamps.isna().any():
        row = int(np.argmax(stamps.isna().to_numpy()))
        raise_at_row(path, row, "TIMESTAMP", f"{table['TIMESTAMP'].iloc[row]!r} is not a timestamp")
    nanos = stamps.dt.tz_convert(None).to_numpy().astype("datetime64[ns]").astype(np.int64)
    backwards = np.flatnonzero(np.diff(nanos) < 0)
    if backwards.size:
        row = int(backwards[0]) + 1
        raise_at_row(path, row, "TIMESTAMP", f"rows must be sorted by time: {table['TIMESTAMP'].iloc[row]} is "
                     f"earlier than the previous row's {table['TIMESTAMP'].iloc[row - 1]}")
    times_s = (nanos - nanos[0]) / 1e9
    return times_s, parse_counts(path, table, "ContextTokens"), parse_counts(path, table, "GeneratedTokens")
