"""PNG plots of one run: latency CDFs, throughput and queue length over time, per-instance utilisation.

Uses matplotlib's object API (Figure, never pyplot), so no GUI backend or global state is touched. Every series is
binned or sampled to a few thousand points, so a 100k-request run plots in a few seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from omnisim.metrics.instances import utilisation, validate_instances
from omnisim.metrics.latency import request_latencies
from omnisim.metrics.records import validate_records
from omnisim.metrics.slo import SLO

CDF_POINTS = 2001
TIME_BINS = 500
MAX_TIME_BINS = 120
MAX_INSTANCE_LINES = 16
DPI = 100


def write_plots(records: pd.DataFrame, out_dir, instances: pd.DataFrame | None = None, *,
                slo: SLO | None = None) -> list[Path]:
    """Write latency_cdf.png, throughput.png, queue.png and (with ``instances``) utilisation.png into out_dir.

    ``instances`` needs instance_id, role, busy_s and duration_s; every other numeric column (steps,
    prefill_tokens, decode_tokens, preemptions, ...) gets its own bar panel. With ``slo`` the CDFs mark the
    thresholds. Returns the paths written.
    """
    validate_records(records)
    if instances is not None:
        validate_instances(instances)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _save(_latency_cdfs(records, slo), out / "latency_cdf.png"),
        _save(_throughput(records), out / "throughput.png"),
        _save(_queue(records), out / "queue.png"),
    ]
    if instances is not None:
        paths.append(_save(_utilisation(instances), out / "utilisation.png"))
    return paths


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _latency_cdfs(records: pd.DataFrame, slo: SLO | None) -> Figure:
    latency = request_latencies(records)
    panels = (
        ("TTFT", latency["ttft_s"].to_numpy(), slo.ttft_s if slo else None),
        ("TPOT", latency["tpot_s"].to_numpy(), slo.tpot_s if slo else None),
        ("E2E latency", latency["e2e_s"].to_numpy(), None),
    )
    fig = Figure(figsize=(13, 4), layout="constrained")
    for ax, (title, seconds, threshold) in zip(fig.subplots(1, 3), panels):
        values = np.sort(seconds[~np.isnan(seconds)]) * 1000.0
        ax.set_title(f"{title} CDF ({values.size} requests)")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        if values.size == 0:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        if values.size > CDF_POINTS:  # the quantile function at evenly spaced levels is the downsampled CDF
            levels = np.linspace(0.0, 1.0, CDF_POINTS)
            ax.plot(np.quantile(values, levels), levels)
        else:
            ax.step(values, np.arange(1, values.size + 1) / values.size, where="post")
        if threshold is not None:
            ax.axvline(threshold * 1000.0, color="red", linestyle="--", label=f"SLO {threshold * 1000:g} ms")
            ax.legend(loc="lower right")
    return fig


def _time_span(records: pd.DataFrame) -> tuple[float, float]:
    times = records[["arrival_s", "first_token_s", "finish_s"]].to_numpy()
    finite = times[np.isfinite(times)]
    if finite.size == 0:
        return 0.0, 1.0
    start, end = float(finite.min()), float(finite.max())
    return start, max(end, start + 1e-9)


def _throughput(records: pd.DataFrame) -> Figure:
    start, end = _time_span(records)
    ok = (records["status"] == "ok").to_numpy(dtype=bool)
    finish_ok = records["finish_s"].to_numpy()[ok]
    bins = int(np.clip(ok.sum() // 5, 1, MAX_TIME_BINS))
    edges = np.linspace(start, end, bins + 1)
    width = edges[1] - edges[0]
    completed, _ = np.histogram(finish_ok, bins=edges)
    tokens = _tokens_per_bin(records, edges)

    fig = Figure(figsize=(10, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.stairs(completed / width, edges - start, fill=True, alpha=0.7)
    top.set_ylabel("completed requests / s")
    top.set_title("Throughput over time")
    bottom.stairs(tokens / width, edges - start, fill=True, alpha=0.7, color="tab:orange")
    bottom.set_ylabel("output tokens / s")
    bottom.set_xlabel("time since first arrival (s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return fig


def _tokens_per_bin(records: pd.DataFrame, edges: np.ndarray) -> np.ndarray:
    """Generated tokens per time bin: the first token at first_token_s, the rest spread evenly until finish_s.

    The cumulative count of spread tokens at time t is sum_i rate_i * clip(t - first_i, 0, finish_i - first_i),
    evaluated at every edge from sorted start/stop times and prefix sums instead of a requests x bins matrix.
    """
    first = records["first_token_s"].to_numpy()
    finish = records["finish_s"].to_numpy()
    out = records["output_tokens"].to_numpy()
    valid = np.isfinite(first) & np.isfinite(finish) & (out > 0)
    first, finish, out = first[valid], finish[valid], out[valid]
    rest = (out - 1).astype(np.float64)
    spread = (finish > first) & (rest > 0)
    instant = ~spread & (rest > 0)  # all remaining tokens at the same moment
    tokens, _ = np.histogram(first, bins=edges)
    tokens = tokens.astype(np.float64)
    tokens += np.histogram(finish[instant], bins=edges, weights=rest[instant])[0]

    rate = rest[spread] / (finish[spread] - first[spread])

    def ramp(times: np.ndarray) -> np.ndarray:  # sum of rate_i * max(0, edge - times_i) at every edge
        order = np.argsort(times)
        t, r = times[order], rate[order]
        cum_rate = np.concatenate(([0.0], np.cumsum(r)))
        cum_rate_time = np.concatenate(([0.0], np.cumsum(r * t)))
        k = np.searchsorted(t, edges, side="right")
        return edges * cum_rate[k] - cum_rate_time[k]

    cumulative = ramp(first[spread]) - ramp(finish[spread])
    return tokens + np.diff(cumulative)


def _coalesce(*columns: np.ndarray) -> np.ndarray:
    """The first finite value across columns, row by row (NaN if none)."""
    result = columns[0].copy()
    for column in columns[1:]:
        missing = ~np.isfinite(result)
        result[missing] = column[missing]
    return result


def _peak_occupancy(enter: np.ndarray, leave: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The most [enter, leave) intervals open at once within each time bin (exact, from the sorted event stream, so
    short bursts are not lost between samples). Rows missing either end are not counted."""
    known = np.isfinite(enter) & np.isfinite(leave)
    if not known.any():
        return np.zeros(edges.size - 1)
    times = np.concatenate((enter[known], leave[known]))
    steps = np.concatenate((np.ones(known.sum()), -np.ones(known.sum())))
    order = np.lexsort((steps, times))  # at equal times leaving comes first, so zero-length stays add nothing
    times, level = times[order], np.cumsum(steps[order])
    before = np.searchsorted(times, edges[:-1], side="right")
    peak = np.where(before > 0, level[np.maximum(before - 1, 0)], 0.0)  # level as each bin opens
    inside = np.searchsorted(edges, times, side="left") - 1  # bin i holds events in (edges[i], edges[i + 1]]
    valid = (inside >= 0) & (inside < peak.size)
    np.maximum.at(peak, inside[valid], level[valid])
    return peak


