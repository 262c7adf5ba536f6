"""Engine-side scheduling policy: the order in which one instance admits waiting prompts, and its token budget.

It plugs into the one engine scheduler (``omnisim.engine.Scheduler``) that the simulator and the emulator share,
and, in production, into vLLM through ``--scheduler-cls``. The default (no policy) is vLLM's: first come, first
served, ``max_num_batched_tokens`` per step. Like every policy, it reads time only from its arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True, slots=True)
class QueuedPrompt:
    """A request waiting for admission on an instance: ``tokens`` it still has to compute (cache hits excluded, as
    far as the instance knew when it was queued), when the proxy sent it here, and how often it was preempted."""

    request_id: str
    tokens: int
    queued_s: float
    preemptions: int = 0


class PrefillPolicy(Protocol):
    def plan(self, waiting: Sequence[QueuedPrompt], max_num_batched_tokens: int, now_s: float
             ) -> tuple[Sequence[int], int]:
        """(admission order as indices into ``waiting``, this step's token budget)."""
        ...


class FCFS:
    """vLLM's default: arrival order, the configured budget."""

    def plan(self, waiting: Sequence[QueuedPrompt], max_num_batched_tokens: int, now_s: float
             ) -> tuple[Sequence[int], int]:
        return range(len(waiting)), max_num_batched_tokens
