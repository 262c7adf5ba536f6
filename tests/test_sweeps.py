"""Sweeps past one machine and studies: a multirun through a real local Ray head, the Slurm launcher config composed
(not run: no Slurm here), Optuna studies (sqlite in the sweep directory, resumed), and the app's pieces they rely on
(the devices key, tuple objectives, a failed sweep point, relative sweep dirs off the driver's directory)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from omnisim import results
from omnisim.app import CONF_DIR, check_job_dir, objective_value
from omnisim.capacity import simulate
from omnisim.sweeps import LocalRayHead

# conf/hydra/launcher/ray.yaml shadows the plugin's node on purpose (omnisim.app filters the warning; pytest resets it)
pytestmark = pytest.mark.filterwarnings("ignore:.*'hydra/launcher/ray' is validated against ConfigStore schema")
TINY = ["workload.max_requests=30", "backend.progress=false", "plots=false"]


def omnisim(*args: str, cwd: Path, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnisim.app", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


# --- Ray -------------------------------------------------------------------------------------------------------

def test_a_multirun_on_a_local_ray_head_writes_every_job_into_the_sweep_dir(tmp_path):
    driver = tmp_path / "driver"  # the driver runs elsewhere than the head: outputs must still land in the sweep dir
    driver.mkdir()
    sweep = tmp_path / "sweep"
    with LocalRayHead(num_cpus=2) as head:
        assert head.alive()
        proc = omnisim("-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={head.address}",
                       f"hydra.sweep.dir={sweep}", "seed=0,1,2", *TINY, cwd=driver, env=head.env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert head.pgid and not head.alive(), f"processes of the Ray head's group {head.pgid} outlived it"
    out = proc.stdout + proc.stderr
    assert "Ray Launcher is launching 3 jobs" in out
    assert f"Connecting to existing Ray cluster at address: {head.address}" in out  # ours, not a new local one
    assert "(_run_job pid=" in out  # the jobs' output comes back from Ray workers

    runs = results.load(sweep)
    assert len(runs) == 3 and runs.complete.all()
    assert sorted(runs.seed) == [0, 1, 2] and (runs["workload.max_requests"] == 30).all()
    assert (runs.requests == 30).all() and (runs.completed == 30).all()
    assert all(Path(d).parent == sweep for d in runs.run_dir)
    for d in runs.run_dir:
        assert {"summary.json", "requests.parquet", "instances.parquet"} <= {p.name for p in Path(d).iterdir()}
    # the Ray worker ran the very simulation this process runs
    here = simulate(["seed=1", "workload.max_requests=30"])
    there = runs.set_index("seed").loc[1]
    assert there["completed"] == here["completed"]
    assert there["ttft_s.p90"] == pytest.approx(here["ttft_s"]["p90"], rel=1e-12)
    assert there["tpot_s.mean"] == pytest.approx(here["tpot_s"]["mean"], rel=1e-12)


def test_ray_launcher_config_connects_to_a_given_address_and_joblib_stays_the_default():
    cfg = hydra_config("hydra/launcher=ray", "hydra.launcher.ray.init.address=10.0.0.1:6379")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launcher.ray.init.address == "10.0.0.1:6379"
    # set to null: the plugin's 75 MB default is refused by ray.init when it connects to an existing cluster
    assert "object_store_memory" in launcher.ray.init and launcher.ray.init.object_store_memory is None
    assert launcher.ray.remote.num_cpus == 1
    assert hydra_config().hydra.launcher._target_.endswith("JoblibLauncher")
    # the sweep directory is absolute, so that jobs running in another directory write under the driver's
    assert Path(hydra_config().hydra.sweep.dir).is_absolute()


# --- Slurm (composed, not run) ------------------------------------------------------------------------------------

def test_slurm_launcher_composes_and_instantiates():
    cfg = hydra_config("hydra/launcher=slurm", "hydra.launcher.partition=cpu", "hydra.sweep.dir=/shared/sweep")
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = launcher.params
    assert params["partition"] == "cpu" and params["cpus_per_task"] == 1 and params["mem_gb"] == 4
    assert params["timeout_min"] == 60 and params["nodes"] == 1 and params["tasks_per_node"] == 1
    assert params["submitit_folder"] == "/shared/sweep/.submitit/%j"  # submitit's pickles on the shared storage
    with pytest.raises(Exception, match="hydra.launcher.partion"):  # the plugin's schema rejects a misspelt key
        hydra_config("hydra/launcher=slurm", "hydra.launcher.partion=cpu")


# --- Optuna ---------------------------------------------------------------------------------------------------------

def trials_by_params(storage: str, name: str) -> tuple:
    """The study and its trials by their parameters (a run directory's overrides)."""
    study = optuna.load_study(study_name=name, storage=storage)
    return study, {tuple(sorted(t.params.items())): t for t in study.trials}


def run_params(run, keys) -> tuple:
    return tuple(sorted((k, run[k]) for k in keys))


def test_fewest_devices_study_returns_devices_and_attainment_per_trial(tmp_path):
    sweep = tmp_path / "study"
    proc = omnisim("-m", "+sweep=fewest_devices", "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}",
                   "workload.max_requests=40", "backend.progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (sweep / "optuna.db").is_file()
    study, trials = trials_by_params(f"sqlite:///{sweep}/optuna.db", "fewest_devices")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert len(study.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        p = t.params
        assert p["cluster.prefill.tp"] in (8, 16) and p["cluster.decode.dp"] in (8, 16, 32, 64)
        assert 1 <= p["cluster.prefill.count"] <= 8 and 1 <= p["cluster.decode.count"] <= 2
        devices = p["cluster.prefill.count"] * p["cluster.prefill.tp"] + p["cluster.decode.count"] * p["cluster.decode.dp"]
        assert t.values[0] == devices and 0.0 <= t.values[1] <= 1.0

    runs = results.load(sweep)  # one run directory per trial, its summary the trial's values
    assert len(runs) == 4 and runs.complete.all()
    keys = list(study.trials[0].params)
    for _, run in runs.iterrows():
        trial = trials[run_params(run, keys)]
        assert run["devices"] == trial.values[0] and run["slo_attainment"] == pytest.approx(trial.values[1])
        assert run["cluster.prefill.count"] * run["cluster.prefill.tp"] <= run["devices"]
        assert not (Path(run.run_dir) / "plots").exists()  # the study's runs skip drawing
    front = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    assert front["solutions"] and all(len(s["values"]) == 2 for s in front["solutions"])


def test_policy_knob_study_is_stored_in_the_sweep_dir_and_resumes(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["+sweep=omni_proxy_knobs", "hydra.sweeper.n_trials=2", "workload.max_requests=60",
            "backend.progress=false"]
    proc = omnisim("-m", *args, f"hydra.sweep.dir={first}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    storage = f"sqlite:///{first}/optuna.db"
    # resumed: a new sweep directory for the new runs, the same study (fixed study_name) in the first one's file
    proc = omnisim("-m", *args, f"hydra.sweep.dir={second}", f"hydra.sweeper.storage={storage}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (second / "optuna.db").exists()

    study, trials = trials_by_params(storage, "omni_proxy_knobs")
    assert [d.name for d in study.directions] == ["MAXIMIZE"]
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    runs = results.load([first, second])
    assert len(runs) == 4 and runs.complete.all() and (runs["choice.proxy"] == "omni_proxy").all()
    keys = ["proxy.prefill_max_inflight_tokens", "proxy.prefill_max_running", "proxy.prompt_weight"]
    for _, run in runs.iterrows():
        assert 4000 <= run[keys[0]] <= 128000 and 1 <= run[keys[1]] <= 64 and 0.0 <= run[keys[2]] <= 1.0
        assert trials[run_params(run, keys)].value == pytest.approx(run["goodput_qpm"])
    assert study.best_value == pytest.approx(runs["goodput_qpm"].max())


# --- the app's side -----------------------------------------------------------------------------------------------

def test_objective_value_one_key_or_several():
    summary = {"devices": 88, "slo_attainment": 0.95, "goodput_qpm": None, "flag": True}
    assert objective_value(summary, "devices") == 88.0
    assert objective_value(summary, "goodput_qpm") is None and objective_value(summary, "flag") is None
    assert objective_value(summary, OmegaConf.create(["devices", "slo_attainment"])) == (88.0, 0.95)
    with pytest.raises(ValueError, match="no number for goodput_qpm, nope"):
        objective_value(summary, ["devices", "goodput_qpm", "nope"])


def test_a_relative_sweep_dir_is_refused_in_a_job_running_off_the_drivers_directory(tmp_path):
    def hydra(sweep_dir, cwd, mode, chdir=False):
        return OmegaConf.create({"mode": mode, "sweep": {"dir": sweep_dir}, "job": {"chdir": chdir},
                                 "runtime": {"cwd": str(cwd)}})

    from hydra.types import RunMode

    here, elsewhere = tmp_path / "driver", tmp_path / "worker"
    here.mkdir(), elsewhere.mkdir()
    with pytest.raises(ValueError, match="hydra.sweep.dir=multirun/x is relative and this job runs in"):
        check_job_dir(hydra("multirun/x", here, RunMode.MULTIRUN), elsewhere)
    check_job_dir(hydra("multirun/x", here, RunMode.MULTIRUN), here)  # joblib: the driver's directory
    check_job_dir(hydra(str(tmp_path / "abs"), here, RunMode.MULTIRUN), elsewhere)  # absolute: fine anywhere
    check_job_dir(hydra("multirun/x", here, RunMode.RUN), elsewhere)  # not a sweep


def test_a_failed_sweep_point_fails_the_sweep_after_its_siblings_finish(tmp_path):
    sweep = tmp_path / "sweep"
    proc = omnisim("-m", "cluster.decode.tp=1,3", f"hydra.sweep.dir={sweep}", *TINY, cwd=tmp_path)
    assert proc.returncode != 0
    assert "omnisim: error: cluster.decode.tp=3 does not divide the 32 attention heads" in proc.stderr
    runs = results.load(sweep).set_index("cluster.decode.tp")
    assert runs.loc[1, "complete"] and not runs.loc[3, "complete"]  # the good point still finished
    assert runs.loc[1, "devices"] == 2  # 1P1D of one device each