def _queue(records: pd.DataFrame) -> Figure:
    """Queue lengths over time, as the peak within each of TIME_BINS bins. A request waits for prefill from arrival
    until prefill_start_s (or, if it never started, until first_token_s or finish_s); it is in flight until finish_s.
    Requests without such a leave time (e.g. dropped: records carry no drop time) are not counted rather than left
    queued forever."""
    start, end = _time_span(records)
    edges = np.linspace(start, end, TIME_BINS + 1)
    arrival = records["arrival_s"].to_numpy()
    dispatch = records["prefill_dispatch_s"].to_numpy()
    prefill_start = records["prefill_start_s"].to_numpy()
    finish = records["finish_s"].to_numpy()
    started = _coalesce(prefill_start, records["first_token_s"].to_numpy(), finish)

    fig = Figure(figsize=(10, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = edges - start
    top.stairs(_peak_occupancy(arrival, started, edges), x, label="waiting for prefill (proxy + engine)")
    if np.isfinite(dispatch).any():
        top.stairs(_peak_occupancy(arrival, dispatch, edges), x, label="in proxy queue (not yet dispatched)")
    top.stairs(_peak_occupancy(arrival, finish, edges), x, label="in flight (arrived, not finished)")
    top.set_ylabel("requests (peak per bin)")
    top.set_title("Queue length over time")
    top.legend(loc="upper left")

    instance = records["prefill_instance"].to_numpy(dtype=object)
    names = sorted(set(instance) - {""})
    if names and len(names) <= MAX_INSTANCE_LINES:
        for name in names:
            mine = instance == name
            bottom.stairs(_peak_occupancy(dispatch[mine], prefill_start[mine], edges), x, label=name)
        bottom.set_title("Prefill engine queue per instance (dispatched, prefill not started)")
        bottom.legend(loc="upper left", ncols=4, fontsize="small")
    else:
        reason = "no prefill instances" if not names else f"{len(names)} prefill instances (over {MAX_INSTANCE_LINES})"
        bottom.text(0.5, 0.5, f"per-instance queues not drawn: {reason}", ha="center", va="center",
                    transform=bottom.transAxes)
    bottom.set_ylabel("requests (peak per bin)")
    bottom.set_xlabel("time since first arrival (s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return fig


def _utilisation(instances: pd.DataFrame) -> Figure:
    ids = instances["instance_id"].astype(str).to_numpy()
    roles = instances["role"].astype(str).to_numpy()
    palette = {role: f"C{i}" for i, role in enumerate(dict.fromkeys(roles))}
    colours = [palette[r] for r in roles]
    extra = [c for c in instances.columns if c not in ("instance_id", "role", "busy_s", "duration_s")
             and pd.api.types.is_numeric_dtype(instances[c]) and not pd.api.types.is_bool_dtype(instances[c])]
    panels = [("utilisation (busy / duration)", utilisation(instances).to_numpy())]
    panels += [(str(c), instances[c].to_numpy(dtype=np.float64)) for c in extra]
    columns = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // columns)
    width = max(6.0, min(20.0, 0.25 * len(ids) * columns + 3))
    fig = Figure(figsize=(width, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    positions = np.arange(len(ids))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(positions, values, color=colours)
        ax.set_title(title)
        ax.set_xticks(positions, ids, rotation=90 if len(ids) > 8 else 0, fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0.0, max(1.0, float(np.nanmax(panels[0][1], initial=0.0))))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Patch(color=c, label=r) for r, c in palette.items()]
    fig.legend(handles=handles, loc="outside upper right", ncols=len(handles), fontsize="small")
    return fig
