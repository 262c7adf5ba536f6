"""conf/placement, conf/expert_load, conf/rebalance: one _target_ each, keys exactly the constructor's."""
import inspect
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
FILES = sorted(p for group in ("placement", "expert_load", "rebalance") for p in (CONF / group).glob("*.yaml"))


def check_keys(node):
    cls = get_class(node["_target_"])
    params = set(inspect.signature(cls).parameters)
    assert set(k for k in node if k != "_target_") == params, f"{node['_target_']}: keys != constructor arguments"
    for value in node.values():
        for child in (value if isinstance(value, list) else [value]):
            if isinstance(child, dict) and "_target_" in child:
                check_keys(child)


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_instantiates_with_exactly_the_constructor_arguments(path, tmp_path):
    node = OmegaConf.load(path)
    if path.stem == "replay":
        np.save(tmp_path / "load.npy", np.ones((2, 8)))
        node.path = str(tmp_path / "load.npy")
    cfg = OmegaConf.create({"seed": 5, "node": node})
    check_keys(OmegaConf.to_container(cfg.node, resolve=True))
    obj = instantiate(cfg.node, _convert_="all")
    assert type(obj).__name__ == node._target_.rsplit(".", 1)[1]
    if path.parent.name == "expert_load":
        shares = obj.shares(1.0, 2, 8)
        assert np.allclose(shares.sum(axis=1), 1.0)
