"""How busy the machine was while real servers were measured: load averages, and the CPU that processes outside
ours used (the ``background`` a simulation of the same run can be told about, ``serving.background_cores``).

    with HostLoad(own=[server_pid, ...]) as load:   # our process tree: this process and the servers (all children)
        ...                                          # the measurement
    load.summary()  # {"loadavg_1m_start", "loadavg_1m_end", "cpu_busy_cores", "own_cores", "background_cores", ...}

``cpu_busy_cores``: CPU time of the whole machine (``/proc/stat``: user + nice + system + irq + softirq + steal) per
wall second; ``own_cores``: the same for this process and the given pids with all their descendants (psutil);
``steal_cores``: the time a virtual CPU wanted to run but the hypervisor ran another guest (``steal_fraction``: that
over ``cpu_busy_cores``, what a simulation's ``serving.steal`` means; with both cores busy it went from 0.3% to 18-38%
within twenty minutes on this project's VM on 2026-12-03); ``background_used_cores`` = busy - steal - own: what the
other processes ran meanwhile. On saturated cores that is bounded by
what was left, so ``background_cores`` is the other processes' *demand*: the runnable tasks (``procs_running``,
sampled every 20 ms by a thread, itself left out) times the others' part of the CPU that was used; every runnable
task gets an equal share under time-slicing, so that is how many of the runnable tasks were theirs. It is what a
simulation's ``serving.background_cores`` means. Linux only; elsewhere the CPU figures are None and the load
averages are what ``os.getloadavg`` gives.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Iterable

SAMPLE_S = 0.02


def _procs_running() -> int | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _machine_busy_s() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine so far."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [float(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:8])
    hz = os.sysconf("SC_CLK_TCK")
    return busy / hz, (ticks[7] if len(ticks) > 7 else 0.0) / hz


class _Tree:
    """CPU seconds of a set of processes and all their descendants, remembering processes that exited (their last
    reading counts), so a tree whose children come and go is still counted whole."""

    def __init__(self, pids: Iterable[int]) -> None:
        import psutil

        self._psutil = psutil
        self.roots = [int(p) for p in pids]
        self.seen: dict[tuple[int, float], float] = {}  # (pid, create_time) -> cpu seconds at last look

    def cpu_s(self) -> float:
        psutil = self._psutil
        for root in self.roots:
            try:
                proc = psutil.Process(root)
                procs = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        self.seen[(p.pid, p.create_time())] = t.user + t.system
                except psutil.Error:
                    pass
        return sum(self.seen.values())


class HostLoad:
    def __init__(self, own: Iterable[int] = ()) -> None:
        self.own_pids = [os.getpid(), *own]
        self.result: dict = {}

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            n = _procs_running()
            if n is not None:
                self._runnable.append(n - 1)  # less the sampler, running while it reads

    def __enter__(self) -> "HostLoad":
        self._runnable: list[int] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="host-load", daemon=True)
        self._sampler.start()
        self._load0 = os.getloadavg()
        self._t0 = time.monotonic()
        self._busy0 = _machine_busy_s()
        try:
            self._tree = _Tree(self.own_pids)
            self._own0 = self._tree.cpu_s()
        except ImportError:  # no psutil: load averages only
            self._tree = None
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy1 = _machine_busy_s()
        load1 = os.getloadavg()
        out = {"wall_s": wall, "loadavg_1m_start": self._load0[0], "loadavg_1m_end": load1[0],
               "loadavg_5m_end": load1[1], "cpu_count": os.cpu_count()}
        if busy1 is not None and self._busy0 is not None and self._tree is not None:
            busy = (busy1[0] - self._busy0[0]) / wall
            steal = min(busy, (busy1[1] - self._busy0[1]) / wall)
            own = (self._tree.cpu_s() - self._own0) / wall
            ran = busy - steal  # what the guest's processes ran
            used = max(0.0, ran - own)
            runnable = sum(self._runnable) / len(self._runnable) if self._runnable else None
            demand = runnable * used / ran if runnable is not None and ran > 0 else used
            out.update(cpu_busy_cores=busy, own_cores=own, background_used_cores=used, runnable=runnable,
                       background_cores=max(used, demand), steal_cores=steal,
                       steal_fraction=steal / busy if busy > 0 else 0.0)
        else:
            out.update(cpu_busy_cores=None, own_cores=None, background_used_cores=None, runnable=None,
                       background_cores=None, steal_cores=None, steal_fraction=None)
        self.result = out

    def summary(self) -> dict:
        return dict(self.result)
