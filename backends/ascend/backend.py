"""``omnisim backend=ascend``: the experiment on vLLM + vllm-ascend servers on Ascend NPUs, behind the omnisim proxy
running the experiment's policy, with the workload replayed by the load generator.

Every run writes one launch script per node to ``out_dir/launch/`` (what each node runs). On one node the backend
starts and stops the servers itself; for a multi-node cluster, run those scripts on their nodes and set
``start_servers: false``: the backend then waits for every instance's /health and drives the load.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from backends.ascend.launch_plan import AscendSettings, node_scripts, plan_instances
from backends.ascend.preflight import check_ascend
from backends.vllm.backend import engine_policy_node, model_vocab_size
from backends.vllm.cluster_run import ReplaySettings, run_on_servers
from omnisim.experiment import Experiment, RunResult

log = logging.getLogger(__name__)


class AscendBackend:
    """Arguments mirror conf/backend/ascend.yaml (see backends.ascend.launch_plan.AscendSettings)."""

    def __init__(self, model_path: str | None = None, nodes: Sequence[str] = ("127.0.0.1",),
                 devices_per_node: int = 8, connector: str = "MooncakeConnectorV1", nic_name: str = "eth0",
                 base_port: int = 8100, kv_port_base: int = 36000, quantization: str | None = None,
                 enforce_eager: bool = False, eplb: Mapping | None = None, eplb_roles: Sequence[str] = ("decode",),
                 additional_config: Mapping | None = None, hccl_buffsize_mb: Mapping[str, int] | None = None,
                 rank_table_path: str | None = None, start_servers: bool = True, startup_timeout_s: float = 1800.0,
                 stop_timeout_s: float = 60.0, endpoint: str = "completions", stream: bool = True,
                 prompt_format: str = "token_ids", vocab_size: int = 129280, time_scale: float = 1.0,
                 request_timeout_s: float = 1800.0, proxy_options: Mapping | None = None,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None, seed: int = 0) -> None:
        self.model_path = model_path
        self.start_servers = start_servers
        self.settings_args = dict(
            nodes=tuple(nodes), devices_per_node=devices_per_node, connector=connector, nic_name=nic_name,
            base_port=base_port, kv_port_base=kv_port_base, quantization=quantization, enforce_eager=enforce_eager,
            eplb=dict(eplb) if eplb is not None else None, eplb_roles=tuple(eplb_roles),
            additional_config=dict(additional_config or {}), rank_table_path=rank_table_path, seed=seed,
            extra_args=tuple(str(a) for a in extra_args), env={str(k): str(v) for k, v in (env or {}).items()})
        if hccl_buffsize_mb is not None:
            self.settings_args["hccl_buffsize_mb"] = {str(k): int(v) for k, v in hccl_buffsize_mb.items()}
        self.replay = ReplaySettings(
            endpoint=endpoint, stream=stream, prompt_format=prompt_format, vocab_size=vocab_size,
            time_scale=time_scale, request_timeout_s=request_timeout_s, startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s, proxy_options=dict(proxy_options or {}))
        AscendSettings(model="check", work_dir=Path("."), **self.settings_args)  # bad settings fail here

    def run(self, experiment: Experiment, out_dir: Path) -> RunResult:
        model = self.model_path or experiment.options.get("model_path")
        if not model:
            raise ValueError("backend.model_path: backend=ascend needs the model's directory on every node "
                             "(e.g. backend.model_path=/data/DeepSeek-R1-w8a8)")
        out_dir = Path(out_dir).resolve()
        settings = AscendSettings(model=str(model), work_dir=out_dir / "ascend",
                                  engine_policy=engine_policy_node(experiment), **self.settings_args)
        if experiment.attention is not None:  # OmniAttn: its additional-config on both roles, caching off on decode
            experiment.attention.check_deployment(experiment.cluster, experiment.model.layers)
            settings = dataclasses.replace(settings, omni_attn=experiment.attention.omniinfer_config())
        launches = plan_instances(experiment.cluster, settings)
        scripts = write_node_scripts(launches, out_dir / "launch")
        used_nodes = sorted({x.node for x in launches})
        if self.start_servers:
            if len(used_nodes) > 1:
                raise ValueError(f"backend.start_servers: this cluster spans {len(used_nodes)} nodes; run the "
                                 f"scripts in {out_dir / 'launch'} on their nodes and set backend.start_servers=false")
            check_ascend(sum(len(x.devices) for x in launches))
        else:
            log.info("ascend: waiting for servers started by %s", ", ".join(map(str, scripts)))
        block_size = experiment.cluster.block_size
        replay = dataclasses.replace(self.replay, vocab_size=model_vocab_size(str(model), self.replay.vocab_size))
        result = run_on_servers(
            experiment, out_dir, launches, pd_mode=settings.pd_mode, model_name=settings.model_name,
            block_size=block_size, kv_events=False, replay=replay, backend_name="ascend",
            start_servers=self.start_servers)
        result.extra.update(model_path=str(model), connector=settings.connector, nodes=len(used_nodes))
        return result


def write_node_scripts(launches, directory: Path) -> list[Path]:
    """node_scripts() written as directory/node-<ip>.sh (executable); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for node, text in node_scripts(launches).items():
        path = directory / f"node-{node}.sh"
        path.write_text(text)
        os.chmod(path, 0o755)
        paths.append(path)
    return paths
