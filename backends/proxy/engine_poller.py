"""The proxy's background watch on its engines: a /health check and a /metrics scrape of each, on their intervals,
into its UpstreamState."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import aiohttp

from backends.proxy.upstream_state import UpstreamState

log = logging.getLogger(__name__)

_ENGINE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def engine_gauges(text: str) -> tuple[dict[str, float], set[str]]:
    """The three gauges the proxy reads from an engine's /metrics, summed over label sets. Only their sample lines
    are parsed (``name{labels} value``): a full exposition parse of vLLM's histograms costs far more."""
    values = dict.fromkeys(_ENGINE_GAUGES, 0.0)
    seen = set()
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            try:
                values[name] += float(line.rsplit("}", 1)[-1].split()[0])
            except (ValueError, IndexError):
                continue
            seen.add(name)
    return values, seen


class EnginePoller:
    """``health_failures`` consecutive failed checks take an engine out of rotation, one passing check brings it
    back (and calls ``on_back``: held requests may go there now). ``metrics_interval_s`` 0: never scraped."""

    def __init__(self, session: aiohttp.ClientSession, upstreams: dict[str, UpstreamState], health_interval_s: float,
                 health_timeout_s: float, health_failures: int, metrics_interval_s: float,
                 on_back: Callable[[], None]) -> None:
        self.session = session
        self.upstreams = upstreams
        self.health_interval_s = health_interval_s
        self.health_timeout = aiohttp.ClientTimeout(total=health_timeout_s)
        self.health_failures = health_failures
        self.metrics_interval_s = metrics_interval_s
        self.metrics_timeout = aiohttp.ClientTimeout(total=max(1.0, metrics_interval_s))
        self.on_back = on_back

    def start(self) -> list[asyncio.Task]:
        """The polling tasks (cancel them to stop)."""
        tasks = self._each(self.health_interval_s, self.check_health)
        if self.metrics_interval_s > 0:
            tasks += self._each(self.metrics_interval_s, self.scrape_metrics)
        return tasks

    def _each(self, interval_s: float, poll: Callable[[UpstreamState], Awaitable[None]]) -> list[asyncio.Task]:
        """``await poll(up)`` every ``interval_s`` for each upstream, their phases spread evenly over the interval:
        N engines' answers never arrive in one burst (one /metrics answer of the emulator takes 0.7 ms to render;
        four at once stalled a shared engine host and the proxy's loop for about 3 ms, every second)."""
        ups = list(self.upstreams.values())
        return [asyncio.create_task(self._every(interval_s, k * interval_s / len(ups), poll, up))
                for k, up in enumerate(ups)]

    @staticmethod
    async def _every(interval_s: float, offset_s: float, poll, up: UpstreamState) -> None:
        await asyncio.sleep(offset_s)
        while True:
            await poll(up)
            await asyncio.sleep(interval_s)

    async def check_health(self, up: UpstreamState) -> None:
        try:
            async with self.session.get(up.endpoint("/health"), timeout=self.health_timeout) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        was = up.healthy
        up.check_passed() if ok else up.check_failed(self.health_failures)
        if up.healthy != was:
            log.warning("upstream %s is %s", up.id, "back in rotation" if up.healthy else "out of rotation")
            if up.healthy:
                self.on_back()

    async def scrape_metrics(self, up: UpstreamState) -> None:
        try:
            async with self.session.get(up.endpoint("/metrics"), timeout=self.metrics_timeout) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return
        values, seen = engine_gauges(text)
        running = "vllm:num_requests_running" in seen
        up.engine_reported(int(values["vllm:num_requests_running"]) if running else None,
                           int(values["vllm:num_requests_waiting"]) if running else None,
                           values["vllm:kv_cache_usage_perc"])
