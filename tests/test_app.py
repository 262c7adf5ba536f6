"""The omnisim Hydra app: every config option composes and instantiates, runs write complete result directories,
a seed fixes the records, multirun works, and bad input fails clearly with a non-zero exit."""
import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from omnisim.app import CONF_DIR, build_experiment, compose_node, config_options, instantiate_node, run_experiment
from omnisim.core import PROTOCOL_VERSION
from tests.config_keys import check_keys, composed, group_options

ROOT = Path(CONF_DIR).parent
TRACES = ROOT.parent / "shared" / "traces"


def cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def needs_traces(node) -> bool:
    return "shared/traces" in json.dumps(node)


def plain(value):
    """A value compared as yaml data: sequences and arrays as lists, paths as resolved paths."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return value.resolve()
    return value


def assert_built_from(obj, node: dict, where: str) -> None:
    """``obj`` is an instance of the node's _target_ (a partial of it for _partial_ nodes), and every argument it
    keeps under the argument's own name holds the yaml value (nested nodes: recursively). No attribute is a
    DictConfig or ListConfig: constructors receive plain values."""
    cls = get_class(node["_target_"])
    args = {k: v for k, v in node.items() if not k.startswith("_")}
    if node.get("_partial_"):
        assert isinstance(obj, functools.partial) and obj.func is cls, f"{where}: {obj!r} is not a partial of {cls}"
        assert obj.keywords == args, f"{where}: {obj.keywords} != {args}"
        return
    assert type(obj) is cls, f"{where}: {type(obj)} is not {cls}"
    for key, value in args.items():
        if not hasattr(obj, key):  # kept under another name (e.g. a backend's engine settings)
            continue
        held = getattr(obj, key)
        assert not OmegaConf.is_config(held), f"{where}.{key}: the constructor received a {type(held).__name__}"
        children = value if isinstance(value, list) else [value]
        if any(isinstance(c, dict) and "_target_" in c for c in children):
            held_children = held if isinstance(value, list) else [held]
            assert len(held_children) == len(children), f"{where}.{key}"
            for k, (h, c) in enumerate(zip(held_children, children)):
                assert_built_from(h, c, f"{where}.{key}" + (f"[{k}]" if isinstance(value, list) else ""))
        elif isinstance(held, Path) or (isinstance(value, str) and isinstance(held, str) and held != value):
            assert Path(held).resolve() in (Path(value).resolve(), (ROOT / value).resolve()), \
                f"{where}.{key}: {held} is not the path {value}"
        else:
            assert plain(held) == plain(value), f"{where}.{key}: {held!r} != yaml {value!r}"


@pytest.mark.parametrize("group,option", group_options(), ids=lambda x: x)
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    node = composed(group, option)
    if "/" not in group:  # a top-level group: the app's composition gives the same node
        assert OmegaConf.to_container(cfg(f"{group}={option}")[group]) == node
    if needs_traces(node) and not TRACES.exists():
        pytest.skip("../shared/traces is absent")
    root = OmegaConf.create({"seed": 5, "node": node})
    missing = OmegaConf.missing_keys(root)  # full keys: node.<key>
    if missing:  # an option that needs user input (e.g. a recorded load matrix) must say which key
        with pytest.raises(Exception, match=sorted(missing)[0].split(".")[-1]):
            instantiate_node(node, 5)
        np.save(tmp_path / "input.npy", np.ones((2, 8)))
        for key in missing:
            OmegaConf.update(root, key, str(tmp_path / "input.npy"))
    resolved = OmegaConf.to_container(root.node, resolve=True)
    assert_built_from(instantiate_node(resolved, 5), resolved, f"{group}/{option}")


@pytest.mark.parametrize("group,option", group_options(), ids=lambda x: x)
def test_every_option_names_exactly_its_constructor_arguments(group, option):
    check_keys(composed(group, option), f"{group}/{option}", group)


@pytest.mark.parametrize("group,option", group_options(), ids=lambda x: x)
def test_an_option_file_loaded_as_it_is_composes_as_the_app_composes_it(group, option):
    """omnisim-proxy and the load generator load conf/ files themselves; instantiate_node applies their defaults."""
    raw = OmegaConf.load(Path(CONF_DIR, group, f"{option}.yaml"))
    assert OmegaConf.to_container(OmegaConf.create(compose_node(raw))) == composed(group, option)


EXPERIMENTS = config_options("experiment")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_overlay_builds(experiment):
    if not TRACES.exists():
        pytest.skip("../shared/traces is absent")
    experiment_, backend = build_experiment(cfg(f"experiment={experiment}"))
    assert experiment_.cluster and experiment_.workload and backend


# Choices unlike every overlay's own: a synthetic workload, one with prefixes, a trace; PD, colocated, the R1 cluster.
OTHER_CHOICES = [("workload", "gamma"), ("workload", "poisson_prefix"), ("workload", "mooncake"), ("cluster", "1p1d"),
                 ("cluster", "colocated4"), ("cluster", "r1_7p1d")]


@pytest.mark.parametrize("group,option", OTHER_CHOICES, ids=lambda x: x)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_group_choice_on_the_command_line_replaces_the_overlays_option_cleanly(experiment, group, option):
    """experiment=X workload=Y (or cluster=Y) gives option Y exactly as it is alone, and it instantiates: the
    overlay sets its workload and cluster through options of those groups, so nothing of its own is merged into Y."""
    c = cfg(f"experiment={experiment}", f"{group}={option}")
    alone = composed(group, option)
    assert OmegaConf.to_container(c[group]) == alone
    if needs_traces(alone) and not TRACES.exists():
        pytest.skip("../shared/traces is absent")
    built = instantiate_node(OmegaConf.to_container(c[group]), int(c.seed))
    assert type(built) is get_class(alone["_target_"])
    if group == "workload":
        assert len(list(itertools.islice(built.requests(), 20))) == 20


@pytest.mark.skipif(not TRACES.exists(), reason="../shared/traces is absent")
def test_an_overlay_with_a_trace_workload_runs(tmp_path):
    """The command that failed with 'MooncakeTrace.__init__() got an unexpected keyword argument rate' when the
    overlay's rate and lengths were merged into whichever workload was chosen."""
    out = omnisim(tmp_path, "experiment=omniinfer_r1_7p1d", "workload=mooncake",
                  "workload.path=../shared/traces/mooncake_fast25/conversation_trace.jsonl",
                  "workload.max_requests=50")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["requests"] == 50 and summary["name"] == "omniinfer_r1_7p1d"


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
