"""The proxy's Prometheus metrics, in a registry of its own (several proxies can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0)


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("omnisim_proxy_requests", "Client requests answered, by endpoint and HTTP status",
                                ("endpoint", "status"), registry=r)
        self.errors = Counter("omnisim_proxy_errors", "Errors, by kind", ("kind",), registry=r)
        self.retries = Counter("omnisim_proxy_retries", "Requests retried on another instance", registry=r)
        self.dispatches = Counter("omnisim_proxy_dispatches", "Requests sent to an instance, by phase",
                                  ("instance", "phase"), registry=r)
        self.queue_length = Gauge("omnisim_proxy_queue_length", "Requests held in the proxy's queue", ("phase",),
                                  registry=r)
        self.inflight = Gauge("omnisim_proxy_inflight_requests", "Client requests being served", registry=r)
        self.outstanding = Gauge("omnisim_proxy_upstream_outstanding", "Requests in flight at an instance",
                                 ("instance",), registry=r)
        self.healthy = Gauge("omnisim_proxy_upstream_healthy", "1 if the instance is in rotation", ("instance",),
                             registry=r)
        self.ttft = Histogram("omnisim_proxy_ttft_seconds", "Time from request receipt to first byte of answer",
                              buckets=_BUCKETS, registry=r)
        self.e2e = Histogram("omnisim_proxy_e2e_seconds", "Time from request receipt to end of answer",
                             buckets=_BUCKETS, registry=r)
        self._dispatch_children: dict[tuple[str, str], object] = {}
        self._request_children: dict[tuple[str, int], object] = {}

    def dispatched(self, instance: str, phase: str) -> None:
        child = self._dispatch_children.get((instance, phase))
        if child is None:
            child = self._dispatch_children[(instance, phase)] = self.dispatches.labels(instance, phase)
        child.inc()

    def answered(self, endpoint: str, status: int) -> None:
        child = self._request_children.get((endpoint, status))
        if child is None:
            child = self._request_children[(endpoint, status)] = self.requests.labels(endpoint, str(status))
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
