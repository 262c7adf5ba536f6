"""The `omnisim` command as a user meets it: a user error is one line naming the field and exit status 2 (no
traceback), runs never share a directory, and a failed run never leaves an earlier run's summary behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from omnisim.app import CONF_DIR, build_experiment

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["workload.max_requests=5", "backend.progress=false"]


def omnisim(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnisim.app", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})})


@pytest.mark.parametrize("override,message", [
    ("workload.rate=fast", "workload.rate: expected a number, got str 'fast'"),
    ("workload.max_requests=2.5", "workload.max_requests: expected a whole number"),
    ("cluster.decode.tp=3", "cluster.decode.tp=3 does not divide the 32 attention heads"),
    ("workload.max_requests=0", "the workload produced no requests"),
    ("backend.timer_s=1e-12", "backend.timer_s must be 0 (no timer) or between 1e-4 and 60 s"),
    ("+workload.ratee=3", "workload.ratee: not a setting of omnisim.workload.PoissonWorkload"),
    ("+cost.moe_dispatchh=auto", "cost.moe_dispatchh: not a setting of omnisim.cost.RooflineModel (it takes "),
])
def test_a_user_error_is_one_line_and_exit_2(tmp_path, override, message):
    out = omnisim(override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("omnisim: error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_failed_run_removes_the_stale_summary_of_its_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"requests": 500}))
    out = omnisim("workload.rate=-1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 2 and "workload.rate" in out.stderr
    assert not (run / "summary.json").exists()


def test_runs_started_together_get_their_own_directories(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "omnisim.app", *SMALL, f"seed={i}"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    summaries = sorted(tmp_path.glob("outputs/*/*/summary.json"))
    assert len(summaries) == 2, summaries
    overrides = [(s.parent / ".hydra" / "overrides.yaml").read_text() for s in summaries]
    assert sorted("seed=1" in o for o in overrides) == [False, True]  # each run's own config beside its results


def test_tp_must_split_the_heads():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ok = compose("config", overrides=["cluster.decode.tp=8"])
        bad = compose("config", overrides=["model=llama2_70b", "cluster.prefill.tp=128"])
    build_experiment(ok)
    with pytest.raises(ValueError, match="cluster.prefill.tp=128 does not divide the 64 attention heads"):
        build_experiment(bad)
