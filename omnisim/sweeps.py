"""Pieces of the sweeps that Hydra's plugins run (conf/sweep/: Optuna studies; conf/hydra/launcher/: Ray, Slurm).

    omnisim -m hydra/launcher=ray hydra.launcher.ray.init.address=HOST:PORT ...   # a sweep on a Ray cluster
    omnisim -m +sweep=fewest_devices                                               # an Optuna study

``MakeSweepDir`` is the Hydra callback the studies use; ``LocalRayHead`` starts a one-node Ray cluster on 127.0.0.1
to try the Ray launcher on one machine (the tests and benchmarks/sweep_speed.py use it).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class MakeSweepDir(Callback):
    """Creates ``hydra.sweep.dir`` as the multirun starts: the Optuna sweeper opens its study (a sqlite file in the
    sweep directory) before any launcher has made the directory, and sqlite does not make it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)


# Ray publishes the node's routable address even when told 127.0.0.1, except where it takes the machine for a
# laptop (Windows or macOS), where it keeps to loopback and refuses to add worker nodes: this flag asks for that.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayHead:
    """A one-node Ray cluster on 127.0.0.1: ``ray start --head --block`` in a process group of its own, in a temporary
    directory of its own, stopped by signalling that group only (``ray stop`` would end every Ray process on the
    machine, other people's included). Use as a context manager; ``address`` is what
    ``hydra.launcher.ray.init.address`` takes, ``env`` the environment a driver connecting to it needs.

        with LocalRayHead(num_cpus=2) as head:
            subprocess.run(["omnisim", "-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={head.address}",
                            "seed=0,1"], env=head.env, check=True)
    """

    def __init__(self, num_cpus: int = 2, start_timeout_s: float = 240.0, attempts: int = 3):
        if num_cpus < 1:
            raise ValueError(f"LocalRayHead: num_cpus must be >= 1, got {num_cpus}")
        self.num_cpus = num_cpus
        self.start_timeout_s = start_timeout_s
        self.attempts = max(1, attempts)
        self.env = {**os.environ, **LOOPBACK_ENV}
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None  # the head's process group (kept after stop, to check nothing outlived it)
        self.temp_dir: str | None = None
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.start_s: float | None = None  # seconds the head took to start (the attempt that succeeded)

    def __enter__(self) -> "LocalRayHead":
        # ray start gives its raylet a fixed 30 s to register with the GCS ("The current node timed out during
        # startup"), which a loaded machine can miss: try again on a fresh port and directory.
        for attempt in range(1, self.attempts + 1):
            try:
                self._start()
                return self
            except BaseException as e:  # an interrupt too: never leave a half-started head behind
                self.stop()
                if attempt == self.attempts or not isinstance(e, RuntimeError):
                    raise
                self.port = free_port()
                self.address = f"127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start(self) -> None:
        # Ray's socket paths live under its temp dir and must stay under the 107 bytes of a Unix socket name.
        self.temp_dir = tempfile.mkdtemp(prefix="omray-", dir="/tmp")
        log = Path(self.temp_dir, "head.log")
        # the ray CLI of this interpreter, whatever PATH holds (a pyenv shim may point elsewhere)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address",
               "127.0.0.1", "--port", str(self.port),
               "--num-cpus", str(self.num_cpus), "--temp-dir", self.temp_dir, "--include-dashboard", "false",
               "--disable-usage-stats", "--ray-client-server-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port())]
        t0 = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.temp_dir, start_new_session=True)
        self.pgid = self.proc.pid
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - t0 > self.start_timeout_s:
                raise RuntimeError(f"ray start did not finish in {self.start_timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.start_s = time.monotonic() - t0

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        path = Path(self.temp_dir or "", "head.log")
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def alive(self) -> list[int]:
        """Live (not zombie) processes of the head's process group."""
        if self.pgid is None:
            return []
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
                pids.append(int(stat.parent.name))
        return pids

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the group (ray start --block then stops its daemons), SIGKILL to what is left after
        ``grace_s``; then the temporary directory goes."""
        if self.proc is not None:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait_s
                while self.alive() and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not self.alive():
                    break
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.proc = self.temp_dir = None  # pgid stays: alive() still answers for the stopped head
