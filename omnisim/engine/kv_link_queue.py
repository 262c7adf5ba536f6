"""The KV path out of one prefill instance: a FIFO that owns its queue (transfers leave one after another).

A transfer of ``nbytes`` takes ``link.transfer_s(nbytes)`` (latency + bytes / bandwidth). Transfers share the
egress bandwidth in arrival order; their latencies overlap (the next transfer's bytes may start while the previous
one's last bytes are still in flight).
"""
from __future__ import annotations

from typing import Protocol


class Link(Protocol):
    latency_s: float

    def transfer_s(self, nbytes: float) -> float: ...


class KVLinkQueue:
    __slots__ = ("link", "free_s")

    def __init__(self, link: Link) -> None:
        self.link = link
        self.free_s = 0.0  # when the egress can start sending the next transfer's bytes

    def send(self, now: float, nbytes: float) -> float:
        """Queue a transfer of ``nbytes`` at ``now``; returns the time its last byte arrives."""
        start = now if self.free_s < now else self.free_s
        duration = self.link.transfer_s(nbytes)
        self.free_s = start + duration - self.link.latency_s
        return start + duration
