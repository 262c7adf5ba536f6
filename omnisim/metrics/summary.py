"""One summariser for per-request records from any backend."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from omnisim.core import PROTOCOL_VERSION
from omnisim.metrics.instances import utilisation
from omnisim.metrics.latency import request_latencies
from omnisim.metrics.records import validate_records
from omnisim.metrics.slo import SLO

PERCENTILES = (50, 90, 99)


def summarize(records: pd.DataFrame, slo: SLO, instances: pd.DataFrame | None = None) -> dict:
    """Summarise a run's records into a JSON-ready dict (plain floats and ints; None where undefined).

    Only completed requests (status "ok") enter latency statistics, throughput, SLO attainment and the prefix hit
    rate; "dropped" and "error" rows are counted but otherwise ignored. Definitions, per completed request:

    - TTFT = first_token_s - arrival_s.
    - TPOT = (finish_s - first_token_s) / (output_tokens - 1) when output_tokens > 1; undefined for single-token
      outputs, which are left out of TPOT statistics and count as meeting the TPOT objective.
    - E2E = finish_s - arrival_s.
    - queue_s = prefill_start_s - arrival_s (waiting in the proxy and the prefill engine); prefill_s =
      prefill_end_s - prefill_start_s; kv_transfer_s = kv_transfer_end_s - prefill_end_s.

    Each latency is reported as {mean, p50, p90, p99} over the requests where it is defined (numpy's linear
    percentile interpolation; the mean is per request, not per token), or all None when there are none.

    - duration_s: from the first arrival (any status) to the last finish of a completed request.
    - qpm = completed / duration_s * 60; output_tokens_per_s = generated tokens of completed requests / duration_s.
    - A completed request meets the SLO when TTFT <= slo.ttft_s and TPOT <= slo.tpot_s (a request without a first
      token time cannot be shown to meet it and does not). slo_attainment = meeting / completed; goodput_qpm =
      meeting / duration_s * 60.
    - offered_rate_per_s = (requests - 1) / (last arrival - first arrival), the load offered (any status).
    - steady_window_s: [the 10th, the 90th] percentile of arrival times, leaving out warm-up and drain;
      steady_qpm = completed requests finishing inside it per minute; steady_output_tokens_per_s = generated tokens
      inside it per second (each completed request's tokens spread evenly over first token .. finish).
    - prefix_hit_rate = sum(cached_tokens) / sum(prompt_tokens) over completed requests.
    - prefill_instances / decode_instances: requests per instance id (any status, "" left out).
    - With ``instances`` (instance_id, role, busy_s, duration_s): utilisation = mean busy_s / duration_s per role.
    - protocol_version: omnisim.core.PROTOCOL_VERSION, the version of the policy protocol the run was made with.
    """
    validate_records(records)
    ok = (records["status"] == "ok").to_numpy(dtype=bool)
    col = {name: records[name].to_numpy()[ok] for name in (
        "arrival_s", "finish_s", "prefill_start_s", "prefill_end_s", "kv_transfer_end_s",
        "prompt_tokens", "output_tokens", "cached_tokens", "preemptions")}
    completed = int(ok.sum())
    out = col["output_tokens"]

    latency = request_latencies(records)[ok]
    ttft, tpot, e2e = (latency[name].to_numpy() for name in ("ttft_s", "tpot_s", "e2e_s"))

    duration = None
    if completed:
        duration = float(np.max(col["finish_s"]) - records["arrival_s"].min())

    meets_ttft = ttft <= slo.ttft_s  # NaN compares False
    meets_tpot = np.where(out > 1, tpot <= slo.tpot_s, True)
    good = int(np.count_nonzero(meets_ttft & meets_tpot))
    prompt_sum = int(col["prompt_tokens"].sum())

    summary = {
        "protocol_version": PROTOCOL_VERSION,
        "requests": int(len(records)),
        "completed": completed,
        "dropped": int((records["status"] == "dropped").sum()),
        "errors": int((records["status"] == "error").sum()),
        "duration_s": duration,
        "ttft_s": _stats(ttft),
        "tpot_s": _stats(tpot),
        "e2e_s": _stats(e2e),
        "queue_s": _stats(col["prefill_start_s"] - col["arrival_s"]),
        "prefill_s": _stats(col["prefill_end_s"] - col["prefill_start_s"]),
        "kv_transfer_s": _stats(col["kv_transfer_end_s"] - col["prefill_end_s"]),
        "qpm": _per_minute(completed, completed, duration),
        "output_tokens": int(out.sum()),
        "output_tokens_per_s": _per_second(int(out.sum()), completed, duration),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "slo_attainment": good / completed if completed else None,
        "ttft_attainment": int(np.count_nonzero(meets_ttft)) / completed if completed else None,
        "tpot_attainment": int(np.count_nonzero(meets_tpot)) / completed if completed else None,
        "goodput_qpm": _per_minute(good, completed, duration),
        **_steady(records["arrival_s"].to_numpy(dtype=float), col["finish_s"], latency["ttft_s"].to_numpy() +
                  col["arrival_s"], out),
        "prefix_hit_rate": int(col["cached_tokens"].sum()) / prompt_sum if prompt_sum else None,
        "preemptions": int(col["preemptions"].sum()),
        "prefill_instances": _counts(records["prefill_instance"]),
        "decode_instances": _counts(records["decode_instance"]),
    }
    if instances is not None:
        fraction = utilisation(instances)
        summary["utilisation"] = {
            str(role): _float(value) for role, value in fraction.groupby(instances["role"].astype(str)).mean().items()}
    return summary


def _steady(arrivals: np.ndarray, finish: np.ndarray, first: np.ndarray, tokens: np.ndarray) -> dict:
    """Offered rate, and throughput between the 10th and 90th percentile of arrivals (see summarize)."""
    span = float(arrivals.max() - arrivals.min()) if arrivals.size else 0.0
    out: dict = {"offered_rate_per_s": (arrivals.size - 1) / span if span > 0 else None,
                 "steady_window_s": None, "steady_qpm": None, "steady_output_tokens_per_s": None}
    if arrivals.size < 10:
        return out
    lo, hi = (float(x) for x in np.percentile(arrivals, [10, 90]))
    if not hi > lo:
        return out
    inside = (finish >= lo) & (finish <= hi)
    length = finish - first
    overlap = np.clip(np.minimum(finish, hi) - np.maximum(first, lo), 0.0, None)
    share = np.where(length > 0, overlap / np.where(length > 0, length, 1.0), inside.astype(float))
    out.update(steady_window_s=[lo, hi], steady_qpm=float(inside.sum()) / (hi - lo) * 60.0,
               steady_output_tokens_per_s=float(np.nansum(share * tokens)) / (hi - lo))
    return out


def _stats(values: np.ndarray) -> dict:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    percentiles = np.percentile(values, PERCENTILES)
    return {"mean": float(values.mean()), **{f"p{q}": float(v) for q, v in zip(PERCENTILES, percentiles)}}


def _per_second(count: int, completed: int, duration: float | None) -> float | None:
    """count / duration; 0.0 when nothing completed (the rate is zero, not unknown); None for a zero duration."""
    if completed == 0:
        return 0.0
    return count / duration if duration > 0 else None


def _per_minute(count: int, completed: int, duration: float | None) -> float | None:
    rate = _per_second(count, completed, duration)
    return None if rate is None else rate * 60.0


def _counts(ids: pd.Series) -> dict:
    counts = ids[ids != ""].value_counts().sort_index()
    return {str(k): int(v) for k, v in counts.items()}


def _float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def format_summary(summary: dict) -> str:
    """A short aligned table for the terminal; latencies in milliseconds, '-' where undefined."""
    def number(value, scale=1.0, fmt="{:.1f}"):
        return "-" if value is None else fmt.format(value * scale)

    lines = [
        f"{'requests':<16}{summary['requests']:>10}   completed {summary['completed']:>8}   "
        f"dropped {summary['dropped']:>6}   errors {summary.get('errors', 0):>6}",
        f"{'latency (ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for label, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s")):
        stats = summary[key]
        cells = "".join(f"{number(stats[k], 1000.0):>10}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{label:<16}{cells}")
    slo = summary["slo"]
    lines += [
        f"{'QPM':<16}{number(summary['qpm']):>10}",
        f"{'goodput QPM':<16}{number(summary['goodput_qpm']):>10}",
        f"{'SLO attainment':<16}{number(summary['slo_attainment'], 100.0):>10} %   "
        f"(TTFT <= {slo['ttft_s'] * 1000:g} ms, TPOT <= {slo['tpot_s'] * 1000:g} ms)",
        f"{'prefix hit rate':<16}{number(summary['prefix_hit_rate'], 100.0):>10} %",
        f"{'output tok/s':<16}{number(summary['output_tokens_per_s']):>10}",
    ]
    return "\n".join(lines)
