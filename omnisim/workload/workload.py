"""The one thing the simulator and the load generator ask of a request source."""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from omnisim.core import Request


@runtime_checkable
class Workload(Protocol):
    """A source of requests.

    ``requests()`` returns a fresh iterator on every call, yielding the same sequence each time (the sequence is
    fixed by the constructor's ``seed``): ``arrival_s`` nondecreasing and starting near 0, ids unique within the
    workload. Requests are produced lazily where practical, so a long workload costs little memory.
    """

    def requests(self) -> Iterator[Request]: ...
