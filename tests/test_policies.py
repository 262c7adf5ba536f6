"""Every conf/proxy option: instantiated through Hydra, passes the conformance checker, and its yaml names exactly
its constructor's arguments. The policy packages (proxy and placement) import nothing but omnisim.core, the standard
library and numpy."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from omnisim.app import compose_option
from omnisim.core.conformance import check_proxy_policy, source_violations
from tests.config_keys import check_keys

ROOT = Path(__file__).resolve().parents[1]
PROXY_CONFS = sorted((ROOT / "conf" / "proxy").glob("*.yaml"))
EXPECTED = {"random", "round_robin", "least_load", "least_requests", "power_of_two", "prefix_aware", "kv_aware",
            "omni_proxy", "predictive", "omni_proxy_pd", "pd_decider", "by_phase"}


def build(path: Path, seed: int):
    cfg = OmegaConf.merge({"seed": seed}, {"proxy": compose_option("proxy", path.stem)})  # defaults list applied
    return instantiate(cfg.proxy)


def test_every_policy_has_a_config():
    assert EXPECTED <= {p.stem for p in PROXY_CONFS}


@pytest.mark.parametrize("path", PROXY_CONFS, ids=lambda p: p.stem)
def test_config_passes_conformance(path):
    check_proxy_policy(lambda seed: build(path, seed), calls=150)


@pytest.mark.parametrize("path", PROXY_CONFS, ids=lambda p: p.stem)
def test_config_keys_are_the_constructor_arguments(path):
    check_keys(compose_option("proxy", path.stem), path.name, "proxy")


def test_unknown_config_key_fails():
    cfg = OmegaConf.merge({"seed": 0}, {"proxy": OmegaConf.load(ROOT / "conf/proxy/omni_proxy.yaml")})
    cfg.proxy.prefill_max_tokens = 1
    with pytest.raises(Exception, match="prefill_max_tokens"):
        instantiate(cfg.proxy)


@pytest.mark.parametrize("path", PROXY_CONFS, ids=lambda p: p.stem)
def test_no_policy_module_reads_simulator_internals(path):
    policy = build(path, 0)
    inner = [policy] + [getattr(policy, a) for a in ("inner", "prefill", "decode") if hasattr(policy, a)]
    for p in inner:
        assert source_violations(p) == []


def test_policy_package_imports_without_simulator_or_frameworks():
    blocked = ["simpy", "hydra", "omegaconf", "pandas", "torch", "vllm", "aiohttp", "backends", "omnisim.sim",
               "omnisim.cost", "omnisim.workload", "omnisim.metrics", "omnisim.moe"]
    code = f"""
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import omnisim.policies as p
import omnisim.policies.placement as q  # not imported by omnisim.policies itself
print(len(p.__all__), len(q.__all__))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
