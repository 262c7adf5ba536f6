"""A fixed, hand-made list of requests (tests, small scenarios) behind the Workload interface."""
from __future__ import annotations

from typing import Iterable, Iterator

from omnisim.core import Request


class RequestList:
    """The given requests, in order. Arrival times must be nondecreasing and ids unique."""

    def __init__(self, requests: Iterable[Request]) -> None:
        self._requests = tuple(requests)
        ids = set()
        for position, request in enumerate(self._requests):
            if not isinstance(request, Request):
                raise ValueError(f"requests[{position}]: expected an omnisim.core.Request, got {request!r}")
            if request.id in ids:
                raise ValueError(f"requests[{position}]: duplicate id {request.id!r}")
            if position and request.arrival_s < self._requests[position - 1].arrival_s:
                raise ValueError(f"requests[{position}]: arrival_s {request.arrival_s} is before the previous one")
            ids.add(request.id)

    def requests(self) -> Iterator[Request]:
        return iter(self._requests)

    def __len__(self) -> int:
        return len(self._requests)
