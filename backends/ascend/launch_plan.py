"""Cluster config -> vLLM + vllm-ascend server processes (command line and environment per process and node).
Pure: imports neither vllm, vllm_ascend nor torch_npu, so it is tested on any machine.

Where each setting comes from (vllm-ascend documentation, docs.vllm.ai/projects/ascend):
- tutorials/features/pd_disaggregation_mooncake_{single,multi}_node: ``MooncakeConnectorV1`` and
  ``MooncakeLayerwiseConnector`` kv_transfer_config (kv_role kv_producer/kv_consumer, kv_port as a string, engine_id
  unique per instance, kv_connector_extra_config.prefill/decode {dp_size, tp_size}); kv_port at or above the
  AscendDirectTransport range [20000, 20000 + 1000 * NPUs per node); the environment ASCEND_RT_VISIBLE_DEVICES,
  HCCL_IF_IP, GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME, HCCL_SOCKET_IFNAME, OMP_PROC_BIND=false, OMP_NUM_THREADS,
  PYTORCH_NPU_ALLOC_CONF=expandable_segments:True, HCCL_BUFFSIZE (256 prefill, 600 decode in the DeepSeek-R1
  example), TASK_QUEUE_ENABLE=1, HCCL_OP_EXPANSION_MODE=AIV, VLLM_USE_V1=1; multi-node data parallel with
  --data-parallel-size/-size-local/-start-rank/-address/-rpc-port and --headless on the other nodes;
  --enable-expert-parallel, --quantization ascend, --trust-remote-code.
- The older ``LLMDataDistCMgrConnector``: kv_buffer_device "npu", kv_parallel_size 1, kv_port, engine_id,
  kv_connector_module_path vllm_ascend.distributed.llmdatadist_c_mgr_connector, and a rank table in
  DISAGGREGATED_PREFILL_RANK_TABLE_PATH (vllm-ascend examples/disaggregated_prefill_v1).
- OmniAttn is OmniInfer's (omni/accelerators/cache, its own vLLM adaptor; vllm-ascend ignores the keys):
  --additional-config {"enable_omni_attn": true, "omni_attn_config": {sink, recent, beta, pattern}} on prefill and
  decode; its two KV pools (and so no prefix caching) exist on the kv_consumer only.
- user_guide/feature_guide/expert_parallelism_load_balancer: --additional-config {"eplb_config": {dynamic_eplb,
  expert_heat_collection_interval (600), algorithm_execution_interval (50), eplb_policy_type (2),
  num_redundant_experts (0), expert_map_path, expert_map_record_path}}; dynamic EPLB and recording also need the
  environment guard DYNAMIC_EPLB=true.
"""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from backends.vllm.launch_plan import InstanceLaunch, check_engine_policy_settings, engine_policy_launch
from omnisim.cluster import ClusterSpec, InstanceGroup

CONNECTORS = ("MooncakeConnectorV1", "MooncakeLayerwiseConnector", "LLMDataDistCMgrConnector")
EPLB_KEYS = ("dynamic_eplb", "expert_heat_collection_interval", "algorithm_execution_interval", "eplb_policy_type",
             "num_redundant_experts", "expert_map_path", "expert_map_record_path")
LLMDATADIST_MODULE = "vllm_ascend.distributed.llmdatadist_c_mgr_connector"
_ROLE_KV = {"prefill": "kv_producer", "decode": "kv_consumer"}


