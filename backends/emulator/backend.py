"""``omnisim backend=emulator``: the experiment's cluster as emulated engines, the real proxy in front of them
with the experiment's policy, and the load generator replaying its workload, all in one asyncio process."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd

from backends.emulator.fleet import EngineGroup, Fleet
from backends.loadgen import LoadGenerator
from backends.loadgen.load_generator import ENDPOINTS
from backends.proxy import Proxy, ProxyConfig
from backends.proxy.config import PD_MODES, PREFIX_SOURCES
from omnisim.experiment import Experiment, RunResult
from omnisim.metrics import records_frame


class EmulatorBackend:
    """``time_scale``: wall seconds per emulated second for engine steps and arrivals (records are in emulated
    seconds; the proxy's and load generator's own overheads are real time, so they weigh 1/time_scale more).
    ``pd_mode``/``prefix_source``/``schedule_interval_s``/limits: the proxy's (backends.proxy.ProxyConfig).
    ``endpoint``: "completions" or "chat"; ``stream``: SSE answers.

    Capacity: engines, proxy and load generator share one Python process (one core): about 6-7k streamed tokens
    per wall second before emulated step times stretch (visible as TPOT above the model's). For heavier
    experiments slow the clock down (time_scale 2 halves the wall token rate)."""

    def __init__(self, time_scale: float = 1.0, stream: bool = True, endpoint: str = "completions",
                 pd_mode: str = "kv_transfer_params", prefix_source: str = "kv_events",
                 schedule_interval_s: float = 0.005, request_timeout_s: float = 600.0, max_inflight: int = 0,
                 max_queued: int = 100000, queue_timeout_s: float = 600.0) -> None:
        if not time_scale > 0:
            raise ValueError(f"backend.time_scale: must be > 0, got {time_scale}")
        for name, value, allowed in (("endpoint", endpoint, ENDPOINTS), ("pd_mode", pd_mode, PD_MODES),
                                     ("prefix_source", prefix_source, PREFIX_SOURCES)):
            if value not in allowed:
                raise ValueError(f"backend.{name}: expected one of {allowed}, got {value!r}")
        for name, value in (("schedule_interval_s", schedule_interval_s), ("request_timeout_s", request_timeout_s),
                            ("queue_timeout_s", queue_timeout_s), ("max_queued", max_queued)):
            if not value > 0:
                raise ValueError(f"backend.{name}: must be > 0, got {value}")
        if max_inflight < 0:
            raise ValueError(f"backend.max_inflight: must be >= 0, got {max_inflight}")
        self.time_scale = time_scale
        self.stream = stream
        self.endpoint = endpoint
        self.pd_mode = pd_mode
        self.prefix_source = prefix_source
        self.schedule_interval_s = schedule_interval_s
        self.request_timeout_s = request_timeout_s
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s

    def fleet(self, experiment: Experiment) -> Fleet:
        cluster, model, hardware = experiment.cluster, experiment.model, experiment.hardware
        if experiment.attention is not None:  # OmniAttn on decode engines, as the simulator runs it
            experiment.attention.check_deployment(cluster, model.layers)
        # The experiment's engine policy on prefill and mixed engines, as in the simulator (omnisim.sim.simulation).
        groups = [EngineGroup(role, g.count, experiment.cost(model=model, hardware=hardware, parallel=g.parallelism),
                              max_num_seqs=g.max_num_seqs, max_num_batched_tokens=g.max_num_batched_tokens,
                              block_size=g.block_size, kv_capacity_tokens=g.kv_capacity(model, hardware),
                              enable_prefix_caching=g.enable_prefix_caching,
                              engine_policy=experiment.engine_policy if role != "decode" else None,
                              attention=experiment.attention if role == "decode" else None,
                              layers=getattr(model, "layers", 0), ranks=g.engine_cores)
                  for role, g in cluster.groups()]
        kv_bytes = model.kv_bytes_per_token
        return Fleet(groups, time_scale=self.time_scale, kv_events=self.prefix_source == "kv_events",
                     shared_storage=self.pd_mode == "shared_storage",
                     kv_transfer_s=lambda tokens: cluster.kv_link.transfer_s(tokens * kv_bytes),
                     model_name=getattr(model, "name", "omnisim-emulated"),
                     max_model_len=min(g.max_model_len for _, g in cluster.groups()))

    def run(self, experiment: Experiment, out_dir: Path | None = None) -> RunResult:
        return asyncio.run(self._run(experiment))

    async def _run(self, experiment: Experiment) -> RunResult:
        block_size = experiment.cluster.block_size
        async with self.fleet(experiment) as fleet:
            config = ProxyConfig(upstreams=fleet.upstreams(), port=0, pd_mode=self.pd_mode,
                                 prefix_source=self.prefix_source, prefix_block_tokens=block_size,
                                 schedule_interval_s=self.schedule_interval_s, max_inflight=self.max_inflight,
                                 max_queued=self.max_queued, queue_timeout_s=self.queue_timeout_s,
                                 read_timeout_s=self.request_timeout_s, metrics_interval_s=0.5)
            proxy = Proxy(config, experiment.proxy)
            await proxy.start()
            try:
                loadgen = LoadGenerator(proxy.url, endpoint=self.endpoint, stream=self.stream, seed=experiment.seed,
                                        time_scale=self.time_scale, request_timeout_s=self.request_timeout_s,
                                        send_prefix_hashes=self.prefix_source == "history")
                start = asyncio.get_running_loop().time()
                rows = await loadgen.run(experiment.workload)  # open or closed loop, as the workload says
                duration = (asyncio.get_running_loop().time() - start) / self.time_scale
            finally:
                await proxy.stop()
            instances = pd.DataFrame(
                [{"instance_id": s.engine_id, "role": s.role, "busy_s": s.engine.stats.busy_s,
                  "duration_s": duration, "steps": s.engine.stats.steps, "preemptions": s.engine.stats.preemptions,
                  "prefix_hit_tokens": s.engine.stats.prefix_hits} for s in fleet.servers])
        extra = {"backend": "emulator", "time_scale": self.time_scale,
                 "proxy_retries": int(proxy.metrics.registry.get_sample_value("omnisim_proxy_retries_total"))}
        return RunResult(records=records_frame(rows), instances=instances, extra=extra)
