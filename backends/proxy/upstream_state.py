"""What the proxy knows about one upstream engine: its own in-flight accounting, health, and the engine's /metrics."""
from __future__ import annotations

from collections import deque

from yarl import URL

from omnisim.core import BatchSample, InstanceState, Role

from backends.proxy.config import Upstream


class UpstreamState:
    """Counts change at dispatch and completion (exact for this proxy's traffic); the engine's running/waiting
    split and KV usage come from its last /metrics scrape (stale by up to one poll interval). Every change goes
    through a method here, which drops the cached ``snapshot()``: a policy's view rebuilds only the instances
    whose state changed since the last one (with 20 engines, 20 InstanceStates per scheduling call otherwise).

    ``recent_batches`` are what the proxy can observe of engine steps (it cannot see them directly): a prefill
    that ran alone on its instance gives (duration, uncached prompt tokens, 0), queueing included; a finished
    stream gives (median gap between its chunks, 0, requests this proxy had decoding there), as each chunk is one
    decode step's token."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.id = upstream.id
        self.url = upstream.url.rstrip("/")
        self.role = Role(upstream.role)
        self.healthy = True
        self.failures = 0
        self.outstanding = 0
        self.inflight_prompt_tokens = 0
        self.decode_tokens = 0
        self.engine_running: int | None = None
        self.engine_waiting: int | None = None
        self.kv_usage = 0.0
        self._batches: deque[BatchSample] = deque(maxlen=16)
        self.recent_batches: tuple[BatchSample, ...] = ()  # rebuilt only when a sample arrives
        self._endpoints: dict[str, URL] = {}
        self._snapshot: InstanceState | None = None
        self.attempts: set = set()  # requests being served here (pd_protocol._Attempt): told when it leaves rotation

    def endpoint(self, path: str) -> URL:
        """The URL of ``path`` on this engine, parsed once (aiohttp would parse a string on every request)."""
        url = self._endpoints.get(path)
        if url is None:
            url = self._endpoints[path] = URL(self.url + path)
        return url

    def assigned(self, prompt_tokens: int, decode_tokens: int) -> None:
        """A request was assigned here: ``prompt_tokens`` to prefill, ``decode_tokens`` of context to decode."""
        self.outstanding += 1
        self.inflight_prompt_tokens += prompt_tokens
        self.decode_tokens += decode_tokens
        self._snapshot = None

    def prefilled(self, prompt_tokens: int) -> None:
        self.inflight_prompt_tokens -= prompt_tokens
        self._snapshot = None

    def finished(self, decode_tokens: int) -> None:
        """An assigned request left (answered, failed or cancelled); its prompt tokens were released before."""
        self.decode_tokens -= decode_tokens
        self.outstanding -= 1
        self._snapshot = None

    def engine_reported(self, running: int | None, waiting: int | None, kv_usage: float) -> None:
        """The engine's own gauges from /metrics (running/waiting None: it does not export them)."""
        if running is not None:
            self.engine_running, self.engine_waiting = running, waiting
        self.kv_usage = kv_usage
        self._snapshot = None

    def observed(self, sample: BatchSample) -> None:
        self._batches.append(sample)
        self.recent_batches = tuple(self._batches)
        self._snapshot = None

    def snapshot(self) -> InstanceState:
        if self._snapshot is None:
            self._snapshot = self._build_snapshot()
        return self._snapshot

    def _build_snapshot(self) -> InstanceState:
        if self.engine_running is None:
            running, waiting = self.outstanding, 0
        else:  # requests sent since the last scrape are assumed waiting
            running = min(self.engine_running, self.outstanding)
            waiting = self.outstanding - running
        return InstanceState(
            id=self.id, role=self.role, healthy=self.healthy, num_running=running, num_waiting=waiting,
            inflight_prompt_tokens=self.inflight_prompt_tokens, decode_tokens=self.decode_tokens,
            kv_usage=self.kv_usage, kv_capacity_tokens=self.upstream.kv_capacity_tokens,
            max_num_seqs=self.upstream.max_num_seqs, recent_batches=self.recent_batches)

    def check_passed(self) -> None:
        self.failures = 0
        self._set_healthy(True)

    def check_failed(self, threshold: int) -> None:
        self.failures += 1
        if self.failures >= threshold:
            self._set_healthy(False)

    def connection_failed(self, threshold: int) -> None:
        """A dispatch could not connect: out of rotation now, back after its next passing health check."""
        self.failures = max(self.failures, threshold)
        self._set_healthy(False)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            self._snapshot = None
            if not healthy:  # out of rotation: what it serves fails over (or ends with a clean error) now
                for attempt in list(self.attempts):
                    attempt.engine_lost()
