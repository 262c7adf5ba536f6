"""engine_policy on real engines: the vLLM and vllm-ascend launch plans give prefill and mixed instances
``--scheduler-cls backends.vllm.tfas_scheduler.TFASScheduler`` and the resolved engine_policy node (decode instances
neither), refuse settings under which the class would not run, and the scheduler class rebuilds the very policy
from that node (its vLLM-facing parts; the server itself: tests/test_vllm_tfas_e2e.py)."""
import importlib.util
import json
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from backends.ascend.launch_plan import AscendSettings
from backends.ascend.launch_plan import plan_instances as ascend_plan
from backends.vllm.backend import engine_policy_node
from backends.vllm.launch_plan import (
    ENGINE_POLICY_ENV, SCHEDULER_CLS, EngineSettings, engine_policy_launch, plan_instances,
)
from omnisim.app import CONF_DIR, build_experiment, compose_option
from omnisim.cluster import ClusterSpec, InstanceGroup
from omnisim.policies import TFAS

TFAS_NODE = {"_target_": "omnisim.policies.tfas.TFAS", "token_budget": 4096, "alpha": 0.9, "adjust_param": 3.6,
             "timeout_s": 30.0, "admit_whole": True}
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


def flag(argv, name):
    argv = list(argv)
    return argv[argv.index(name) + 1] if name in argv else None


def cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def cpu_group(**kw):
    return InstanceGroup(**{"block_size": 32, "max_model_len": 1024, **kw})


def test_vllm_prefill_and_mixed_instances_run_the_policy_decode_ones_do_not(tmp_path):
    pd = ClusterSpec(prefill=cpu_group(count=2), decode=cpu_group())
    settings = EngineSettings(model="/m", work_dir=tmp_path, engine_policy=TFAS_NODE)
    launches = plan_instances(pd, settings)
    for x in launches:
        if x.role == "prefill":
            assert flag(x.argv, "--scheduler-cls") == SCHEDULER_CLS
            assert json.loads(x.env[ENGINE_POLICY_ENV]) == TFAS_NODE
        else:
            assert "--scheduler-cls" not in x.argv and ENGINE_POLICY_ENV not in x.env
    (mixed,) = plan_instances(ClusterSpec(mixed=cpu_group()), settings)
    assert flag(mixed.argv, "--scheduler-cls") == SCHEDULER_CLS and ENGINE_POLICY_ENV in mixed.env
    # without an engine policy, vLLM's own scheduler
    for x in plan_instances(pd, EngineSettings(model="/m", work_dir=tmp_path)):
        assert "--scheduler-cls" not in x.argv and ENGINE_POLICY_ENV not in x.env
    assert engine_policy_launch("decode", TFAS_NODE) == ([], {})


def test_vllm_refuses_a_second_scheduler_class_and_a_node_without_target(tmp_path):
    with pytest.raises(ValueError, match="extra_args: --scheduler-cls"):
        EngineSettings(model="/m", work_dir=tmp_path, engine_policy=TFAS_NODE, extra_args=("--scheduler-cls", "x.Y"))
    with pytest.raises(ValueError, match="engine_policy: expected a config node"):
        EngineSettings(model="/m", work_dir=tmp_path, engine_policy={"token_budget": 5})
    EngineSettings(model="/m", work_dir=tmp_path, extra_args=("--scheduler-cls", "x.Y"))  # fine without a policy


def test_backend_vllm_passes_the_resolved_configured_node(tmp_path):
    experiment, backend = build_experiment(cfg("experiment=cpu_tiny_1p1d", "backend=vllm", "engine_policy=tfas",
                                               "engine_policy.timeout_s=5", f"backend.model_path={tmp_path}",
                                               "backend.base_port=9300"))
    node = engine_policy_node(experiment)
    assert node == {**compose_option("engine_policy", "tfas"), "timeout_s": 5}
    _, launches = backend.plan(experiment, tmp_path)
    by_role = {x.role: x for x in launches}
    assert json.loads(by_role["prefill"].env[ENGINE_POLICY_ENV]) == node
    assert flag(by_role["prefill"].argv, "--scheduler-cls") == SCHEDULER_CLS
    assert "--scheduler-cls" not in by_role["decode"].argv
    experiment, backend = build_experiment(cfg("experiment=cpu_tiny_1p1d", "backend=vllm",
                                               f"backend.model_path={tmp_path}", "backend.base_port=9300"))
    assert engine_policy_node(experiment) is None
    assert all("--scheduler-cls" not in x.argv for x in backend.plan(experiment, tmp_path)[1])


