"""omnisim.results.load: a multirun's runs as one tidy DataFrame, and their requests on demand."""
from __future__ import annotations

import subprocess
import sys

import pytest

from omnisim import results


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    subprocess.run([sys.executable, "-m", "omnisim.app", "-m", "proxy=round_robin,least_load", "workload.rate=4,8",
                    "workload.max_requests=20", "backend.progress=false", f"hydra.sweep.dir={root}",
                    "hydra/launcher=basic"], check=True, capture_output=True, timeout=300)
    return root


def test_one_row_per_run_with_choices_overrides_and_the_summary(sweep):
    runs = results.load(sweep)
    assert len(runs) == 4 and runs["complete"].all()
    assert sorted(set(runs["choice.proxy"])) == ["least_load", "round_robin"]
    assert sorted(runs["workload.rate"]) == [4, 4, 8, 8]  # overrides parsed, by key
    assert (runs["requests"] == 20).all() and runs["ttft_s.p90"].gt(0).all() and "qpm" in runs
    assert runs.groupby("choice.proxy").size().to_dict() == {"least_load": 2, "round_robin": 2}


def test_records_on_demand(sweep):
    requests = results.load(sweep, records=True)
    assert len(requests) == 80 and requests.groupby("run_dir").size().eq(20).all()
    assert {"choice.proxy", "workload.rate", "request_id", "arrival_s", "status"} <= set(requests.columns)


def test_a_failed_run_is_kept_as_incomplete_and_lists_of_runs_work(sweep, tmp_path):
    dirs = sorted(p.parent for p in sweep.rglob(".hydra"))
    broken = tmp_path / "broken"
    (broken / ".hydra").mkdir(parents=True)
    runs = results.load([*dirs[:2], broken])
    assert list(runs["complete"]) == [True, True, False]
    with pytest.raises(ValueError, match="no run directories"):
        results.load(tmp_path / "broken" / ".hydra")
    with pytest.raises(ValueError, match="is not a directory"):
        results.load(tmp_path / "nope")
