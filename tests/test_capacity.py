"""omnisim-capacity: the highest load meeting the SLO at an attainment, by bracketing and bisection."""
from __future__ import annotations

import json

import pytest

from omnisim.capacity import find_capacity, main, run_attainment


def fake(capacity: float, calls: list):
    """A system whose attainment falls linearly past ``capacity`` requests per second."""
    def run(overrides):
        calls.append(overrides)
        knob, value = overrides[-1].split("=")
        v = float(value)
        attainment = 1.0 if v <= capacity else max(0.0, 1.0 - (v - capacity) / capacity)
        return {"completed": 100, "dropped": 0, "slo_attainment": attainment, "qpm": 60 * min(v, capacity),
                "offered_rate_per_s": v,
                "goodput_qpm": 0.0, "ttft_s": {"p90": 0.1}, "tpot_s": {"p90": 0.01}}
    return run


@pytest.mark.parametrize("start, capacity", [(1.0, 25.0), (100.0, 25.0), (25.0, 25.0), (3.0, 3.1)])
def test_brackets_then_bisects_to_the_tolerance(start, capacity):
    calls = []
    found = find_capacity(["x=1"], attainment=0.9, tolerance=0.02, start=start, max_runs=40,
                          run=fake(capacity, calls))
    # attainment >= 0.9 up to 1.1 x capacity: the answer is within 2% below that edge
    assert capacity * 1.1 / 1.02 <= found.rate <= capacity * 1.1 + 1e-9
    assert found.attainment >= 0.9 and found.qpm_at_sla == pytest.approx(60 * found.rate)  # the load offered
    assert len(found.runs) == len(calls) <= 20 and all(c[0] == "x=1" for c in calls)
    assert [r["meets"] for r in found.runs if r["workload.rate"] == found.rate] == [True]
    assert all(not r["meets"] for r in found.runs if r["workload.rate"] > found.rate)


def test_integer_knob_stops_at_one_client_apart():
    calls = []
    found = find_capacity([], knob="workload.concurrency", start=4, run=fake(37.0, calls), max_runs=40)
    assert found.rate == 40 and all(float(c[-1].split("=")[1]).is_integer() for c in calls)


def test_nothing_meets_and_run_budget():
    found = find_capacity([], start=8, run=fake(1e-6, []), max_runs=6)
    assert found.rate is None and len(found.runs) == 6
    found = find_capacity([], start=1, run=fake(1e6, []), max_runs=5)  # never fails within the budget
    assert found.rate == 16 and len(found.runs) == 5


def test_dropped_requests_count_as_missing_the_slo():
    assert run_attainment({"completed": 90, "dropped": 10, "slo_attainment": 1.0}) == pytest.approx(0.9)
    assert run_attainment({"completed": 0, "dropped": 0, "slo_attainment": None}) == 0.0


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="attainment"):
        find_capacity([], attainment=1.5, start=1, run=fake(1, []))
    with pytest.raises(ValueError, match="sets workload.rate itself"):
        find_capacity(["workload.rate=3"], start=1, run=fake(1, []))
    with pytest.raises(ValueError, match="--knob workload.nope"):
        find_capacity([], knob="workload.nope")


def test_the_command_on_the_simulator(capsys):
    # a small real search: the default 1P1D Llama-3-8B config, 60 requests a run
    code = main(["workload.max_requests=60", "--start", "4", "--tolerance", "0.25", "--max-runs", "8"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["knob"] == "workload.rate" and out["rate"] >= 4
    assert {"rate", "qpm_at_sla", "attainment", "runs"} <= set(out) and 2 <= len(out["runs"]) <= 8
    assert out["attainment"] >= 0.9 and out["qpm_at_sla"] > 0
    assert main(["nosuchgroup=1"]) == 2 and "omnisim-capacity: error" in capsys.readouterr().err
