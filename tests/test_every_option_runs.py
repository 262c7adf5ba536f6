"""Every option of every config group runs a short simulation to the end, not only instantiates: every request is
accounted for and some complete. An option is run on the first base setup it fits (a 671B model does not fit one
H100; a tiny CPU model cannot be split 8 ways), as a user would pick it."""
from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from omnisim.app import CONF_DIR, build_experiment, config_options
from omnisim.sim import Simulation

R1 = ["experiment=omniinfer_r1_7p1d"]
MOE = [*R1, "placement=omni_placement", "expert_load=zipf", "rebalance=omni"]
TINY = ["experiment=cpu_tiny_1p1d", "backend=sim"]
TINY_ROOFLINE = [*TINY, "cost=roofline"]  # the CPU cluster with another model: its step table is the tiny model's
BASES = {
    "placement": [MOE], "expert_load": [MOE], "rebalance": [MOE],
    "model": [[], R1, TINY, TINY_ROOFLINE], "hardware": [[], R1, TINY, TINY_ROOFLINE],
    "cluster": [[], R1, TINY, TINY_ROOFLINE], "cost": [[], TINY],
    "attention": [R1],  # OmniAttn's patterns are DeepSeek-R1's, on its PD cluster
    "serving": [TINY, []],  # measured on the tiny CPU model; they apply to any setup
}
GROUPS = ("model", "hardware", "cluster", "workload", "proxy", "placement", "expert_load", "rebalance", "attention",
          "engine_policy", "slo", "cost", "serving", "experiment")
CASES = [(g, o) for g in GROUPS for o in config_options(g)] + [("backend", "sim")]


def _run(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "workload.max_requests=12", "backend.progress=false"])
    experiment, _ = build_experiment(cfg)
    return Simulation(experiment).run().records


# Options that need a file the user gives: a recorded expert-load matrix of DeepSeek-R1's shape (58 x 256).
NEEDS_FILE = {("expert_load", "replay"): "expert_load.path"}


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_runs_a_short_simulation(group, option, tmp_path):
    extra = []
    if (group, option) in NEEDS_FILE:
        counts = np.random.default_rng(0).zipf(1.5, size=(2, 58, 256)).astype(np.float64)
        np.save(tmp_path / "load.npy", counts)
        extra = [f"{NEEDS_FILE[group, option]}={tmp_path / 'load.npy'}"]
    failures = []
    for base in BASES.get(group, [[]]):
        try:
            records = _run([*base, f"{group}={option}", *extra])
        except ValueError as e:  # this base does not fit the option (the message says why): try the next one
            failures.append(f"{base}: {e}")
            continue
        assert len(records) == 12 and records.request_id.is_unique
        assert (records.status == "ok").sum() >= 1, records.error.unique()
        assert records.loc[records.status == "ok", "finish_s"].notna().all()
        return
    pytest.fail(f"{group}={option} runs on no base setup:\n" + "\n".join(failures))
