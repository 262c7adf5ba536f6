"""What a policy may know about one serving instance: a cheap, immutable snapshot."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"  # colocated: prefill and decode on the same instance

    # Members are singletons compared by identity: hash them by identity too, in C (Enum's own __hash__ is a
    # Python call, and these are dict keys on every dispatch).
    __hash__ = object.__hash__


class BatchSample(NamedTuple):
    """One observed engine step (or the mean of a run of decode steps). Immutable; a NamedTuple rather than a
    frozen dataclass because the simulator records one per engine step and this is three times cheaper to make."""

    duration_s: float
    prefill_tokens: int
    decode_seqs: int


@dataclass(frozen=True, slots=True)
class InstanceState:
    """Load of one instance as the proxy sees it.

    ``inflight_prompt_tokens``: prompt tokens assigned to the instance and not yet prefilled (uncached part).
    ``decode_tokens``: context tokens of the requests decoding here or assigned here to decode.
    ``recent_batches``: the last few engine steps, oldest first (OmniProxy predicts from them).
    """

    id: str
    role: Role
    healthy: bool = True
    num_running: int = 0
    num_waiting: int = 0
    inflight_prompt_tokens: int = 0
    decode_tokens: int = 0
    kv_usage: float = 0.0
    kv_capacity_tokens: int = 0
    max_num_seqs: int = 0
    recent_batches: tuple[BatchSample, ...] = ()
