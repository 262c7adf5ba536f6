"""One experiment, instantiated from the Hydra config, that any backend (sim, emulator, vllm, ascend) can run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pandas as pd

from omnisim.cluster import ClusterSpec
from omnisim.core import PlacementPolicy, ProxyPolicy


@dataclass(frozen=True)
class Experiment:
    """Everything a backend needs. ``cost(model=, hardware=, parallel=)`` builds a StepTimeModel for one instance
    group (a functools.partial from conf/cost/). ``workload.requests()`` yields the requests in arrival order."""

    name: str
    seed: int
    model: Any  # omnisim.cost.ModelSpec
    hardware: Any  # omnisim.cost.HardwareSpec
    cluster: ClusterSpec
    workload: Any  # omnisim.workload.Workload
    proxy: ProxyPolicy
    slo: Any  # omnisim.metrics.SLO
    cost: Callable[..., Any]
    placement: PlacementPolicy | None = None
    attention: Any = None  # omnisim.attention.OmniAttn on decode instances, or None: full attention
    engine_policy: Any = None  # omnisim.core.engine_policy.PrefillPolicy of every prefilling instance, or None: FCFS
    serving: Any = None  # omnisim.sim.serving.ServingCosts (the simulator's; real backends have the real ones), or None
    options: dict = field(default_factory=dict)


@dataclass
class RunResult:
    """Per-request records (omnisim.metrics schema), per-instance rows, and extra summary keys."""

    records: pd.DataFrame
    instances: pd.DataFrame | None = None
    extra: dict = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # more parquet files, e.g. expert moves


class Backend(Protocol):
    def run(self, experiment: Experiment, out_dir: Path) -> RunResult: ...
