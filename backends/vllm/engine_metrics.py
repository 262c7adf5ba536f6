"""vLLM's own Prometheus counters, scraped from an engine's /metrics, and the KV a decode instance got from prefill.

vLLM (v1) counts prompt tokens by where their KV came from: ``vllm:prompt_tokens_by_source_total{source=
"local_compute" | "local_cache_hit" | "external_kv_transfer"}``; older versions only have the connector's
``vllm:external_prefix_cache_hits_total``. Counters are cumulative since the server started: compare two scrapes.
"""
from __future__ import annotations

import urllib.request
from dataclasses import dataclass, fields

from prometheus_client.parser import text_string_to_metric_families

# field -> (sample name, required labels)
_SAMPLES = {
    "prompt_tokens": ("vllm:prompt_tokens_total", {}),
    "generation_tokens": ("vllm:generation_tokens_total", {}),
    "prompt_tokens_local_compute": ("vllm:prompt_tokens_by_source_total", {"source": "local_compute"}),
    "prompt_tokens_local_cache_hit": ("vllm:prompt_tokens_by_source_total", {"source": "local_cache_hit"}),
    "prompt_tokens_external": ("vllm:prompt_tokens_by_source_total", {"source": "external_kv_transfer"}),
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", {}),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", {}),
    "external_prefix_cache_queries": ("vllm:external_prefix_cache_queries_total", {}),
    "external_prefix_cache_hits": ("vllm:external_prefix_cache_hits_total", {}),
    "requests_finished": ("vllm:request_success_total", {}),
}


@dataclass(frozen=True)
class EngineCounters:
    """Sums over an engine's label sets (engine index, model name, finish reason); None where the engine does not
    export the counter."""

    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    prompt_tokens_local_compute: float | None = None
    prompt_tokens_local_cache_hit: float | None = None
    prompt_tokens_external: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    external_prefix_cache_queries: float | None = None
    external_prefix_cache_hits: float | None = None
    requests_finished: float | None = None

    @property
    def external_kv_tokens(self) -> float:
        """Prompt tokens whose KV arrived through the KV connector (from a prefill instance)."""
        if self.prompt_tokens_external is not None:
            return self.prompt_tokens_external
        return self.external_prefix_cache_hits or 0.0

    def minus(self, before: "EngineCounters") -> "EngineCounters":
        """The counts between two scrapes of the same engine."""
        values = {}
        for f in fields(self):
            now, then = getattr(self, f.name), getattr(before, f.name)
            values[f.name] = None if now is None else now - (then or 0.0)
        return EngineCounters(**values)

    def as_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_counters(text: str) -> EngineCounters:
    """Counters from a Prometheus text exposition (vLLM's /metrics body)."""
    totals: dict[str, float] = {}
    wanted = {}
    for field_name, (sample, labels) in _SAMPLES.items():
        wanted.setdefault(sample, []).append((field_name, labels))
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:
        raise ValueError(f"engine /metrics: not a Prometheus text exposition ({e})") from None
    for family in families:
        for s in family.samples:
            for field_name, labels in wanted.get(s.name, ()):
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    totals[field_name] = totals.get(field_name, 0.0) + s.value
    return EngineCounters(**totals)


def scrape_counters(url: str, timeout_s: float = 5.0) -> EngineCounters:
    """GET ``url``/metrics and parse it."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as r:
        return parse_counters(r.read().decode("utf-8", errors="replace"))