@dataclass(frozen=True)
class AscendSettings:
    """What an Ascend launch needs beyond the cluster's shape.

    ``nodes``: the hosts' IPs (HCCL_IF_IP, data-parallel address), in order; instances are packed onto them,
    ``devices_per_node`` NPUs each; an instance larger than a node takes whole consecutive nodes (multi-node data
    parallel). ``eplb``: eplb_config keys for --additional-config, applied to the groups in ``eplb_roles`` that
    use expert parallel. ``additional_config``: more vllm-ascend --additional-config keys.
    ``hccl_buffsize_mb``: HCCL_BUFFSIZE per role. ``engine_policy``: the resolved conf/engine_policy node, run on
    prefill and mixed instances as their scheduler class, as on backend=vllm (backends.vllm.tfas_scheduler: a
    subclass of vLLM's v1 scheduler, which vllm-ascend uses unless its own scheduler is switched on).
    """

    model: str
    work_dir: Path
    nodes: tuple[str, ...] = ("127.0.0.1",)
    devices_per_node: int = 8
    connector: str = "MooncakeConnectorV1"
    nic_name: str = "eth0"
    bind_host: str = "0.0.0.0"
    base_port: int = 8100
    kv_port_base: int = 36000
    kv_port_stride: int = 100
    dp_rpc_base_port: int = 13389
    served_model_name: str = ""
    quantization: str | None = None
    enforce_eager: bool = False
    eplb: Mapping[str, object] | None = None
    eplb_roles: tuple[str, ...] = ("decode",)
    additional_config: Mapping[str, object] = field(default_factory=dict)
    hccl_buffsize_mb: Mapping[str, int] = field(default_factory=lambda: {"prefill": 256, "decode": 600, "mixed": 600})
    omp_num_threads: int = 10
    rank_table_path: str | None = None
    seed: int = 0
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable
    omni_attn: Mapping[str, object] | None = None  # OmniInfer's omni_attn_config (OmniAttn.omniinfer_config()); None: off
    engine_policy: Mapping[str, object] | None = None

    def __post_init__(self) -> None:
        check_engine_policy_settings(self.engine_policy, self.extra_args)
        if self.engine_policy is not None:
            # vllm-ascend's platform swaps in its own scheduler config (and class) for these, dropping ours.
            scheduler = self.additional_config.get("ascend_scheduler_config")
            ascend_scheduler = scheduler is not None and not (isinstance(scheduler, Mapping)
                                                              and scheduler.get("enabled", True) is False)
            if ascend_scheduler or self.additional_config.get("recompute_scheduler_enable"):
                raise ValueError("additional_config: ascend_scheduler_config / recompute_scheduler_enable replace "
                                 "vLLM's scheduler class, so engine_policy would not run; drop them or engine_policy")
        if self.connector not in CONNECTORS:
            raise ValueError(f"connector: expected one of {CONNECTORS}, got {self.connector!r}")
        if not self.model:
            raise ValueError("model: a model directory (or name) is required")
        if not self.nodes:
            raise ValueError("nodes: at least one node IP is required")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"nodes: duplicate entries in {list(self.nodes)}")
        if self.devices_per_node < 1:
            raise ValueError(f"devices_per_node: must be >= 1, got {self.devices_per_node}")
        if self.kv_port_base < 20000 + 1000 * self.devices_per_node and self.connector.startswith("Mooncake"):
            raise ValueError(f"kv_port_base: {self.kv_port_base} overlaps Mooncake's AscendDirectTransport ports "
                             f"[20000, {20000 + 1000 * self.devices_per_node}); use >= "
                             f"{20000 + 1000 * self.devices_per_node}")
        if self.connector == "LLMDataDistCMgrConnector" and not self.rank_table_path:
            raise ValueError("rank_table_path: LLMDataDistCMgrConnector needs a rank table "
                             "(DISAGGREGATED_PREFILL_RANK_TABLE_PATH)")
        if self.eplb is not None:
            unknown = sorted(set(self.eplb) - set(EPLB_KEYS))
            if unknown:
                raise ValueError(f"eplb: unknown key(s) {unknown}; vllm-ascend's eplb_config takes {list(EPLB_KEYS)}")
        bad_roles = sorted(set(self.eplb_roles) - {"prefill", "decode", "mixed"})
        if bad_roles:
            raise ValueError(f"eplb_roles: expected prefill, decode or mixed, got {bad_roles}")
        if {"enable_omni_attn", "omni_attn_config"} & set(self.additional_config):
            raise ValueError("additional_config: give OmniAttn through attention=omni_attn (the omni_attn setting), "
                             "not additional_config")
        if self.omni_attn is not None and set(self.omni_attn) != {"sink", "recent", "beta", "pattern"}:
            raise ValueError(f"omni_attn: expected OmniInfer's omni_attn_config keys sink, recent, beta, pattern, got "
                             f"{sorted(self.omni_attn)}")
        if "eplb_config" in self.additional_config:
            raise ValueError("additional_config: give eplb_config through the eplb setting, not additional_config")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name or "model"

    @property
    def pd_mode(self) -> str:
        return "kv_transfer_params"  # vllm-ascend's connectors all answer prefill with kv_transfer_params


def kv_transfer_config(role: str, index: int, prefill: InstanceGroup | None, decode: InstanceGroup | None,
                       settings: AscendSettings) -> dict | None:
    """--kv-transfer-config of instance ``index`` (its engine_id); None for a colocated instance."""
    if role == "mixed":
        return None
    config: dict = {"kv_connector": settings.connector, "kv_role": _ROLE_KV[role], "kv_buffer_device": "npu",
                    "engine_id": str(index)}
    if settings.connector.startswith("Mooncake"):
        config["kv_port"] = str(settings.kv_port_base + index * settings.kv_port_stride)
        config["kv_connector_extra_config"] = {
            "prefill": {"dp_size": prefill.dp, "tp_size": prefill.tp},
            "decode": {"dp_size": decode.dp, "tp_size": decode.tp},
        }
    else:
        config.update(kv_parallel_size=1, kv_port=str(20001 + index), kv_connector_module_path=LLMDATADIST_MODULE)
    return config


