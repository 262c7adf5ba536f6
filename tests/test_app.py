"""The omnisim Hydra app: every config option composes and instantiates, runs write complete result directories,
a seed fixes the records, multirun works, and bad input fails clearly with a non-zero exit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from omnisim.app import CONF_DIR, build_experiment, run_experiment
from omnisim.core import PROTOCOL_VERSION

ROOT = Path(CONF_DIR).parent
TRACES = ROOT.parent / "shared" / "traces"
SKIP_GROUPS = {"experiment"}  # overlays are tested below, with the groups they override


def options():
    for group in sorted(p for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name not in SKIP_GROUPS):
        for option in sorted(group.glob("*.yaml")):
            yield group.name, option.stem


def cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group,option", list(options()), ids=lambda x: x)
def test_every_option_composes_and_instantiates(group, option):
    c = cfg(f"{group}={option}")
    if group == "workload" and option in ("azure", "mooncake", "sharegpt") and not TRACES.exists():
        pytest.skip("../shared/traces is absent")
    missing = OmegaConf.missing_keys(c[group])
    if missing:  # an option that needs user input (e.g. a recorded load matrix) must say which key
        with pytest.raises(Exception, match=sorted(missing)[0].split(".")[-1]):
            instantiate(c[group], _convert_="all")
        return
    obj = instantiate(c[group], _convert_="all")
    assert obj is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_overlay_builds(experiment):
    if not TRACES.exists():
        pytest.skip("../shared/traces is absent")
    experiment_, backend = build_experiment(cfg(f"experiment={experiment}"))
    assert experiment_.cluster and experiment_.workload and backend


def test_run_writes_a_complete_directory_and_the_seed_fixes_it(tmp_path):
    def go(seed, where):
        return run_experiment(cfg(f"seed={seed}", "workload.max_requests=60", "cluster=2p1d", "proxy=least_load"),
                              tmp_path / where)

    summary = go(1, "a")
    go(1, "b")
    go(2, "c")
    for key in ("requests", "completed", "dropped", "duration_s", "ttft_s", "tpot_s", "e2e_s", "qpm",
                "output_tokens_per_s", "slo", "slo_attainment", "goodput_qpm", "prefix_hit_rate"):
        assert key in summary
    assert set(summary["ttft_s"]) >= {"mean", "p50", "p90", "p99"}
    assert summary["requests"] == summary["completed"] == 60
    on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["protocol_version"] == on_disk["protocol_version"] == PROTOCOL_VERSION
    assert on_disk["completed"] == 60 and sorted((tmp_path / "a" / "plots").glob("*.png"))
    a, b, c = (pd.read_parquet(tmp_path / d / "requests.parquet") for d in "abc")
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def omnisim(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([sys.executable, "-m", "omnisim.app", *flags, f"hydra.run.dir={tmp_path}/run",
                           f"hydra.sweep.dir={tmp_path}/sweep", *overrides], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_command_line_run_prints_the_summary(tmp_path):
    out = omnisim(tmp_path, "workload.max_requests=30")
    assert out.returncode == 0, out.stderr
    assert "TTFT" in out.stdout and "goodput" in out.stdout
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] == 30 and summary["protocol_version"] == PROTOCOL_VERSION


def test_multirun_with_the_joblib_launcher(tmp_path):
    out = omnisim(tmp_path, "-m", "seed=0,1", "workload.max_requests=20")
    assert out.returncode == 0, out.stderr
    for job in ("0", "1"):
        assert json.loads((tmp_path / "sweep" / job / "summary.json").read_text())["seed"] == int(job)


@pytest.mark.parametrize("args,words", [
    (["bogus_key=1"], ["bogus_key"]),
    (["workload.bogus=1"], ["bogus"]),
    (["proxy=no_such_policy"], ["no_such_policy"]),
    (["workload.rate=-1"], ["rate"]),
    (["model=deepseek_r1", "hardware=ascend_910c", "cluster=r1_7p1d", "cluster.decode.ep=3", "cluster.decode.dp=3"],
     ["ep=3", "experts"]),
    (["cluster.decode.kv_capacity_tokens=1000"], ["max_model_len"]),
    (["workload=azure", "workload.path=/no/such/trace.csv"], ["/no/such/trace.csv"]),
])
def test_bad_input_fails_clearly_and_leaves_no_complete_looking_result(tmp_path, args, words):
    out = omnisim(tmp_path, "workload.max_requests=20", *args) if "workload=azure" not in args else \
        omnisim(tmp_path, *args)
    assert out.returncode != 0
    for w in words:
        assert w in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_malformed_trace_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,5\n"
                   "2023-11-16 18:17:04.0000000,ten,5\n")
    out = omnisim(tmp_path, "workload=azure", f"workload.path={bad}")
    assert out.returncode != 0
    assert f"{bad}:3" in out.stderr and "ContextTokens" in out.stderr, out.stderr[-2000:]