def test_ascend_prefill_instances_run_the_policy_and_its_own_schedulers_are_refused(tmp_path):
    cluster = ClusterSpec(prefill=InstanceGroup(count=2, tp=4, block_size=128),
                          decode=InstanceGroup(tp=8, block_size=128))
    settings = AscendSettings(model="/data/r1", work_dir=tmp_path, nodes=("10.0.0.1", "10.0.0.2"),
                              engine_policy=TFAS_NODE, extra_args=("--max-num-seqs", "64"))
    launches = ascend_plan(cluster, settings)
    assert [x.role for x in launches] == ["prefill", "prefill", "decode"]
    for x in launches:
        if x.role == "prefill":
            assert flag(x.argv, "--scheduler-cls") == SCHEDULER_CLS
            assert json.loads(x.env[ENGINE_POLICY_ENV]) == TFAS_NODE
            assert x.argv.index("--scheduler-cls") < len(x.argv) - 2 and x.argv[-2:] == ("--max-num-seqs", "64")
        else:
            assert "--scheduler-cls" not in x.argv and ENGINE_POLICY_ENV not in x.env
    for extra in ({"ascend_scheduler_config": {"enabled": True}}, {"ascend_scheduler_config": {}},
                  {"recompute_scheduler_enable": True}):
        with pytest.raises(ValueError, match="additional_config: ascend_scheduler_config"):
            AscendSettings(model="/m", work_dir=tmp_path, engine_policy=TFAS_NODE, additional_config=extra)
        AscendSettings(model="/m", work_dir=tmp_path, additional_config=extra)  # fine without an engine policy
    AscendSettings(model="/m", work_dir=tmp_path, engine_policy=TFAS_NODE,
                   additional_config={"ascend_scheduler_config": {"enabled": False}})


# -- the scheduler class's vLLM-independent parts ------------------------------------------------------------------
@needs_vllm
def test_the_scheduler_class_rebuilds_the_policy_from_its_environment():
    from backends.vllm.tfas_scheduler import policy_from_env

    assert vars(policy_from_env(None)) == vars(TFAS())  # unset: TFAS as published
    built = policy_from_env(json.dumps(TFAS_NODE))
    assert isinstance(built, TFAS) and vars(built) == vars(TFAS(token_budget=4096, timeout_s=30.0))
    assert isinstance(policy_from_env("tfas"), TFAS)  # a conf/engine_policy option name
    with pytest.raises(ValueError, match=ENGINE_POLICY_ENV):
        policy_from_env("{not json")
    with pytest.raises(ValueError, match=ENGINE_POLICY_ENV):
        policy_from_env("no_such_option")
    with pytest.raises(ValueError, match="not an engine policy"):
        policy_from_env(json.dumps({"_target_": "omnisim.policies.RoundRobin", "seed": 0}))


@needs_vllm
def test_the_scheduler_class_hands_vllm_requests_to_the_policy_and_keeps_async_scheduling():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from backends.vllm.tfas_scheduler import TFASAsyncScheduler, TFASScheduler, queued_prompts

    reqs = [SimpleNamespace(request_id="a", num_tokens=700, num_computed_tokens=0, arrival_time=5.0,
                            num_preemptions=0),
            SimpleNamespace(request_id="b", num_tokens=130, num_computed_tokens=30, arrival_time=6.0,
                            num_preemptions=1)]  # preempted: prompt + output so far, less what it kept
    assert [(p.request_id, p.tokens, p.queued_s, p.preemptions) for p in queued_prompts(reqs)] == \
        [("a", 700, 5.0, 0), ("b", 100, 6.0, 1)]
    config = lambda a: SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=a))  # noqa: E731
    # One --scheduler-cls name for both of vLLM's modes: the async variant when vLLM schedules asynchronously.
    assert type(TFASScheduler.__new__(TFASScheduler, config(True))) is TFASAsyncScheduler
    assert type(TFASScheduler.__new__(TFASScheduler, config(False))) is TFASScheduler
    assert issubclass(TFASAsyncScheduler, AsyncScheduler) and issubclass(TFASAsyncScheduler, TFASScheduler)
