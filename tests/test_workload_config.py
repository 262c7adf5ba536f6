"""conf/workload/*.yaml compose under Hydra and instantiate the right objects with the command-line names users use."""
from __future__ import annotations

import inspect
import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from omnisim.workload import REPO_ROOT, AzureTrace, PoissonWorkload, Workload, summarize_workload

CONF = REPO_ROOT / "conf"
WORKLOAD_FILES = sorted((CONF / "workload").glob("*.yaml"))
NEEDS_TRACES = {"azure", "mooncake", "sharegpt"}
HAVE_TRACES = (REPO_ROOT / "../shared/traces").is_dir()


def instantiate(name: str, convert: str = "all", **overrides):
    """Like the app (omnisim/app.py), which instantiates each group with _convert_="all"."""
    cfg = OmegaConf.create({"seed": 7, "workload": OmegaConf.load(CONF / "workload" / f"{name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"workload.{key}", value)
    return hydra.utils.instantiate(cfg.workload, _convert_=convert)


def assert_keys_match_constructor(node: dict, where: str) -> None:
    target = hydra.utils.get_class(node["_target_"])
    parameters = set(inspect.signature(target).parameters)
    assert set(node) - {"_target_"} == parameters, f"{where}: keys differ from {target.__name__}'s arguments"
    for key, value in node.items():
        if isinstance(value, dict) and "_target_" in value:
            assert_keys_match_constructor(value, f"{where}.{key}")


def test_expected_options_exist():
    names = {path.stem for path in WORKLOAD_FILES}
    assert {"poisson", "gamma", "azure", "mooncake", "sharegpt"} <= names


@pytest.mark.parametrize("path", WORKLOAD_FILES, ids=lambda p: p.stem)
def test_config_keys_are_the_constructor_arguments(path):
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert_keys_match_constructor(node, path.name)
    assert node["seed"] == "${seed}"


@pytest.mark.parametrize("path", WORKLOAD_FILES, ids=lambda p: p.stem)
def test_every_option_instantiates_and_yields_requests(path):
    if path.stem in NEEDS_TRACES and not HAVE_TRACES:
        pytest.skip("public traces not found at ../shared/traces")
    workload = instantiate(path.stem, max_requests=20)
    assert isinstance(workload, Workload)
    requests = list(workload.requests())
    assert len(requests) == 20
    assert requests == list(instantiate(path.stem, max_requests=20).requests())


def test_default_poisson_is_small_and_azure_shaped():
    workload = instantiate("poisson")
    assert isinstance(workload, PoissonWorkload)
    summary = summarize_workload(workload)
    assert summary["count"] == 500
    assert summary["mean_rate_per_s"] == pytest.approx(4.0, rel=0.15)
    assert summary["prompt_mean"] == pytest.approx(1155, rel=0.15)
    assert summary["output_mean"] == pytest.approx(211, rel=0.15)


def test_seed_interpolation_changes_the_sequence():
    cfg = OmegaConf.create({"seed": 1, "workload": OmegaConf.load(CONF / "workload" / "poisson.yaml")})
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
