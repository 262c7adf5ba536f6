"""backend.trace=true: a Perfetto / Chrome trace of a simulated run, consistent with the run's own figures, and
bounded."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from omnisim.app import CONF_DIR, run_experiment
from omnisim.sim import SimBackend


def traced(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["backend.trace=true", "backend.progress=false", *overrides])
    summary = run_experiment(cfg, tmp_path)
    trace = json.loads((tmp_path / "trace.json").read_text())
    return summary, trace, pd.read_parquet(tmp_path / "instances.parquet")


def test_the_trace_holds_every_step_kv_transfer_and_rebalance(tmp_path):
    summary, trace, instances = traced(tmp_path, "experiment=omniinfer_r1_7p1d", "workload.max_requests=60",
                                       "placement=omni_placement", "expert_load=zipf", "rebalance=omni")
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names.pop(0) == "proxy" and sorted(names.values()) == sorted(instances.instance_id)
    steps = [e for e in events if e["ph"] == "X" and e["tid"] == 1 and e["pid"] > 0]
    busy = {names[p]: sum(e["dur"] for e in steps if e["pid"] == p) / 1e6 for p in names}
    for row in instances.itertuples():  # the slices are the engine's busy time, step by step
        assert busy[row.instance_id] == pytest.approx(row.busy_s, rel=1e-9, abs=1e-9)
    assert sum(e["args"]["steps"] for e in steps) == instances.steps.sum()
    kv = [e for e in events if e["name"].startswith("kv ")]
    assert len(kv) == summary["completed"] and all(names[e["pid"]] == "decode-0" for e in kv)
    assert any(e["ph"] == "i" and e["name"].startswith("rebalance") for e in events)
    assert trace["otherData"]["events_dropped"] == 0


def test_proxy_holds_appear_when_a_policy_holds(tmp_path):
    # OmniProxy holds prompts while an instance has 32,000 prompt tokens in flight: 200 req/s on one H100 prefill
    _, trace, _ = traced(tmp_path, "workload.max_requests=300", "workload.rate=200", "proxy=omni_proxy")
    held = [e for e in trace["traceEvents"] if e["pid"] == 0 and e["ph"] == "X"]
    assert held and all(e["dur"] > 0 and e["name"].startswith("held ") for e in held)


def test_the_trace_is_bounded_by_its_window_and_event_budget(tmp_path):
    _, trace, _ = traced(tmp_path / "w", "workload.max_requests=200", "backend.trace_window_s=[10,20]")
    timed = [e for e in trace["traceEvents"] if e["ph"] in ("X", "i")]
    assert timed and all(10e6 <= e["ts"] < 20e6 for e in timed)
    _, trace, _ = traced(tmp_path / "m", "workload.max_requests=200", "backend.trace_max_events=50")
    assert len([e for e in trace["traceEvents"] if e["ph"] != "M"]) == 50
    assert trace["otherData"]["events_dropped"] > 0


def test_bad_trace_settings_name_the_field():
    with pytest.raises(ValueError, match="backend.trace_window_s"):
        SimBackend(trace=True, trace_window_s=[5.0, 1.0])
    with pytest.raises(ValueError, match="backend.trace_max_events"):
        SimBackend(trace=True, trace_max_events=0)
