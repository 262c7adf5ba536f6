"""A closed-loop workload's arrivals on SimPy's clock: clients send when they are free, and are free again when their
request's record is written (every end of a request, served or not, writes exactly one)."""
from __future__ import annotations

from typing import Callable

import simpy

from omnisim.workload.closed_loop import ClosedLoopWorkload


class ClosedLoopArrivals:
    """Feeds ``driver.arrive`` from a ``ClientPool``. Install ``record`` as the proxy driver's ``on_record``: it frees
    the request's client, then passes the row on to ``on_record`` with the client appended (the records' optional
    ``client`` column).

    Sends are never made from inside ``record``: a record is written in the middle of the driver's own work (a finish
    is recorded before the driver re-dispatches), so the next send is a timer event, at the same instant when there
    is no think time.
    """

    def __init__(self, env: simpy.Environment, driver, workload: ClosedLoopWorkload,
                 on_record: Callable[[tuple], None]) -> None:
        self.env = env
        self.driver = driver
        self.pool = workload.clients()
        self.on_record = on_record
        self._armed: float | None = None  # the earliest pending wake-up

    @property
    def sent(self) -> int:
        return self.pool.sent

    def start(self) -> None:
        self._arm()

    def record(self, row: tuple) -> None:
        client = self.pool.finished(row[0], self.env.now)
        self.on_record(row + (client,))
        self._arm()

    def _arm(self) -> None:
        due = self.pool.due()
        if due is None or (self._armed is not None and self._armed <= due):
            return
        self._armed = due
        # The wake-up carries its own time: env.now after a timeout of (due - now) can differ from due in the last bit.
        self.env.timeout(max(due - self.env.now, 0.0)).callbacks.append(lambda _event, at=due: self._wake(at))

    def _wake(self, at: float) -> None:
        if self._armed == at:
            self._armed = None
        # A wake-up left from before an earlier one was armed finds nothing due, or what is due by its time.
        for _client, request in self.pool.take(at):
            self.driver.arrive(request)
        self._arm()
