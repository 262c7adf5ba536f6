"""The traffic a proxy serves, written as a replayable trace: Mooncake's JSON lines, which ``workload=mooncake``
reads, so a production trace replays in the simulator (observe, replay, calibrate).

One line per request the proxy accepted (parsed and admitted), in arrival order:
``{"timestamp": ms since the recorder started, "input_length": prompt tokens, "output_length": tokens generated
(the requested max_tokens where the request did not complete), "hash_ids": [...], "status": "ok" | "error"}``.
``hash_ids`` name the prompt's blocks of ``block_tokens`` tokens: equal leading content gets equal ids (the proxy's
chained prefix hashes, renumbered densely so no content hash leaves the proxy), and a partial last block, or every
block of a request the proxy did not hash, gets an id of its own. Replay with
``workload=mooncake workload.path=FILE workload.hash_block_tokens=<block_tokens> workload.spread_buckets=false``.

A request's line is written once it and every request that arrived before it have ended, so the file is always
sorted by time; at most the requests in flight wait in memory. Each line is flushed as it is written.
"""
from __future__ import annotations

import heapq
import itertools
import json
from pathlib import Path
from typing import Callable

from omnisim.core import Request


class TraceRecorder:
    def __init__(self, path: str | Path, block_tokens: int, clock: Callable[[], float]) -> None:
        if block_tokens < 1:
            raise ValueError(f"record_trace: block_tokens must be >= 1, got {block_tokens}")
        self.path = Path(path)
        try:
            self._file = self.path.open("x", encoding="utf-8")  # never overwrite an earlier capture
        except FileExistsError:
            raise ValueError(f"record_trace: {self.path} exists; give a new file (an earlier trace is kept)") from None
        except OSError as e:
            raise ValueError(f"record_trace: cannot create {self.path} ({e.strerror})") from None
        self.block_tokens = block_tokens
        self.clock = clock
        self.t0 = clock()
        self._ids: dict[int, int] = {}  # the proxy's prefix hash -> its dense id in this trace
        self._next_id = itertools.count()
        self._seq = itertools.count()
        self._pending: dict[int, dict] = {}  # arrived, not yet ended (or ended behind an earlier one)
        self._ended: list[int] = []  # heap of sequence numbers that ended
        self._written = 0  # the next sequence number to write
        self.rows = 0

    @staticmethod
    def check_new(path: str | Path) -> None:
        """ValueError unless ``path`` can be a new trace (it does not exist; its directory does)."""
        path = Path(path)
        if path.exists():
            raise ValueError(f"record_trace: {path} exists; give a new file (an earlier trace is kept)")
        if not path.resolve().parent.is_dir():
            raise ValueError(f"record_trace: directory {path.resolve().parent} does not exist")

    def arrived(self, req: Request) -> int:
        """Note ``req`` on its arrival; returns its ticket for ``ended``."""
        seq = next(self._seq)
        blocks = -(-req.prompt_tokens // self.block_tokens)
        hashes = req.prefix_hashes if req.hash_block_tokens == self.block_tokens else ()
        ids = [self._dense(h) for h in hashes[:blocks]]
        ids += [next(self._next_id) for _ in range(blocks - len(ids))]  # the partial tail, unhashed blocks
        self._pending[seq] = {"timestamp": round((self.clock() - self.t0) * 1000.0, 3),
                              "input_length": req.prompt_tokens, "output_length": req.output_tokens,
                              "hash_ids": ids, "status": "error"}
        return seq

    def ended(self, seq: int, output_tokens: int | None) -> None:
        """The request of ticket ``seq`` ended: completed with ``output_tokens`` generated, or not (None)."""
        row = self._pending[seq]
        if output_tokens is not None:
            row["output_length"], row["status"] = int(output_tokens), "ok"
        heapq.heappush(self._ended, seq)
        while self._ended and self._ended[0] == self._written:
            heapq.heappop(self._ended)
            self._file.write(json.dumps(self._pending.pop(self._written), separators=(",", ":")) + "\n")
            self._written += 1
            self.rows += 1
        self._file.flush()

    def close(self) -> None:
        """Write what is still pending (requests cut off by the proxy stopping, as not completed) and close."""
        for seq in sorted(self._pending):
            if seq not in self._ended:
                heapq.heappush(self._ended, seq)
        while self._ended:
            seq = heapq.heappop(self._ended)
            self._file.write(json.dumps(self._pending.pop(seq), separators=(",", ":")) + "\n")
            self.rows += 1
        self._file.close()

    def _dense(self, h: int) -> int:
        dense = self._ids.get(h)
        if dense is None:
            dense = self._ids[h] = next(self._next_id)
        return dense


class StreamTokenCounter:
    """Tokens generated in a relayed OpenAI SSE stream: the final ``usage.completion_tokens`` where the stream has
    one, else one per event whose choice carries text (vLLM streams a token per event by default; an engine that
    groups tokens into events is then undercounted). Only used while recording: it decodes every event."""

    def __init__(self) -> None:
        self._buffer = b""
        self.events = 0
        self.usage: int | None = None

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *events, self._buffer = self._buffer.split(b"\n\n")
        for event in events:
            self._event(event)

    def result(self) -> int:
        if self._buffer.strip():
            self._event(self._buffer)
            self._buffer = b""
        return self.usage if self.usage is not None else self.events

    def _event(self, event: bytes) -> None:
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            usage = data.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                self.usage = usage["completion_tokens"]
            for choice in data.get("choices") or ():
                if isinstance(choice, dict) and (choice.get("text") or (choice.get("delta") or {}).get("content")):
                    self.events += 1


def completion_tokens(answer: bytes) -> int | None:
    """``usage.completion_tokens`` of a whole (non-streamed) OpenAI answer, or None."""
    try:
        usage = json.loads(answer).get("usage") or {}
    except (ValueError, AttributeError):
        return None
    value = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return value if isinstance(value, int) else None