def additional_config(role: str, group: InstanceGroup, settings: AscendSettings) -> dict:
    config = dict(settings.additional_config)
    if settings.eplb is not None and group.ep > 1 and role in settings.eplb_roles:
        config["eplb_config"] = dict(settings.eplb)
    if settings.omni_attn is not None:  # both roles: the prefill side sends a compressed layer's window only
        config["enable_omni_attn"] = True
        config["omni_attn_config"] = dict(settings.omni_attn)
    return config


def _eplb_env_guard(config: dict) -> bool:
    eplb = config.get("eplb_config") or {}
    return bool(eplb.get("dynamic_eplb")) or bool(eplb.get("expert_map_record_path"))


def _check_group(where: str, group: InstanceGroup, settings: AscendSettings) -> None:
    if group.ep > 1 and group.ep != group.tp * group.dp:
        raise ValueError(f"{where}.ep: vLLM's expert parallel spans all tp*dp={group.tp * group.dp} devices of an "
                         f"instance, got ep={group.ep}")
    if group.devices > settings.devices_per_node:
        if group.devices % settings.devices_per_node or settings.devices_per_node % group.tp:
            raise ValueError(
                f"{where}: an instance of tp={group.tp} x dp={group.dp} devices spans nodes of "
                f"{settings.devices_per_node} devices only as whole nodes of whole tp groups (multi-node data "
                "parallel); multi-node tensor parallel is not supported by this launcher")


class _Slot(NamedTuple):
    """Where one instance runs: ``nodes`` nodes from ``first_node`` on, ``local`` devices from ``first_device`` on
    each."""
    role: str
    index: int
    group: InstanceGroup
    first_node: int
    nodes: int
    first_device: int
    local: int


