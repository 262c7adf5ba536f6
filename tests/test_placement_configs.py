"""conf/placement, conf/expert_load, conf/rebalance: each option, composed, builds its _target_ (keys exactly the
constructor's: tests/test_app.py with tests/config_keys.py); predictive places with the migration_aware option."""
import numpy as np
import pytest
from hydra.utils import get_class

from omnisim.app import compose_option, config_options, instantiate_node
from omnisim.policies.placement import MigrationAwarePlacement, PredictivePlacement

OPTIONS = [(group, option) for group in ("placement", "expert_load", "rebalance") for option in config_options(group)]


@pytest.mark.parametrize("group,option", OPTIONS, ids=lambda x: x)
def test_option_instantiates_its_target(group, option, tmp_path):
    node = compose_option(group, option)
    if option == "replay":
        np.save(tmp_path / "load.npy", np.ones((2, 8)))
        node["path"] = str(tmp_path / "load.npy")
    obj = instantiate_node(node, 5)
    assert type(obj) is get_class(node["_target_"])
    if getattr(obj, "seed", None) is not None:
        assert obj.seed == 5
    if group == "expert_load":
        shares = obj.shares(1.0, 2, 8)
        assert np.allclose(shares.sum(axis=1), 1.0)


def test_predictive_placement_composes_the_migration_aware_option():
    migration_aware = compose_option("placement", "migration_aware")
    assert compose_option("placement", "predictive")["inner"] == migration_aware
    policy = instantiate_node(compose_option("placement", "predictive"), 3)
    assert isinstance(policy, PredictivePlacement) and isinstance(policy.inner, MigrationAwarePlacement)
    assert policy.inner.stall_fraction == migration_aware["stall_fraction"] == 0.05
