"""conf/workload/*.yaml compose under Hydra and instantiate the right objects with the command-line names users use.
(That every option's keys are exactly its constructor's arguments: tests/test_app.py, with tests/config_keys.py.)"""
from __future__ import annotations

import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from omnisim.app import compose_option, config_options
from omnisim.workload import REPO_ROOT, AzureTrace, PoissonWorkload, Workload, summarize_workload

CONF = REPO_ROOT / "conf"
WORKLOADS = config_options("workload")
HAVE_TRACES = (REPO_ROOT / "../shared/traces").is_dir()


def needs_traces(name: str) -> bool:
    return "shared/traces" in str(compose_option("workload", name))


def instantiate(name: str, convert: str = "all", **overrides):
    """Like the app (omnisim/app.py), which instantiates each group, composed, with _convert_="all"."""
    cfg = OmegaConf.create({"seed": 7, "workload": compose_option("workload", name)})
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"workload.{key}", value)
    return hydra.utils.instantiate(cfg.workload, _convert_=convert)


def test_expected_options_exist():
    assert {"poisson", "gamma", "azure", "mooncake", "sharegpt"} <= set(WORKLOADS)
    assert {"azure_conversation"} <= set(config_options("workload/lengths"))


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_option_instantiates_and_yields_requests(name):
    if needs_traces(name) and not HAVE_TRACES:
        pytest.skip("public traces not found at ../shared/traces")
    workload = instantiate(name, max_requests=20)
    assert isinstance(workload, Workload)
    requests = list(workload.requests())
    assert len(requests) == 20
    assert requests == list(instantiate(name, max_requests=20).requests())


def test_synthetic_workloads_share_one_lengths_option():
    lengths = compose_option("workload/lengths", "azure_conversation")
    for name in ("poisson", "gamma", "poisson_prefix"):
        assert compose_option("workload", name)["lengths"] == lengths
    assert compose_option("workload", "cpu_tiny")["lengths"] == compose_option("workload/lengths", "tiny_uniform")
    r1 = compose_option("workload", "omniinfer_r1")["lengths"]  # the base option's lengths, three fields changed
    assert r1["prompt"] == {**lengths["prompt"], "mean": 3500, "cv": 0.8, "high": 16384}
    assert r1["output"] == {**lengths["output"], "mean": 1200, "cv": 1.0, "high": 32768}


def test_default_poisson_is_small_and_azure_shaped():
    workload = instantiate("poisson")
    assert isinstance(workload, PoissonWorkload)
    summary = summarize_workload(workload)
    assert summary["count"] == 500
    assert summary["mean_rate_per_s"] == pytest.approx(4.0, rel=0.15)
    assert summary["prompt_mean"] == pytest.approx(1155, rel=0.15)
    assert summary["output_mean"] == pytest.approx(211, rel=0.15)


def test_seed_interpolation_changes_the_sequence():
    cfg = OmegaConf.create({"seed": 1, "workload": compose_option("workload", "poisson")})
    first = list(hydra.utils.instantiate(cfg.workload).requests())
    cfg.seed = 2
    assert list(hydra.utils.instantiate(cfg.workload).requests()) != first


@pytest.mark.parametrize("convert", ["all", "none"])  # "none": the constructor receives a ListConfig
def test_rate_steps_from_yaml_list(convert):
    workload = instantiate("gamma", convert, rate_steps=[[0, 1.0], [10, 0.0], [20, 1.0]], max_requests=200)
    times = [r.arrival_s for r in workload.requests()]
    assert len(times) == 200 and not any(10.0 <= t < 20.0 for t in times)


@pytest.mark.skipif(not HAVE_TRACES, reason="public traces not found at ../shared/traces")
def test_command_line_overrides_compose():
    overrides = ["+seed=3", "+workload=azure", "workload.rate_scale=2.0", "workload.max_requests=50",
                 "workload.duration_s=30"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=overrides)
    workload = hydra.utils.instantiate(cfg.workload)
    assert isinstance(workload, AzureTrace)
    requests = list(workload.requests())
    assert 0 < len(requests) <= 50 and requests[-1].arrival_s < 30.0
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(Exception, match="no_such_key"):
            compose(overrides=["+seed=3", "+workload=azure", "workload.no_such_key=1"])


def test_missing_trace_names_the_config_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Hydra wraps constructor errors; the message and the original exception still reach the user.
    with pytest.raises(hydra.errors.InstantiationException, match=r"workload\.path.*missing\.csv") as error:
        instantiate("azure", path="missing.csv")
    assert isinstance(error.value.__cause__, FileNotFoundError)
