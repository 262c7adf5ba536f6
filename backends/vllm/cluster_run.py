"""One experiment on real servers: start them, put the omnisim proxy (with the experiment's policy) in front,
replay the workload with the load generator, read each engine's own counters, stop everything.

Shared by backend=vllm and backend=ascend: they differ only in how the server command lines are planned.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from backends.vllm.engine_metrics import EngineCounters, scrape_counters
from backends.vllm.launch_plan import InstanceLaunch
from backends.vllm.server_group import AttachedServers, ServerGroup, log_tail, process_key
from omnisim.experiment import Experiment, RunResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplaySettings:
    """How the load reaches the servers. ``proxy_options``: backends.proxy.ProxyConfig keys other than
    upstreams and pd_mode (unknown keys fail). ``prompt_format`` "token_ids" makes prompt lengths exact for any
    tokenizer; ``vocab_size`` bounds the ids (the model's vocabulary)."""

    endpoint: str = "completions"
    stream: bool = True
    prompt_format: str = "token_ids"
    vocab_size: int = 32000
    time_scale: float = 1.0
    request_timeout_s: float = 600.0
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 20.0
    proxy_options: Mapping[str, object] = field(default_factory=dict)


def proxy_config(launches: Sequence[InstanceLaunch], pd_mode: str, block_size: int, proxy_options: Mapping,
                 kv_events: bool, tokenizer: str | None = None):
    """The backends.proxy.ProxyConfig that fronts ``launches`` (ValueError naming a bad proxy option).

    Prefix source (unless proxy_options names one): vLLM's KV events when they are on and the proxy has the
    model's ``tokenizer`` (it re-hashes the events' token ids, so matches are exact); else the proxy's routing
    history, because vLLM's own block hashes never equal hashes the proxy computes from request text."""
    from backends.proxy import ProxyConfig

    fixed = sorted({"upstreams", "pd_mode"} & set(proxy_options))
    if fixed:
        raise ValueError(f"backend.proxy_options: {fixed} follow from the planned servers and the connector; "
                         "they cannot be set here")
    upstreams = [{"url": x.url, "role": x.role, "id": x.id, "kv_events": x.kv_events_endpoint} for x in launches]
    data = {"port": 0, "prefix_block_tokens": block_size, **dict(proxy_options), "upstreams": upstreams,
            "pd_mode": pd_mode}
    if kv_events and tokenizer:
        data.setdefault("prefix_source", "kv_events")
        data.setdefault("tokenizer", tokenizer)
    elif kv_events:
        log.warning("kv events are on but the proxy has no tokenizer: it routes by its own history instead")
        data.setdefault("prefix_source", "history")
    return ProxyConfig.from_dict(data, where="backend.proxy_options")


def launch_tokenizer(launches: Sequence[InstanceLaunch]) -> str | None:
    """The tokenizer the servers were launched with: their ``--tokenizer``, else their ``--model``."""
    for x in launches:
        for flag in ("--tokenizer", "--model"):
            if flag in x.argv[:-1]:
                return x.argv[x.argv.index(flag) + 1]
    return None


def busy_seconds(records: pd.DataFrame, instance_id: str, role: str) -> float:
    """Time the instance had at least one of the run's requests in flight (union of the requests' intervals on it,
    as the proxy saw them): prefill dispatch to prefill end on prefill instances, decode dispatch (or arrival when
    colocated) to finish on decode and mixed ones."""
    if role == "prefill":
        rows = records[records["prefill_instance"] == instance_id]
        start, end = rows["prefill_dispatch_s"], rows["prefill_end_s"]
    else:
        rows = records[records["decode_instance"] == instance_id]
        start = rows["decode_dispatch_s"].fillna(rows["arrival_s"])
        end = rows["finish_s"]
    spans = sorted((s, e) for s, e in zip(start.to_numpy(), end.to_numpy()) if np.isfinite(s) and np.isfinite(e))
    busy, reached = 0.0, -np.inf
    for s, e in spans:  # by start time: count the part of each span past what is already counted
        if e > reached:
            busy += e - max(s, reached)
            reached = e
    return float(busy)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so every server is stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _scrape_all(launches: Sequence[InstanceLaunch]) -> dict[str, EngineCounters]:
    return {x.id: scrape_counters(x.url) for x in launches}


def run_on_servers(experiment: Experiment, out_dir: Path, launches: Sequence[InstanceLaunch], *, pd_mode: str,
                   model_name: str, block_size: int, kv_events: bool, replay: ReplaySettings,
                   backend_name: str, work_dir: Path | None = None, start_servers: bool = True,
                   tokenizer: str | None = None) -> RunResult:
    """Launch, proxy, replay, scrape, stop. Server logs are copied to ``out_dir/logs/`` whatever happens;
    ``work_dir`` (the servers' scratch space, e.g. the shared KV store) is removed afterwards when given.
    ``start_servers`` False: the servers were started elsewhere; wait for their /health and leave them running.
    ``tokenizer``: the model's tokenizer for the proxy when KV events are on (default: the servers' own)."""
    from backends.loadgen import LoadGenerator
    from backends.proxy import ProxyThread

    servers_http = [x for x in launches if not x.headless]  # one per instance: the proxy's upstreams
    if kv_events and tokenizer is None:
        tokenizer = launch_tokenizer(servers_http)
    config = proxy_config(servers_http, pd_mode, block_size, replay.proxy_options, kv_events,
                          tokenizer)  # fail early
    if config.tokenizer:
        from backends.common.prompt_tokenizer import PromptTokenizer

        PromptTokenizer(config.tokenizer)  # an unusable tokenizer fails here, before any server starts

    def load_generator(url: str) -> LoadGenerator:
        return LoadGenerator(
            url, endpoint=replay.endpoint, model=model_name, stream=replay.stream, prompt_format=replay.prompt_format,
            vocab_size=replay.vocab_size, seed=experiment.seed, time_scale=replay.time_scale,
            request_timeout_s=replay.request_timeout_s)

    load_generator("http://127.0.0.1:1")  # its settings fail here, before any server starts
    if start_servers:
        servers = ServerGroup(launches, startup_timeout_s=replay.startup_timeout_s,
                              stop_timeout_s=replay.stop_timeout_s)
    else:
        servers = AttachedServers(launches, startup_timeout_s=replay.startup_timeout_s)
    try:
        with sigterm_as_interrupt():
            log.info("%s: %s %d server(s): %s", backend_name, "starting" if start_servers else "waiting for",
                     len(servers_http), ", ".join(x.id for x in servers_http))
            with servers:
                log.info("%s: servers healthy after %s s", backend_name,
                         {k: round(v, 1) for k, v in servers.ready_after_s.items()})
                before = _scrape_all(servers_http)
                with ProxyThread(config, experiment.proxy) as proxy:
                    started = time.monotonic()
                    records = load_generator(proxy.url).replay(experiment.workload)  # open or closed loop
                    replay_wall_s = time.monotonic() - started
                dead = servers.dead()
                if dead:
                    first = next(x for x in launches if process_key(x) in dead)
                    raise RuntimeError(f"{backend_name}: server(s) {dead} exited during the run; log of {first.id}:\n"
                                       f"{log_tail(first.log_path)}")
                counters = {k: v.minus(before[k]) for k, v in _scrape_all(servers_http).items()}
    finally:
        if start_servers:
            _keep_logs(launches, Path(out_dir) / "logs")
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)

    duration = float(np.nanmax(records["finish_s"].to_numpy(dtype=float), initial=0.0)) if len(records) else 0.0
    rows = []
    for x in servers_http:
        c = counters[x.id]
        rows.append({"instance_id": x.id, "role": x.role, "busy_s": busy_seconds(records, x.id, x.role),
                     "duration_s": duration, "url": x.url, "ready_after_s": servers.ready_after_s.get(x.id, np.nan),
                     "external_kv_tokens": c.external_kv_tokens,
                     **{k: (np.nan if v is None else v) for k, v in c.as_dict().items()}})
    instances = pd.DataFrame(rows)
    consumers = [x.id for x in servers_http if x.role == "decode"]
    extra = {
        "backend": backend_name,
        # Prompt tokens whose KV the decode instances received from prefill, by vLLM's own count.
        "external_kv_tokens": float(sum(counters[i].external_kv_tokens for i in consumers)),
        "engine_prompt_tokens_computed": float(sum(counters[x.id].prompt_tokens_local_compute or 0.0
                                                   for x in servers_http)),
        "engine_prefix_cache_hit_tokens": float(sum(counters[x.id].prefix_cache_hits or 0.0 for x in servers_http)),
        "server_startup_s": float(max(servers.ready_after_s.values(), default=0.0)),
        "replay_wall_s": replay_wall_s,
    }
    return RunResult(records=records, instances=instances, extra=extra)


def _keep_logs(launches: Sequence[InstanceLaunch], dest: Path) -> None:
    for x in launches:
        if x.log_path.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(x.log_path, dest / (f"{x.id}.log" if not x.headless else f"{x.id}.part{x.part}.log"))