def _pack(cluster: ClusterSpec, devices_per_node: int) -> list[_Slot]:
    """Instances in plan order, packed onto nodes: one that fits takes the rest of the current node, or a fresh node
    when it does not fit there; a larger one takes whole fresh nodes (an instance never straddles a partly used
    node)."""
    slots = []
    node, free = -1, 0
    for role, group in cluster.groups():
        for i in range(group.count):
            if group.devices > devices_per_node:
                n = -(-group.devices // devices_per_node)
                slots.append(_Slot(role, i, group, node + 1, n, 0, devices_per_node))
                node, free = node + n, 0
            else:
                if group.devices > free:
                    node, free = node + 1, devices_per_node
                slots.append(_Slot(role, i, group, node, 1, devices_per_node - free, group.devices))
                free -= group.devices
    return slots


def nodes_needed(cluster: ClusterSpec, devices_per_node: int) -> int:
    """Nodes the packing in plan_instances uses."""
    return max((x.first_node + x.nodes for x in _pack(cluster, devices_per_node)), default=0)


def plan_instances(cluster: ClusterSpec, settings: AscendSettings) -> tuple[InstanceLaunch, ...]:
    """One launch per process: per instance, one per node it occupies (the first serves HTTP; the rest run
    --headless). ValueError names the cluster field or setting that does not fit."""
    if settings.omni_attn is not None and not cluster.disaggregated:
        raise ValueError("attention=omni_attn: OmniInfer runs OmniAttn on the decode instances of a PD cluster (it "
                         "refuses prefills on an OmniAttn instance); this cluster is colocated (mixed)")
    for role, group in cluster.groups():
        _check_group(f"cluster.{role}", group, settings)
    need = nodes_needed(cluster, settings.devices_per_node)
    if need > len(settings.nodes):
        raise ValueError(f"nodes: the cluster needs {need} node(s) of {settings.devices_per_node} devices, "
                         f"{len(settings.nodes)} given ({list(settings.nodes)})")
    launches = []
    for k, (role, i, group, first_node, n_nodes, first_device, local) in enumerate(
            _pack(cluster, settings.devices_per_node)):
        instance_id = f"{role}-{i}"
        extra = additional_config(role, group, settings)
        # OmniAttn's hybrid KV manager (two pools, decode side) has no prefix caching
        caching = group.enable_prefix_caching and not (settings.omni_attn is not None and role == "decode")
        kv = kv_transfer_config(role, k, cluster.prefill, cluster.decode, settings)
        port = settings.base_port + k
        for part in range(n_nodes):
            host = settings.nodes[first_node + part]
            argv = [
                settings.python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", settings.model, "--served-model-name", settings.model_name,
                "--host", settings.bind_host, "--port", str(port), "--seed", str(settings.seed),
                "--trust-remote-code",
                "--max-model-len", str(group.max_model_len), "--max-num-seqs", str(group.rank_max_num_seqs),
                "--max-num-batched-tokens", str(group.max_num_batched_tokens),
                "--block-size", str(group.block_size),
                "--gpu-memory-utilization", str(group.gpu_memory_utilization),
                "--enable-prefix-caching" if caching else "--no-enable-prefix-caching",
            ]
            if group.tp > 1:
                argv += ["--tensor-parallel-size", str(group.tp)]
            if group.dp > 1:
                local_dp = local // group.tp
                argv += ["--data-parallel-size", str(group.dp), "--data-parallel-size-local", str(local_dp),
                         "--data-parallel-address", settings.nodes[first_node],
                         "--data-parallel-rpc-port", str(settings.dp_rpc_base_port + k)]
                if part > 0:
                    argv += ["--headless", "--data-parallel-start-rank", str(part * local_dp)]
            if group.ep > 1:
                argv.append("--enable-expert-parallel")
            if settings.quantization:
                argv += ["--quantization", settings.quantization]
            if settings.enforce_eager:
                argv.append("--enforce-eager")
            if extra:
                argv += ["--additional-config", json.dumps(extra, sort_keys=True)]
            if kv is not None:
                argv += ["--kv-transfer-config", json.dumps(kv, sort_keys=True)]
            policy_args, policy_env = engine_policy_launch(role, settings.engine_policy)
            argv += policy_args
            argv += list(settings.extra_args)

            devices = tuple(range(first_device, first_device + local))
            env = {
                "ASCEND_RT_VISIBLE_DEVICES": ",".join(map(str, devices)),
                "HCCL_IF_IP": host,
                "GLOO_SOCKET_IFNAME": settings.nic_name,
                "TP_SOCKET_IFNAME": settings.nic_name,
                "HCCL_SOCKET_IFNAME": settings.nic_name,
                "HCCL_BUFFSIZE": str(settings.hccl_buffsize_mb.get(role, 600)),
                "HCCL_OP_EXPANSION_MODE": "AIV",
                "OMP_PROC_BIND": "false",
                "OMP_NUM_THREADS": str(settings.omp_num_threads),
                "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
                "TASK_QUEUE_ENABLE": "1",
                "VLLM_USE_V1": "1",
                "VLLM_HOST_IP": host,
                "VLLM_NO_USAGE_STATS": "1",
                # Same hash seed everywhere: prefix-block hashes must agree across instances (KV pool, events).
                "PYTHONHASHSEED": str(settings.seed),
            }
            env.update(policy_env)
            if _eplb_env_guard(extra):
                env["DYNAMIC_EPLB"] = "true"
            if settings.connector == "LLMDataDistCMgrConnector" and kv is not None:
                env["DISAGGREGATED_PREFILL_RANK_TABLE_PATH"] = str(settings.rank_table_path)
            env.update(settings.env)
            work_dir = Path(settings.work_dir) / (instance_id if part == 0 else f"{instance_id}.part{part}")
            launches.append(InstanceLaunch(
                id=instance_id, role=role, host=host, port=port, argv=tuple(argv), env=env, work_dir=work_dir,
                devices=devices, node=host, part=part))
    return tuple(launches)


def node_scripts(launches: Sequence[InstanceLaunch]) -> dict[str, str]:
    """One bash script per node that starts that node's processes (each with its own environment and log) and
    waits for them; stops them all on Ctrl-C or SIGTERM. For clusters this process cannot start itself."""
    by_node: dict[str, list[InstanceLaunch]] = {}
    for x in launches:
        by_node.setdefault(x.node, []).append(x)
    scripts = {}
    for node, xs in by_node.items():
        lines = ["#!/usr/bin/env bash", f"# omnisim: vllm-ascend processes for node {node}", "set -euo pipefail",
                 "pids=()", "trap 'kill ${pids[@]} 2>/dev/null; wait' INT TERM", ""]
        for x in xs:
            name = x.id if not x.headless else f"{x.id}.part{x.part}"
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in x.env.items())
            lines += [f"# {name}: {x.role}, devices {','.join(map(str, x.devices))}" +
                      ("" if x.headless else f", http {x.url}"),
                      f"mkdir -p {shlex.quote(str(x.work_dir))}",
                      f"env {env} \\\n    {shlex.join(x.argv)} \\\n    > {shlex.quote(str(x.log_path))} 2>&1 &",
                      "pids+=($!)", ""]
        lines.append("wait")
        scripts[node] = "\n".join(lines) + "\n"
    return scripts
