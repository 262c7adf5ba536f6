"""Build a simulated cluster from an Experiment, replay its workload, and collect the records."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import simpy

from omnisim.core import PrefixIndex, Role
from omnisim.experiment import Experiment, RunResult
from omnisim.metrics import records_frame
from omnisim.sim.closed_loop import ClosedLoopArrivals
from omnisim.sim.dp_instance import DPInstance
from omnisim.sim.instance import Instance
from omnisim.sim.proxy_driver import ProxyDriver
from omnisim.sim.timeline import Timeline
from omnisim.workload.closed_loop import ClosedLoopWorkload

_ROLES = {"prefill": Role.PREFILL, "decode": Role.DECODE, "mixed": Role.MIXED}


class Simulation:
    """One run. ``timer_s``: the proxy's re-dispatch timer while requests are held; ``reserve_tokens``: KV an
    instance reserves for a decoding request at a time (vLLM allocates a block per block_size tokens; reserving
    a few blocks ahead only changes when, never whether, a preemption happens by more than that slack)."""

    def __init__(self, experiment: Experiment, *, timer_s: float = 0.01, reserve_tokens: int = 256,
                 progress: bool = False, moe_factory=None, max_run_steps: int = 0, timeline=None) -> None:
        self.experiment = experiment
        self.timeline = timeline
        self.progress = progress
        self.env = env = simpy.Environment()
        self.rows: list[tuple] = []
        self.moe: dict = {}  # instance id -> MoeRuntime
        self.prefix = PrefixIndex()
        cluster, model = experiment.cluster, experiment.model
        groups = cluster.groups()
        self.driver = ProxyDriver(env, experiment.proxy, self.prefix, block_size=cluster.block_size,
                                  max_model_len=min(g.max_model_len for _, g in groups), timer_s=timer_s,
                                  on_record=self._record)
        self.instances: list[Instance] = []
        moe_factory = moe_factory or self._moe_factory()
        make, served = Instance, {}
        serving = experiment.serving
        if serving is not None and serving.active:  # else the plain instances, exactly as without serving costs
            from omnisim.sim.serving import Fifo, HostCPU, ServedInstance

            proxy = Fifo()
            make, served = ServedInstance, {"serving": serving, "host": HostCPU(serving, proxy), "proxy": proxy}
        if experiment.attention is not None:  # OmniAttn: decode instances of a PD cluster, a pattern fitting the model
            experiment.attention.check_deployment(cluster, model.layers)
        for role, group in groups:
            experts = getattr(model, "num_experts", 0)
            if experts and experts % group.ep and not (moe_factory and group.ep > 1):
                raise ValueError(f"cluster.{role}.ep={group.ep} does not divide the {experts} routed experts of "
                                 f"{model.name} (add redundant slots with placement= and rebalance=)")
            cost = experiment.cost(model=model, hardware=experiment.hardware, parallel=group.parallelism)
            capacity = group.kv_capacity(model, experiment.hardware)
            cores = group.engine_cores
            if capacity // cores < group.max_model_len:
                held = f"{capacity} tokens" if cores == 1 else f"{capacity // cores} tokens per DP rank"
                raise ValueError(
                    f"cluster.{role}: the KV cache holds {held}, less than one max_model_len="
                    f"{group.max_model_len} sequence (raise gpu_memory_utilization or tp/dp, or lower max_model_len)")
            kind = make
            if cores > 1:
                if served:
                    raise ValueError(f"cluster.{role}.dp_mode=ranks: the serving-cost model (serving=) covers "
                                     f"instances of one engine core only; use serving=none or dp_mode=split")
                kind = DPInstance
            # The engine policy orders prefills on prefill and mixed instances; decode instances get prompt KV from
            # prefill (they only recompute preempted requests) and OmniInfer refuses TFAS on a kv_consumer.
            engine_policy = experiment.engine_policy if role != "decode" else None
            for i in range(group.count):
                iid = f"{role}-{i}"
                inst = kind(env, iid, _ROLES[role], group, cost, capacity // group.block_size,
                            model.kv_bytes_per_token, cluster.kv_link, self.driver,
                            moe=moe_factory(role, group, i) if moe_factory else None,
                            reserve_tokens=reserve_tokens, max_run_steps=max_run_steps,
                            kv_listener=lambda events, iid=iid: self.prefix.apply(iid, events),
                            engine_policy=engine_policy,
                            attention=experiment.attention if role == "decode" else None,
                            layers=getattr(model, "layers", 0), **served)
                self.instances.append(inst)
                inst.timeline, inst.trace_pid = timeline, len(self.instances)
                self.driver.add(inst)
        self._bar = None
        self._next = None
        self._arrived = 0
        if isinstance(experiment.workload, ClosedLoopWorkload):  # clients send when their last request has ended
            self._closed = ClosedLoopArrivals(env, self.driver, experiment.workload, self._record)
            self.driver.on_record = self._closed.record
        else:
            self._closed = None
            self._requests = iter(experiment.workload.requests())

    def _moe_factory(self):
        """Expert placement per EP group, when the experiment models it: a MoE model, a placement policy and an
        expert-load model (placement=, expert_load=, optional rebalance=). Instances with ep=1 have none."""
        exp, model = self.experiment, self.experiment.model
        load = exp.options.get("expert_load")
        if not getattr(model, "num_experts", 0) or exp.placement is None or load is None:
            return None
        from omnisim.moe import MoeRuntime, RebalanceConfig

        rebalance = exp.options.get("rebalance") or RebalanceConfig()
        per_node = getattr(exp.hardware, "devices_per_node", 8)
        expert_bytes = 3 * model.hidden * model.expert_intermediate * model.dtype_bytes

        def build(role: str, group, index: int):
            if group.ep == 1:
                return None
            runtime = MoeRuntime.for_ep(
                model.moe_layers, model.num_experts, model.top_k, group.ep, load, exp.placement, rebalance,
                expert_bytes, seed=exp.seed * 1_000_003 + len(self.moe), num_nodes=max(1, group.ep // per_node),
                num_groups=model.num_expert_groups)
            self.moe[f"{role}-{index}"] = runtime
            return runtime

        return build

    def _moe_results(self) -> tuple[dict, dict]:
        tables: dict[str, list] = {}
        extra: dict[str, float] = {}
        for iid, runtime in self.moe.items():
            for name, table in runtime.tables().items():
                tables.setdefault(name, []).append(table.assign(instance_id=iid))
            for key, value in runtime.summary().items():
                extra[f"{key}.{iid}"] = value
        return {k: pd.concat(v, ignore_index=True) for k, v in tables.items()}, extra

    def _record(self, row: tuple) -> None:
        self.rows.append(row)
        if self._bar is not None and len(self.rows) % 256 == 0:
            self._bar.update(256)

    def _arrive(self, _event=None) -> None:
        if self._next is not None:
            self.driver.arrive(self._next)
        req = next(self._requests, None)
        self._next = req
        if req is None:
            return
        delay = req.arrival_s - self.env.now
        if delay < 0:
            raise ValueError(f"workload: request {req.id} arrives at {req.arrival_s} s, before the previous one")
        self._arrived += 1
        self.env.timeout(delay).callbacks.append(self._arrive)

    def run(self) -> RunResult:
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(unit="req", desc="simulating", file=sys.stderr, mininterval=0.5)
        try:
            if self._closed is None:
                self._arrive()
            else:
                self._closed.start()
            self.env.run()
        finally:
            if self._bar is not None:
                self._bar.update(len(self.rows) % 256)
                self._bar.close()
        stuck = self.driver.unfinished()
        if stuck:  # cannot happen unless an engine invariant broke: say so rather than lose requests
            raise RuntimeError(f"simulation ended with {len(stuck)} unfinished requests, e.g. {stuck[0].id}")
        arrived = self._arrived if self._closed is None else self._closed.sent
        if len(self.rows) != arrived:
            raise RuntimeError(f"{arrived} requests arrived but {len(self.rows)} were recorded")
        duration = self.env.now
        records = records_frame(self.rows)
        instances = pd.DataFrame([i.stats(duration) for i in self.instances])
        extra = {"simulated_s": duration, "max_proxy_queue": self.driver.max_queue,
                 "engine_preemptions": int(instances["preemptions"].sum()),
                 "kv_bytes_moved": float(instances["kv_bytes_in"].sum())}
        tables, moe_extra = self._moe_results()
        extra.update(moe_extra)
        return RunResult(records=records, instances=instances, extra=extra, tables=tables)


class SimBackend:
    """``backend=sim``: the embedded discrete-event simulator (no servers)."""

    def __init__(self, timer_s: float = 0.01, reserve_tokens: int = 256, progress: str | bool = "auto",
                 trace: bool = False, trace_window_s: list[float] | None = None,
                 trace_max_events: int = 200_000) -> None:
        """``trace``: write ``trace.json`` (a Perfetto / Chrome timeline, omnisim/sim/timeline.py) into the run
        directory, of the slices starting inside ``trace_window_s`` ([start, end] simulated seconds; None: all),
        at most ``trace_max_events`` of them."""
        if not (timer_s == 0 or 1e-4 <= timer_s <= 60):
            # A timer of nanoseconds would re-ask the policy billions of times per simulated second.
            raise ValueError(f"backend.timer_s must be 0 (no timer) or between 1e-4 and 60 s, got {timer_s}")
        if reserve_tokens < 1:
            raise ValueError(f"backend.reserve_tokens must be >= 1, got {reserve_tokens}")
        if trace_window_s is not None and len(trace_window_s) != 2:
            raise ValueError(f"backend.trace_window_s: expected [start_s, end_s], got {trace_window_s}")
        self.timer_s = timer_s
        self.reserve_tokens = reserve_tokens
        self.progress = progress
        self.trace = bool(trace)
        window = list(trace_window_s) if trace_window_s is not None else [0.0, None]
        Timeline(window[0], window[1], trace_max_events)  # bad window or bound: fail now, not after the run
        self.trace_args = (window[0], window[1], trace_max_events)

    def run(self, experiment: Experiment, out_dir: Path | None = None) -> RunResult:
        progress = sys.stderr.isatty() if self.progress == "auto" else bool(self.progress)
        timeline = Timeline(*self.trace_args) if self.trace and out_dir is not None else None
        sim = Simulation(experiment, timer_s=self.timer_s, reserve_tokens=self.reserve_tokens, progress=progress,
                         timeline=timeline)
        result = sim.run()
        if timeline is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            timeline.write(Path(out_dir) / "trace.json", [i.id for i in sim.instances], result.records,
                           result.tables)
        return result
