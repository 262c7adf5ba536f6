"""Mooncake (Kimi) FAST'25 traces: JSON lines ``{"timestamp", "input_length", "output_length", "hash_ids"}``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from omnisim.core import Request
from omnisim.workload.limits import Limits
from omnisim.workload.trace_file import MAX_TOKENS, resolve_trace_path, undecodable
from omnisim.workload.trace_replay import TraceReplay

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MOONCAKE_CONV_PATH = "../shared/traces/mooncake_fast25/conversation_trace.jsonl"


class MooncakeTrace:
    """Replays a Mooncake trace with its prefix-block hashes.

    ``timestamp`` is in milliseconds; arrival_s counts from the first row's timestamp. ``hash_ids`` name
    consecutive blocks of ``hash_block_tokens`` (512) prompt tokens and become ``Request.prefix_hashes`` unchanged:
    in these traces an id only ever appears at one position after one parent, so equal ids already mean equal
    leading content. Every row must satisfy
    (len(hash_ids) - 1) * hash_block_tokens < input_length <= len(hash_ids) * hash_block_tokens.

    Timestamps are quantised into buckets about 3 s apart. With ``spread_buckets`` (default) the requests sharing a
    timestamp are spread uniformly (seeded) over the gap to the next distinct timestamp (the last bucket over the
    median gap), keeping file order; without it they arrive together, as recorded. An input_length or
    output_length of 0 is replayed as 1; no row is dropped. A malformed line fails with ValueError naming FILE:LINE
    and the field.
    """

    def __init__(
        self,
        seed: int,
        path: str = MOONCAKE_CONV_PATH,
        spread_buckets: bool = True,
        hash_block_tokens: int = 512,
        start_s: float = 0.0,
        rate_scale: float = 1.0,
        max_requests: int | None = None,
        duration_s: float | None = None,
    ) -> None:
        if hash_block_tokens < 1:
            raise ValueError(f"workload.hash_block_tokens must be >= 1, got {hash_block_tokens}")
        if seed < 0:  # numpy's own error for it names no field
            raise ValueError(f"workload.seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.path = resolve_trace_path(path)
        self.spread_buckets = bool(spread_buckets)
        stamps_ms, prompts, outputs, hashes, offsets = load_mooncake_trace(self.path, hash_block_tokens)
        times_ms = stamps_ms - stamps_ms[0]  # from the first row's timestamp, before spreading
        if self.spread_buckets:
            times_ms = spread_ties(times_ms, np.random.default_rng(self.seed))
        self._replay = TraceReplay(
            times_ms / 1000.0, prompts, outputs, start_s,
            Limits(rate_scale, max_requests, duration_s), hashes, offsets, hash_block_tokens,
        )

    def requests(self) -> Iterator[Request]:
        return self._replay.requests()

    def __repr__(self) -> str:
        return (f"MooncakeTrace(path={str(self.path)!r}, seed={self.seed}, spread_buckets={self.spread_buckets}, "
                f"start_s={self._replay.start_s}, {self._replay.limits})")


def spread_ties(stamps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Times spread uniformly over [t, next distinct t) for each run of equal ``stamps`` (sorted), order kept."""
    distinct, counts = np.unique(stamps, return_counts=True)
    if len(distinct) < 2:
        return stamps.astype(np.float64)
    gaps = np.diff(distinct)
    gaps = np.append(gaps, np.median(gaps))
    group = np.repeat(np.arange(len(distinct)), counts)
    offsets = rng.random(len(stamps)) * gaps[group]
    # Sorting by (group, offset) keeps every group in its own rows, now in increasing time.
    offsets = offsets[np.lexsort((offsets, group))]
    return stamps + offsets


def load_mooncake_trace(path: Path, hash_block_tokens: int = 512):
    """(timestamps ms, input lengths, output lengths, flat hash ids, row offsets into them), lengths as read."""
    stamps: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    hashes: list[int] = []
    offsets = [0]
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except UnicodeDecodeError as e:
        raise undecodable(path, e) from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        stamp = _number(row, "timestamp", where)
        if stamps and stamp < stamps[-1]:
            raise ValueError(f"{where}: field 'timestamp': rows must be sorted by time, {stamp} < {stamps[-1]}")
        prompt = _count(row, "input_length", where)
        output = _count(row, "output_length", where)
        ids = row.get("hash_ids")
        if not isinstance(ids, list) or not set(map(type, ids)) <= {int}:  # bool is not int here
            raise ValueError(f"{where}: field 'hash_ids': expected a list of integers, got {ids!r:.80}")
        if ids and not (_INT64_MIN <= min(ids) and max(ids) <= _INT64_MAX):
            raise ValueError(f"{where}: field 'hash_ids': {max(ids, key=abs)} does not fit in 64 bits")
        if len(ids) != -(-prompt // hash_block_tokens):
            raise ValueError(f"{where}: field 'hash_ids': {len(ids)} blocks, but input_length {prompt} needs "
                             f"{-(-prompt // hash_block_tokens)} blocks of hash_block_tokens={hash_block_tokens}")
        stamps.append(stamp)
        prompts.append(prompt)
        outputs.append(output)
        hashes.extend(ids)
        offsets.append(len(hashes))
    if not stamps:
        raise ValueError(f"{path}: empty file (expected JSON lines with timestamp, input_length, output_length, "
                         f"hash_ids)")
    return (np.array(stamps, dtype=np.float64), np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64),
            np.array(hashes, dtype=np.int64), np.array(offsets, dtype=np.int64))


def _number(row: dict, field: str, where: str) -> float:
    value = row.get(field)
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        problem = "missing" if field not in row else f"{value!r} is not a non-negative number"
        raise ValueError(f"{where}: field {field!r}: {problem}")
    return float(value)


def _count(row: dict, field: str, where: str) -> int:
    value = row.get(field)
    if type(value) is not int or value < 0:
        problem = "missing" if field not in row else f"{value!r} is not a non-negative integer"
        raise ValueError(f"{where}: field {field!r}: {problem}")
    if value > MAX_TOKENS:
        raise ValueError(f"{where}: field {field!r}: {value} tokens is more than any model serves (at most "
                         f"{MAX_TOKENS:,})")
    return value
