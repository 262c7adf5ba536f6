"""The proxy policy: which queued requests go where, now."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from omnisim.core.request import Request

if TYPE_CHECKING:
    from omnisim.core.view import ClusterView


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class Waiting:
    """A request held in one of the proxy's queues.

    ``queued_s``: when it entered this queue. ``source_id``: in the DECODE phase, the prefill instance that holds
    the request's KV (the transfer source); None in the PREFILL phase.
    """

    request: Request
    queued_s: float
    source_id: str | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    request_id: str
    instance_id: str


class ProxyPolicy(Protocol):
    """Called by the driver on arrivals, completions and a timer, separately for each phase.

    Return the requests to dispatch now, each at most once, to instances in ``view``. Requests not returned stay
    queued and are offered again later. In the PREFILL phase, an assignment to a PREFILL instance disaggregates
    (its DECODE phase follows when the prefill is done); to a MIXED or DECODE instance, the request is prefilled
    and decoded there with no KV transfer.

    Policies read time only from ``view.now_s``, randomness only from a seed given at construction, and do no I/O.
    """

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: "ClusterView") -> Sequence[Assignment]: ...
