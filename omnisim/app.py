"""The ``omnisim`` command: a Hydra app that instantiates one experiment and runs it on the chosen backend.

This is the only module that calls ``hydra.utils.instantiate``; every constructor receives plain values.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from omnisim.experiment import Experiment, RunResult
from omnisim.metrics import format_summary, summarize, write_run

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("omnisim")


def _build(cfg: DictConfig, key: str):
    node = cfg.get(key)
    if node is None:
        return None
    try:
        return instantiate(node, _convert_="all")
    except Exception as e:  # name the config group: hydra's own message names the target and argument
        raise ValueError(f"config group '{key}': {e}") from e


def build_experiment(cfg: DictConfig) -> tuple[Experiment, object]:
    """Instantiate every group of a composed config: (experiment, backend)."""
    options = {k: _build(cfg, k) for k in ("expert_load", "rebalance") if cfg.get(k) is not None}
    experiment = Experiment(
        name=str(cfg.name), seed=int(cfg.seed), model=_build(cfg, "model"), hardware=_build(cfg, "hardware"),
        cluster=_build(cfg, "cluster"), workload=_build(cfg, "workload"), proxy=_build(cfg, "proxy"),
        slo=_build(cfg, "slo"), cost=_build(cfg, "cost"), placement=_build(cfg, "placement"), options=options)
    return experiment, _build(cfg, "backend")


def run_experiment(cfg: DictConfig, out_dir: Path) -> dict:
    experiment, backend = build_experiment(cfg)
    result: RunResult = backend.run(experiment, out_dir)
    summary = summarize(result.records, experiment.slo, result.instances)
    summary.update(result.extra)
    summary["name"] = experiment.name
    summary["seed"] = experiment.seed
    write_run(out_dir, result.records, summary, instances=result.instances, tables=result.tables or None)
    return summary


def instantiate_node(node, seed: int):
    """Instantiate one config node (a conf/<group>/<option>.yaml) with ``${seed}`` resolved: for command-line
    tools that take a single group's file rather than the whole app config."""
    root = OmegaConf.create({"seed": seed, "node": node})
    return instantiate(root.node, _convert_="all")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = run_experiment(cfg, out_dir)
    print(format_summary(summary))
    print(f"results: {out_dir}")
    value = summary.get(str(cfg.objective))
    return float(value) if isinstance(value, (int, float)) else None


if __name__ == "__main__":
    main()
