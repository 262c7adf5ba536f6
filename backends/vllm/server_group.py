"""Start planned server instances as process groups, wait for their /health, and always stop them.

    with ServerGroup(launches, startup_timeout_s=300) as servers:   # starts all, waits until every /health is 200
        ...                                                          # stops all on exit, error or Ctrl-C

Each server runs in its own process group, so stopping reaches vLLM's engine-core and worker children:
SIGTERM to the server (twice: the second one closes open client connections), then SIGKILL to its group once
it exited or ``stop_timeout_s`` passed. On Linux each server also gets SIGTERM when the
thread that started it dies (PR_SET_PDEATHSIG), so a killed launcher does not leave servers behind; start the
group from a thread that outlives it (the main thread).

The servers stay in the launcher's session, not one each: with Linux's autogroup scheduling (on by default) a new
session is a scheduling group of its own, the cores are shared among groups first, and servers sharing cores then
stall a whole group at a time (measured 2026-12-03 on two cores, two servers: every process of one server, idle
ones included, went unscheduled for 50-400 ms together, about once a second; TTFT p90 10x p50 against 1.8x in one
session). In one session every process gets its share as a task, as the simulator's host model shares them.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from backends.vllm.launch_plan import InstanceLaunch


class ServerStartError(RuntimeError):
    """A server exited or did not become healthy in time; the message carries the tail of its log."""


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError as e:
        return f"(no log: {e})"


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port_block(count: int, host: str = "127.0.0.1", start: int = 20000, stop: int = 60000) -> int:
    """First port p >= start such that p .. p+count-1 can all be bound on ``host`` right now."""
    p = start
    while p + count <= stop:
        for k in range(count):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, p + k))
                except OSError:
                    p = p + k + 1
                    break
        else:
            return p
    raise RuntimeError(f"no block of {count} free ports on {host} in {start}..{stop}")


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_for_health(launches: Sequence[InstanceLaunch], started_at: float, timeout_s: float, poll_interval_s: float,
                    check: Callable[[], None] = lambda: None) -> tuple[dict[str, float], list[InstanceLaunch]]:
    """Poll the /health of every launch that serves HTTP until each answers 200 or ``timeout_s`` after
    ``started_at`` (time.monotonic()) has passed; ``check`` runs before each round and may raise. Returns the seconds
    from ``started_at`` to healthy per instance id, and the launches still not healthy (empty when all are)."""
    ready: dict[str, float] = {}
    pending = [x for x in launches if not x.headless]
    while True:
        check()
        for launch in list(pending):
            if http_ok(launch.url + "/health"):
                ready[launch.id] = time.monotonic() - started_at
                pending.remove(launch)
        if not pending or time.monotonic() > started_at + timeout_s:
            return ready, pending
        time.sleep(poll_interval_s)


class ServerGroup:
    def __init__(self, launches: Sequence[InstanceLaunch], startup_timeout_s: float = 300.0,
                 stop_timeout_s: float = 20.0, poll_interval_s: float = 1.0) -> None:
        if not launches:
            raise ValueError("ServerGroup: no instances to launch")
        if startup_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError("startup_timeout_s and stop_timeout_s must be > 0")
        self.launches = tuple(launches)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.ready_after_s: dict[str, float] = {}  # seconds from start() to a healthy /health, per instance
        self._logs: list = []
        self._started_at = 0.0

    def start(self) -> None:
        """Start every server (without waiting for it to be ready)."""
        atexit.register(self.stop)
        self._started_at = time.monotonic()
        for launch in self.launches:
            (launch.work_dir / "tmp").mkdir(parents=True, exist_ok=True)
            log = open(launch.log_path, "ab")
            self._logs.append(log)
            self.procs[process_key(launch)] = subprocess.Popen(
                launch.argv, env={**os.environ, **launch.env}, cwd=launch.work_dir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, process_group=0, preexec_fn=_die_with_parent)

    def wait_healthy(self) -> None:
        """Block until every server answers /health with 200; ServerStartError (with the log tail) if one exits
        first or the timeout passes."""
        ready, late = wait_for_health(self.launches, self._started_at, self.startup_timeout_s, self.poll_interval_s,
                                      self._raise_if_dead)
        self.ready_after_s.update(ready)
        if late:
            raise ServerStartError(f"{', '.join(x.id for x in late)} not healthy after {self.startup_timeout_s:.0f} s; "
                                   f"log of {late[0].id} ({late[0].log_path}):\n{log_tail(late[0].log_path)}")

    def _raise_if_dead(self) -> None:
        by_key = {process_key(x): x for x in self.launches}
        for key, code in self.dead().items():
            path = by_key[key].log_path
            raise ServerStartError(f"{key} exited with code {code} while starting ({path}):\n{log_tail(path)}")

    def dead(self) -> dict[str, int]:
        """Processes that have exited: id (with "/part" for headless parts) -> exit code."""
        return {i: p.returncode for i, p in self.procs.items() if p.poll() is not None}

    def stop(self) -> None:
        """SIGTERM every server, then SIGKILL its whole process group (after stop_timeout_s at most). Idempotent."""
        running = [p for p in self.procs.values() if p.poll() is None]
        deadline = time.monotonic() + self.stop_timeout_s
        # The server alone first: it shuts its engine-core and worker children down in order (signalling the whole
        # group at once kills the children under a server that then waits for them). A second SIGTERM makes
        # uvicorn stop waiting for open client connections ("Waiting for connections to close").
        for grace in (min(3.0, self.stop_timeout_s / 2), None):
            for p in running:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            until = deadline if grace is None else time.monotonic() + grace
            for p in running:
                try:
                    p.wait(timeout=max(0.1, until - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for p in self.procs.values():
            # Also the group's leftovers: children of a server that exited by itself.
            _signal_group(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        until = time.monotonic() + 5.0
        while time.monotonic() < until and any(_group_alive(p) for p in self.procs.values()):
            time.sleep(0.1)  # killed grandchildren vanish once their new parent (init) reaps them
        for log in self._logs:
            log.close()
        self._logs.clear()
        atexit.unregister(self.stop)

    def __enter__(self) -> "ServerGroup":
        try:
            self.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def process_key(launch: InstanceLaunch) -> str:
    return launch.id if not launch.headless else f"{launch.id}/{launch.part}"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # process_group=0: the server's pid is its process group id
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(proc: subprocess.Popen) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class AttachedServers:
    """Servers started by someone else (e.g. the per-node scripts of a multi-node cluster): entering waits for
    their /health; nothing is started or stopped here."""

    def __init__(self, launches: Sequence[InstanceLaunch], startup_timeout_s: float = 300.0,
                 poll_interval_s: float = 2.0) -> None:
        self.launches = tuple(x for x in launches if not x.headless)
        self.startup_timeout_s = startup_timeout_s
        self.poll_interval_s = poll_interval_s
        self.ready_after_s: dict[str, float] = {}

    def __enter__(self) -> "AttachedServers":
        self.ready_after_s, late = wait_for_health(self.launches, time.monotonic(), self.startup_timeout_s,
                                                   self.poll_interval_s)
        if late:
            raise ServerStartError(f"{', '.join(f'{x.id} ({x.url})' for x in late)} not healthy after "
                                   f"{self.startup_timeout_s:.0f} s; were the node scripts started?")
        return self

    def __exit__(self, *exc) -> None:
        pass

    def dead(self) -> dict[str, int]:
        return {}
