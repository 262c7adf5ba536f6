"""The Grafana dashboard (omnisim_dashboard.json) over omnisim-proxy's and the vLLM engines' /metrics, and the check
that every metric and label its panels query exists in a live scrape."""
from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).with_name("omnisim_dashboard.json")
# Labels Prometheus itself adds to every scraped series (not in an engine's or the proxy's own exposition).
TARGET_LABELS = {"instance", "job"}
_METRIC = re.compile(r"\b(omnisim_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")


def panel_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target."""
    dash = json.loads(Path(path).read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def missing(scrape: str, queries: list[tuple[str, str]], prefix: str) -> list[str]:
    """What the ``prefix`` (``omnisim_`` or ``vllm:``) queries need that the Prometheus text ``scrape`` lacks:
    a metric with no sample, or a grouping label none of the query's metrics carries."""
    samples: dict[str, set[str]] = {}
    for line in scrape.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, rest = line.partition("{")
        name = name.split()[0]
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"", rest)) if rest else set()
        samples.setdefault(name, set()).update(labels)
    problems = []
    for title, expr in queries:
        names = [m for m in _METRIC.findall(expr) if m.startswith(prefix)]
        if not names:
            continue
        for name in names:
            if name not in samples:
                problems.append(f"{title}: no samples of {name}")
        carried = set().union(*(samples.get(n, set()) for n in names))
        for group in _BY.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                if label and label not in TARGET_LABELS and label not in carried:
                    problems.append(f"{title}: no {name} sample carries the label {label!r}")
    return problems
