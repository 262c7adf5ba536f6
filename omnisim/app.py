"""The ``omnisim`` command: a Hydra app that instantiates one experiment and runs it on the chosen backend.

This is the only module that calls ``hydra.utils.instantiate``; every constructor receives plain values. It also
composes single options (``compose_option``, ``instantiate_node``) for the command-line tools and processes that
take one group's node rather than the whole app config (omnisim-proxy, the load generator, omnisim-placement,
vLLM's EPLB plugin), so it imports the simulator and the metrics only where a whole experiment is built.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("omnisim")
# conf/hydra/launcher/ray.yaml shadows the Ray plugin's node of the same name on purpose (it fixes two defaults);
# Hydra 1.3 still validates it against that node and warns on every composition that this is deprecated
warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/ray' is validated against ConfigStore schema",
                        category=UserWarning)


def _build(cfg: DictConfig, key: str):
    node = cfg.get(key)
    return None if node is None else build_node(node, key)


def build_node(node, path: str):
    """Instantiate one resolved config node found at ``path`` (e.g. ``workload``). A value of the wrong kind is a
    ValueError naming its full key (omnisim.config_check), before any constructor runs; a constructor's error is
    re-raised as a ValueError naming the group."""
    from omnisim.config_check import check_node

    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    check_node(plain, path)
    try:
        return instantiate(OmegaConf.create(plain) if isinstance(plain, dict) else node, _convert_="all")
    except Exception as e:
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, ValueError):  # the constructor's own message names the field
            raise ValueError(str(root)) from e
        # otherwise name the config group: hydra's own message names the target and argument
        raise ValueError(f"config group '{path}': {e}") from e


def build_experiment(cfg: DictConfig) -> tuple:
    """Instantiate every group of a composed config: (experiment, backend). ``options["placement_config"]`` and
    ``options["engine_policy_config"]`` are the resolved placement and engine_policy nodes (plain values), for
    backends that rebuild the policy in another process (vLLM's EPLB plugin, its scheduler class)."""
    from omnisim.experiment import Experiment

    options = {k: _build(cfg, k) for k in ("expert_load", "rebalance") if cfg.get(k) is not None}
    if cfg.get("placement") is not None:
        options["placement_config"] = OmegaConf.to_container(cfg.placement, resolve=True)
    if cfg.get("engine_policy") is not None:
        options["engine_policy_config"] = OmegaConf.to_container(cfg.engine_policy, resolve=True)
    experiment = Experiment(
        name=str(cfg.name), seed=int(cfg.seed), model=_build(cfg, "model"), hardware=_build(cfg, "hardware"),
        cluster=_build(cfg, "cluster"), workload=_build(cfg, "workload"), proxy=_build(cfg, "proxy"),
        slo=_build(cfg, "slo"), cost=_build(cfg, "cost"), placement=_build(cfg, "placement"),
        attention=_build(cfg, "attention"), engine_policy=_build(cfg, "engine_policy"),
        serving=_build(cfg, "serving"), options=options)
    experiment.cluster.check_model(experiment.model)
    return experiment, _build(cfg, "backend")


def run_experiment(cfg: DictConfig, out_dir: Path) -> dict:
    from omnisim.metrics import summarize, write_run

    # A failed run must not leave an earlier run's summary behind: a directory with one is a complete run.
    (out_dir / "summary.json").unlink(missing_ok=True)
    experiment, backend = build_experiment(cfg)
    result = backend.run(experiment, out_dir)
    if len(result.records) == 0:
        raise ValueError("the workload produced no requests (check workload.max_requests, workload.duration_s, "
                         "workload.start_s)")
    summary = summarize(result.records, experiment.slo, result.instances)
    summary.update(result.extra)
    summary["name"] = experiment.name
    summary["seed"] = experiment.seed
    summary["devices"] = experiment.cluster.devices
    write_run(out_dir, result.records, summary, instances=result.instances, tables=result.tables or None,
              plots=bool(cfg.get("plots", True)))
    return summary


def _compose(config_name: str):
    """Hydra's composition of one config of conf/ (or of the ConfigStore), inside the app or a caller's
    ``initialize_config_dir(CONF_DIR)`` when there is one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name)


def config_options(group: str) -> list[str]:
    """The options of conf/<group>/ (``group`` may be nested, e.g. ``cluster/group``), sorted."""
    return sorted(p.stem for p in Path(CONF_DIR, group).glob("*.yaml"))


def compose_option(group: str, option: str) -> dict:
    """conf/<group>/<option>.yaml as the app composes it (its defaults list applied: nested nodes, base options),
    unresolved (``${seed}`` stays), as plain data. ``group`` may be nested, e.g. ``cluster/group``."""
    if not Path(CONF_DIR, group, f"{option}.yaml").is_file():
        raise ValueError(f"no conf/{group}/{option}.yaml; known: {config_options(group)}")
    node = _compose(f"{group}/{option}")
    for key in group.split("/"):
        node = node[key]
    return OmegaConf.to_container(node, resolve=False)


_NODE_NAME = "_omnisim_node"


def compose_node(node):
    """``node`` with its ``defaults`` list applied as Hydra applies it to a conf/ file: a conf/<group>/*.yaml file
    loaded as it is (conf/ defaults lists name absolute groups, ``/group@key: option`` and ``/group/option@_here_``,
    so they compose the same outside their group). A node without a defaults list is returned unchanged."""
    data = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    if not isinstance(data, dict) or "defaults" not in data:
        return node
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=_NODE_NAME, node=copy.deepcopy(data))
    return OmegaConf.to_container(_compose(_NODE_NAME), resolve=False)


def instantiate_node(node, seed: int):
    """Instantiate one config node (a conf/<group>/<option>.yaml, its defaults list applied) with ``${seed}``
    resolved: for command-line tools and processes that take a single group's node rather than the whole app
    config."""
    from omnisim.config_check import check_node

    root = OmegaConf.create({"seed": seed, "node": compose_node(node)})
    plain = OmegaConf.to_container(root.node, resolve=True)
    check_node(plain, "")
    return instantiate(OmegaConf.create(plain), _convert_="all")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | tuple | None:
    from omnisim.metrics import format_summary

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        check_job_dir(hydra_cfg, Path.cwd())
        summary = run_experiment(cfg, out_dir)
        value = objective_value(summary, cfg.objective)
    except (ValueError, FileNotFoundError) as e:  # a user's error: one line naming the field, no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"omnisim: error: {e}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # one failed sweep point: Hydra records the job as failed (the sweeper decides: the basic sweeper stops
            # after the batch, Optuna marks the trial failed) instead of the worker exiting under its siblings
            raise
        sys.exit(2)
    print(format_summary(summary))
    print(f"results: {out_dir}")
    return value


def check_job_dir(hydra_cfg, cwd: Path) -> None:
    """A sweep job running in another directory than the one the sweep was started from (a Ray worker, a Slurm
    job) resolves a relative ``hydra.sweep.dir`` there: refuse it rather than scatter the runs."""
    sweep_dir = Path(str(hydra_cfg.sweep.dir))
    if (hydra_cfg.mode == RunMode.MULTIRUN and not sweep_dir.is_absolute() and not hydra_cfg.job.chdir
            and cwd.resolve() != Path(hydra_cfg.runtime.cwd).resolve()):
        raise ValueError(f"hydra.sweep.dir={sweep_dir} is relative and this job runs in {cwd}, not in "
                         f"{hydra_cfg.runtime.cwd} where the sweep started: give an absolute hydra.sweep.dir (on "
                         f"storage every node shares)")


def objective_value(summary: dict, objective) -> float | tuple | None:
    """What a sweep's run returns: the summary key ``objective`` names (None where the run has no value for it), or,
    for a list of keys (multi-objective Optuna: ``direction: [minimize, maximize]``), a tuple of their values."""
    if OmegaConf.is_list(objective) or isinstance(objective, (list, tuple)):
        values = tuple(objective_value(summary, key) for key in objective)
        missing = [str(k) for k, v in zip(objective, values) if v is None]
        if missing:  # a tuple with a None in it would fail inside the sweeper with a message about floats
            raise ValueError(f"objective: the run's summary has no number for {', '.join(missing)}")
        return values
    value = summary.get(str(objective))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


if __name__ == "__main__":
    main()
