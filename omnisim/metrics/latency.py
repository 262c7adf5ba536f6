"""Per-request latencies derived from records; the one place TTFT, TPOT and E2E are defined."""
from __future__ import annotations

import numpy as np
import pandas as pd


def request_latencies(records: pd.DataFrame) -> pd.DataFrame:
    """ttft_s, tpot_s and e2e_s per record (same index), NaN for requests that did not complete (status != "ok").

    TTFT = first_token_s - arrival_s; TPOT = (finish_s - first_token_s) / (output_tokens - 1), defined only when
    output_tokens > 1; E2E = finish_s - arrival_s.
    """
    ok = (records["status"] == "ok").to_numpy(dtype=bool)
    arrival = np.where(ok, records["arrival_s"].to_numpy(), np.nan)
    first = records["first_token_s"].to_numpy()
    finish = records["finish_s"].to_numpy()
    out = records["output_tokens"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(ok & (out > 1), (finish - first) / (out - 1), np.nan)
    return pd.DataFrame({"ttft_s": first - arrival, "tpot_s": tpot, "e2e_s": finish - arrival}, index=records.index)
