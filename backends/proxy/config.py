"""The proxy's settings: upstream engines (URL and role) and its limits. Plain frozen dataclasses, checked on build."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from omnisim.core import Role

PD_MODES = ("kv_transfer_params", "shared_storage")
PREFIX_SOURCES = ("history", "kv_events", "none")


@dataclass(frozen=True)
class Upstream:
    """One engine. ``id`` defaults to f"{role}-{i}" (i counts per role, in order). ``kv_events``: the engine's ZMQ
    KV-event endpoint (e.g. "tcp://127.0.0.1:5557"), used when the proxy's prefix_source is "kv_events"."""

    url: str
    role: str = "mixed"
    id: str = ""
    kv_events: str | None = None
    max_num_seqs: int = 0
    kv_capacity_tokens: int = 0

    def __post_init__(self) -> None:
        if self.role not in {r.value for r in Role}:
            raise ValueError(f"upstream {self.url!r}: role must be prefill, decode or mixed, got {self.role!r}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"upstream url: expected http(s)://host:port, got {self.url!r}")


@dataclass(frozen=True)
class ProxyConfig:
    """Everything but the policy. Limits: ``max_inflight`` requests at once (429 beyond, 0 = no limit),
    ``max_queued`` held in the proxy's queues (503 beyond), ``queue_timeout_s`` held at most (then 503),
    ``max_body_bytes`` per request body (413 beyond). ``max_attempts``: tries on different instances when an
    upstream fails before the client got any byte. ``health_failures`` consecutive failed /health checks take an
    upstream out of rotation; one success brings it back. ``metrics_interval_s`` polls each engine's /metrics
    (0 = never). ``prefix_block_tokens``: block size of the hashes the proxy computes from prompts (set it to the
    engines' KV block size when prefix_source is "kv_events"). ``tokenizer``: the model's tokenizer (its directory,
    or a hub name where the hub is reachable): prompts are then tokenized exactly as vLLM does, so prompt lengths
    are exact, and with prefix_source "kv_events" the engines' block hashes are mapped to the proxy's own through
    the token ids in their events, so prefix matches against vLLM are exact (backends/common/engine_block_map.py).
    Without it, "kv_events" matches the events' hashes as they are: exact against the emulator only.
    ``record_trace``: a new file to which the proxy writes the traffic it serves as a Mooncake-style trace that
    ``workload=mooncake`` replays (backends/proxy/trace_recorder.py); its hash ids name blocks of
    ``prefix_block_tokens`` tokens.

    Timeouts (seconds; README "Failure behaviour"): ``connect_timeout_s`` to open a connection to an engine;
    ``first_token_timeout_s`` from sending a request to an engine until its first byte of answer (a prefill's
    whole answer; a stream's first chunk); ``stream_idle_timeout_s`` between two chunks of a stream;
    ``read_timeout_s`` for the whole answer of a non-streamed request; ``client_read_timeout_s`` for a client to
    send its request's body once its headers came (408 beyond). An attempt that times out is retried on another
    engine if the client got nothing yet, else its stream ends with an SSE error event."""

    upstreams: tuple[Upstream, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    pd_mode: str = "kv_transfer_params"
    prefix_source: str = "history"
    prefix_block_tokens: int = 16
    tokenizer: str | None = None
    history_blocks: int = 1 << 20
    max_body_bytes: int = 4 << 20
    max_inflight: int = 0
    max_queued: int = 10000
    queue_timeout_s: float = 60.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    first_token_timeout_s: float = 120.0
    stream_idle_timeout_s: float = 60.0
    client_read_timeout_s: float = 30.0
    max_attempts: int = 2
    schedule_interval_s: float = 0.005
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    health_failures: int = 2
    metrics_interval_s: float = 1.0
    default_max_tokens: int = 256
    retry_after_s: int = 1
    record_trace: str | None = None

    def __post_init__(self) -> None:
        ups = tuple(u if isinstance(u, Upstream) else Upstream(**u) for u in self.upstreams)
        if not ups:
            raise ValueError("upstreams: at least one upstream engine is needed")
        counts: dict[str, int] = {}
        named = []
        for u in ups:
            i = counts.get(u.role, 0)
            counts[u.role] = i + 1
            named.append(u if u.id else dataclasses.replace(u, id=f"{u.role}-{i}"))
        ids = [u.id for u in named]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"upstreams: duplicate id(s) {sorted(dup)}")
        object.__setattr__(self, "upstreams", tuple(named))
        if ("prefill" in counts) != ("decode" in counts) and "mixed" not in counts:
            raise ValueError("upstreams: prefill instances need decode instances (or mixed ones) and vice versa")
        if self.pd_mode not in PD_MODES:
            raise ValueError(f"pd_mode: expected one of {PD_MODES}, got {self.pd_mode!r}")
        if self.prefix_source not in PREFIX_SOURCES:
            raise ValueError(f"prefix_source: expected one of {PREFIX_SOURCES}, got {self.prefix_source!r}")
        if self.prefix_source == "kv_events" and not any(u.kv_events for u in named):
            raise ValueError("prefix_source: kv_events needs upstreams with a kv_events endpoint")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise ValueError(f"tokenizer: expected a tokenizer directory or name, got {self.tokenizer!r}")
        if self.record_trace is not None and (not isinstance(self.record_trace, str) or not self.record_trace.strip()):
            raise ValueError(f"record_trace: expected a file path, got {self.record_trace!r}")
        for name in ("max_body_bytes", "max_queued", "max_attempts", "health_failures", "prefix_block_tokens",
                     "default_max_tokens", "history_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("queue_timeout_s", "connect_timeout_s", "read_timeout_s", "first_token_timeout_s",
                     "stream_idle_timeout_s", "client_read_timeout_s", "schedule_interval_s", "health_interval_s",
                     "health_timeout_s"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) > 0 \
                    or getattr(self, name) == float("inf"):
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_inflight < 0 or self.metrics_interval_s < 0 or self.retry_after_s < 0:
            raise ValueError("max_inflight, metrics_interval_s and retry_after_s must be >= 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: expected 0..65535, got {self.port}")

    @property
    def disaggregated(self) -> bool:
        return any(u.role == "prefill" for u in self.upstreams)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "proxy config") -> "ProxyConfig":
        """Build from a plain mapping (a parsed YAML file); unknown keys fail, naming the key and ``where``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        up_known = {f.name for f in dataclasses.fields(Upstream)}
        ups = []
        for k, u in enumerate(data.get("upstreams") or ()):
            if not isinstance(u, Mapping):
                raise ValueError(f"{where}: upstreams[{k}] must be a mapping with url and role")
            bad = sorted(set(u) - up_known)
            if bad:
                raise ValueError(f"{where}: upstreams[{k}]: unknown key(s) {bad}; known: {sorted(up_known)}")
            if "url" not in u:
                raise ValueError(f"{where}: upstreams[{k}]: url is required")
            ups.append(Upstream(**dict(u)))
        try:
            return cls(**{**dict(data), "upstreams": tuple(ups)})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def upstreams_from_urls(urls: Mapping[str, list[str]]) -> tuple[Upstream, ...]:
    """{"prefill": [url, ...], "decode": [...], "mixed": [...]} -> upstreams with ids f"{role}-{i}"."""
    return tuple(Upstream(url, role) for role in ("prefill", "decode", "mixed") for url in urls.get(role, ()))


__all__ = ["PD_MODES", "PREFIX_SOURCES", "ProxyConfig", "Upstream", "upstreams_from_urls"]
