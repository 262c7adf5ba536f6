"""An opt-in timeline of a simulated run as a Chrome / Perfetto trace (``trace.json``; open it in
https://ui.perfetto.dev or chrome://tracing).

One process per instance: its engine's batches (a prefill step with its prefill tokens and decode sequences, or a
run of k decode-only steps, one slice each as the simulator times them), its KV arriving (from the decode side's
dispatch to the end of the transfer: waiting for blocks, the source link's FIFO, the transfer) and its expert
rebalances (instants with their moves and bytes); one process for the proxy with each request's holds in the
prefill and decode queues. Bounded for long runs: only slices that start inside ``[start_s, end_s)`` are kept, and
at most ``max_events`` of them (the trace says when it was cut). DP ranks of an instance share one engine model here,
so they share one track.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

_US = 1e6


class Timeline:
    def __init__(self, start_s: float = 0.0, end_s: float | None = None, max_events: int = 200_000) -> None:
        if not (math.isfinite(start_s) and start_s >= 0):
            raise ValueError(f"backend.trace_window_s: start must be a finite number >= 0, got {start_s}")
        if end_s is not None and not end_s > start_s:
            raise ValueError(f"backend.trace_window_s: end must be after start, got [{start_s}, {end_s}]")
        if max_events < 1:
            raise ValueError(f"backend.trace_max_events must be >= 1, got {max_events}")
        self.start_s, self.end_s, self.max_events = start_s, end_s if end_s is not None else math.inf, max_events
        self.events: list[dict] = []
        self.dropped = 0

    def inside(self, t: float) -> bool:
        return self.start_s <= t < self.end_s

    def _add(self, event: dict) -> None:
        if len(self.events) < self.max_events:
            self.events.append(event)
        else:
            self.dropped += 1

    def step(self, pid: int, t0: float, duration: float, prefill_tokens: int, decode_seqs: int, steps: int) -> None:
        """A step (or a run of ``steps`` decode steps) of instance ``pid`` from ``t0``."""
        if not self.inside(t0):
            return
        name = f"prefill {prefill_tokens} + decode {decode_seqs}" if prefill_tokens else \
            f"decode {decode_seqs} x{steps}"
        self._add({"name": name, "ph": "X", "pid": pid, "tid": 1, "ts": t0 * _US, "dur": duration * _US,
                   "args": {"prefill_tokens": prefill_tokens, "decode_seqs": decode_seqs, "steps": steps}})

    def chrome(self, instance_ids: list[str], records: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> dict:
        """The trace: the recorded steps plus what the records and tables say (queues, KV, rebalances)."""
        pid = {iid: k + 1 for k, iid in enumerate(instance_ids)}
        meta = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "proxy"}},
                {"name": "thread_name", "ph": "M", "pid": 0, "tid": 1, "args": {"name": "prefill queue"}},
                {"name": "thread_name", "ph": "M", "pid": 0, "tid": 2, "args": {"name": "decode queue"}}]
        for iid, p in pid.items():
            meta += [{"name": "process_name", "ph": "M", "pid": p, "args": {"name": iid}},
                     {"name": "thread_name", "ph": "M", "pid": p, "tid": 1, "args": {"name": "engine steps"}},
                     {"name": "thread_name", "ph": "M", "pid": p, "tid": 2, "args": {"name": "KV in"}}]
        r = records
        for row in r.itertuples(index=False):
            spans = ((0, 1, "held", row.arrival_s, row.prefill_dispatch_s),
                     (0, 2, "held", row.prefill_end_s, row.decode_dispatch_s),
                     (pid.get(row.decode_instance), 2, "kv", row.decode_dispatch_s, row.kv_transfer_end_s))
            for p, tid, what, a, b in spans:
                if p is None or not (a == a and b == b) or b <= a or not self.inside(a):
                    continue  # no such span for this request (colocated, dropped, not held)
                self._add({"name": f"{what} {row.request_id}", "ph": "X", "pid": p, "tid": tid, "ts": a * _US,
                           "dur": (b - a) * _US, "args": {"request": row.request_id, "prompt": int(row.prompt_tokens)}})
        moves = tables.get("moe_rebalances")
        if moves is not None and "instance_id" in moves:
            for row in moves.itertuples(index=False):
                if row.instance_id in pid and self.inside(row.time_s):
                    self._add({"name": f"rebalance ({row.status})", "ph": "i", "s": "p", "pid": pid[row.instance_id],
                               "tid": 1, "ts": row.time_s * _US,
                               "args": {"moves": int(row.moves), "bytes": float(row.bytes)}})
        return {"traceEvents": meta + self.events, "displayTimeUnit": "ms",
                "otherData": {"window_s": [self.start_s, None if math.isinf(self.end_s) else self.end_s],
                              "max_events": self.max_events, "events_dropped": self.dropped}}

    def write(self, path: Path, instance_ids: list[str], records: pd.DataFrame, tables: dict) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.chrome(instance_ids, records, tables), separators=(",", ":")))
        return path
