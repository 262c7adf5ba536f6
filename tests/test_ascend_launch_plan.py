"""backend=ascend: generated vllm-ascend commands, environments and configs for 1P1D and OmniInfer's 7P1D
DeepSeek-R1 shape, per-node scripts, and an early, clear failure where torch_npu / an NPU is missing."""
import json
import subprocess

import pytest
from hydra import compose, initialize_config_dir

from backends.ascend.backend import AscendBackend
from backends.ascend.launch_plan import AscendSettings, node_scripts, nodes_needed, plan_instances
from backends.ascend.preflight import AscendUnavailable, check_ascend, missing_packages
from omnisim.app import CONF_DIR, build_experiment
from omnisim.cluster import ClusterSpec, InstanceGroup

NODES = tuple(f"10.0.0.{i}" for i in range(1, 12))


def flag(argv, name):
    argv = list(argv)
    return argv[argv.index(name) + 1] if name in argv else None


def r1_7p1d() -> ClusterSpec:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        experiment, _ = build_experiment(compose("config", overrides=["experiment=omniinfer_r1_7p1d"]))
    return experiment.cluster


def test_1p1d_single_node_mooncake(tmp_path):
    cluster = ClusterSpec(prefill=InstanceGroup(tp=2, block_size=128), decode=InstanceGroup(tp=2, block_size=128))
    prefill, decode = plan_instances(cluster, AscendSettings(model="/data/qwen", work_dir=tmp_path,
                                                             nodes=("192.0.0.1",)))
    assert prefill.node == decode.node == "192.0.0.1" and prefill.url == "http://192.0.0.1:8100"
    assert (prefill.env["ASCEND_RT_VISIBLE_DEVICES"], decode.env["ASCEND_RT_VISIBLE_DEVICES"]) == ("0,1", "2,3")
    for x in (prefill, decode):
        assert x.env["HCCL_IF_IP"] == "192.0.0.1"
        assert x.env["GLOO_SOCKET_IFNAME"] == x.env["TP_SOCKET_IFNAME"] == x.env["HCCL_SOCKET_IFNAME"] == "eth0"
        assert x.env["OMP_PROC_BIND"] == "false" and x.env["VLLM_USE_V1"] == "1"
        assert flag(x.argv, "--tensor-parallel-size") == "2" and "--trust-remote-code" in x.argv
        assert flag(x.argv, "--host") == "0.0.0.0" and "--data-parallel-size" not in x.argv
    assert (prefill.env["HCCL_BUFFSIZE"], decode.env["HCCL_BUFFSIZE"]) == ("256", "600")
    kp, kd = (json.loads(flag(x.argv, "--kv-transfer-config")) for x in (prefill, decode))
    assert kp["kv_connector"] == kd["kv_connector"] == "MooncakeConnectorV1"
    assert (kp["kv_role"], kd["kv_role"]) == ("kv_producer", "kv_consumer")
    assert kp["kv_buffer_device"] == "npu" and kp["engine_id"] != kd["engine_id"]
    assert kp["kv_port"] != kd["kv_port"] and int(kp["kv_port"]) >= 28000  # above AscendDirectTransport's range
    assert kp["kv_connector_extra_config"] == {"prefill": {"dp_size": 1, "tp_size": 2},
                                               "decode": {"dp_size": 1, "tp_size": 2}}
    assert "--additional-config" not in prefill.argv


def test_omniinfer_r1_7p1d_shape(tmp_path):
    cluster = r1_7p1d()
    eplb = {"dynamic_eplb": True, "num_redundant_experts": 32, "expert_heat_collection_interval": 600}
    s = AscendSettings(model="/data/DeepSeek-R1-w8a8", work_dir=tmp_path, nodes=NODES, quantization="ascend",
                       eplb=eplb)
    assert nodes_needed(cluster, 8) == 11  # 7 x 8 NPUs + 32 NPUs = 11 nodes of 8, as published
    launches = plan_instances(cluster, s)
    servers = [x for x in launches if not x.headless]
    assert [x.id for x in servers] == [f"prefill-{i}" for i in range(7)] + ["decode-0"]
    assert len({x.url for x in servers}) == 8
    # Each prefill instance owns a node: 8 NPUs (tp x dp as configured) with expert parallel, no EPLB (decode only).
    p = cluster.prefill
    assert p.devices == 8 and p.ep == 8
    for i, x in enumerate(launches[:7]):
        assert x.node == NODES[i] and x.env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
        assert flag(x.argv, "--tensor-parallel-size") == (str(p.tp) if p.tp > 1 else None)
        assert flag(x.argv, "--data-parallel-size") == (str(p.dp) if p.dp > 1 else None)
        assert "--enable-expert-parallel" in x.argv and "--additional-config" not in x.argv
        assert "DYNAMIC_EPLB" not in x.env and flag(x.argv, "--quantization") == "ascend"
    # The decode instance spans 4 nodes: DP 32, 8 ranks per node, headless on all but the first.
    decode = [x for x in launches if x.id == "decode-0"]
    assert [x.node for x in decode] == list(NODES[7:11]) and [x.part for x in decode] == [0, 1, 2, 3]
    for part, x in enumerate(decode):
        assert flag(x.argv, "--data-parallel-size") == "32" and flag(x.argv, "--data-parallel-size-local") == "8"
        assert flag(x.argv, "--data-parallel-address") == NODES[7]
        # vLLM's --max-num-seqs is per DP engine core: the decode group's seats per rank, whichever dp_mode
        assert flag(x.argv, "--max-num-seqs") == str(cluster.decode.rank_max_num_seqs)
        assert ("--headless" in x.argv) == (part > 0)
        assert flag(x.argv, "--data-parallel-start-rank") == (str(8 * part) if part else None)
        assert json.loads(flag(x.argv, "--additional-config")) == {"eplb_config": eplb}
        assert x.env["DYNAMIC_EPLB"] == "true" and x.env["HCCL_IF_IP"] == x.node
        kv = json.loads(flag(x.argv, "--kv-transfer-config"))
        assert kv["kv_role"] == "kv_consumer" and kv["engine_id"] == "7"  # one engine id across its nodes
        assert kv["kv_connector_extra_config"] == {"prefill": {"dp_size": p.dp, "tp_size": p.tp},
                                                   "decode": {"dp_size": 32, "tp_size": 1}}
    assert len({json.loads(flag(x.argv, "--kv-transfer-config"))["kv_port"] for x in servers}) == 8


def test_node_scripts_start_each_nodes_processes(tmp_path):
    launches = plan_instances(r1_7p1d(), AscendSettings(model="/data/r1", work_dir=tmp_path, nodes=NODES))
    scripts = node_scripts(launches)
    assert sorted(scripts) == sorted(NODES)
    text = scripts[NODES[8]]
    assert "--headless" in text and "HCCL_IF_IP=10.0.0.9" in text and text.count(" &\n") == 1
    path = tmp_path / "node.sh"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # valid bash


def test_two_instances_share_a_node_when_they_fit(tmp_path):
    cluster = ClusterSpec(prefill=InstanceGroup(count=3, tp=4), decode=InstanceGroup(tp=8))
    launches = plan_instances(cluster, AscendSettings(model="m", work_dir=tmp_path, nodes=("a", "b", "c")))
    assert [(x.id, x.node, x.env["ASCEND_RT_VISIBLE_DEVICES"]) for x in launches] == [
        ("prefill-0", "a", "0,1,2,3"), ("prefill-1", "a", "4,5,6,7"), ("prefill-2", "b", "0,1,2,3"),
        ("decode-0", "c", "0,1,2,3,4,5,6,7")]


def test_llmdatadist_connector_and_rank_table(tmp_path):
    s = AscendSettings(model="m", work_dir=tmp_path, connector="LLMDataDistCMgrConnector",
                       rank_table_path="/etc/ranktable.json")
    prefill, decode = plan_instances(ClusterSpec(prefill=InstanceGroup(), decode=InstanceGroup()), s)
    kv = json.loads(flag(decode.argv, "--kv-transfer-config"))
    assert kv["kv_connector_module_path"] == "vllm_ascend.distributed.llmdatadist_c_mgr_connector"
    assert kv["kv_buffer_device"] == "npu" and kv["kv_parallel_size"] == 1 and kv["kv_role"] == "kv_consumer"
    assert decode.env["DISAGGREGATED_PREFILL_RANK_TABLE_PATH"] == "/etc/ranktable.json"


@pytest.mark.parametrize("kwargs,field", [
    (dict(connector="NixlConnector"), "connector"),
    (dict(connector="LLMDataDistCMgrConnector"), "rank_table_path"),
    (dict(kv_port_base=21000), "kv_port_base"),
    (dict(eplb={"dynamic_eplb": True, "redundant": 4}), "eplb"),
    (dict(eplb_roles=("router",)), "eplb_roles"),
    (dict(nodes=()), "nodes"),
    (dict(additional_config={"eplb_config": {}}), "additional_config"),
])
def test_bad_settings_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        AscendSettings(model="m", work_dir=tmp_path, **kwargs)


def test_cluster_that_does_not_fit_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"nodes: the cluster needs 11 node"):
        plan_instances(r1_7p1d(), AscendSettings(model="m", work_dir=tmp_path, nodes=NODES[:5]))
    with pytest.raises(ValueError, match=r"cluster\.decode.*tensor parallel"):
        plan_instances(ClusterSpec(prefill=InstanceGroup(), decode=InstanceGroup(tp=16)),
                       AscendSettings(model="m", work_dir=tmp_path, nodes=NODES))


def test_missing_ascend_stack_fails_early_and_says_what_is_missing():
    if not missing_packages():
        pytest.skip("this machine has torch_npu and vllm_ascend")
    with pytest.raises(AscendUnavailable, match="torch-npu.*vllm-ascend"):
        check_ascend(devices_needed=2)


def test_backend_run_fails_before_starting_anything_without_npus(tmp_path):
    if not missing_packages():
        pytest.skip("this machine has torch_npu and vllm_ascend")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        c = compose("config", overrides=["experiment=cpu_tiny_1p1d", "backend=ascend", "backend.model_path=/m"])
    experiment, backend = build_experiment(c)
    assert isinstance(backend, AscendBackend)
    with pytest.raises(AscendUnavailable, match="torch-npu"):
        backend.run(experiment, tmp_path)
    assert not (tmp_path / "logs").exists()  # no server was started
    script = (tmp_path / "launch" / "node-127.0.0.1.sh").read_text()  # but the launch is written down
    assert "MooncakeConnectorV1" in script and "ASCEND_RT_VISIBLE_DEVICES=0 " in script


def test_multi_node_cluster_asks_for_the_node_scripts(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        c = compose("config", overrides=["experiment=omniinfer_r1_7p1d", "backend=ascend",
                                         "backend.model_path=/data/r1", f"backend.nodes=[{','.join(NODES)}]"])
    experiment, backend = build_experiment(c)
    with pytest.raises(ValueError, match="start_servers=false"):
        backend.run(experiment, tmp_path)
    assert len(list((tmp_path / "launch").glob("node-*.sh"))) == 11


def test_model_path_is_required(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        experiment, backend = build_experiment(compose("config", overrides=["backend=ascend"]))
    with pytest.raises(ValueError, match="backend.model_path"):
        backend.run(experiment, tmp_path)



def _omni_attn_config() -> dict:
    from omnisim.attention import OmniAttn

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        c = compose("config", overrides=["experiment=omniinfer_r1_7p1d", "attention=omni_attn"])
    experiment, _ = build_experiment(c)
    assert isinstance(experiment.attention, OmniAttn)
    return experiment.attention.omniinfer_config()


def test_omni_attn_config_on_both_roles_merged_with_eplb_and_prefix_caching_off_on_decode(tmp_path):
    omni = _omni_attn_config()
    eplb = {"dynamic_eplb": True, "num_redundant_experts": 32}
    s = AscendSettings(model="/data/r1", work_dir=tmp_path, nodes=NODES, eplb=eplb, omni_attn=omni,
                       additional_config={"graph_model_compile_config": {"level": 1}})
    launches = plan_instances(r1_7p1d(), s)
    assert omni == {"sink": 1, "recent": 3, "beta": 0.2, "pattern": omni["pattern"]} and len(omni["pattern"]) == 62
    for x in launches:
        extra = json.loads(flag(x.argv, "--additional-config"))
        want = {"graph_model_compile_config": {"level": 1}, "enable_omni_attn": True, "omni_attn_config": omni}
        if x.role == "decode":
            want["eplb_config"] = eplb
            assert "--no-enable-prefix-caching" in x.argv and "--enable-prefix-caching" not in x.argv
        else:  # the prefill side keeps one KV pool and its prefix cache; it sends compressed layers' windows only
            assert "--enable-prefix-caching" in x.argv
        assert extra == want, x.id
        assert isinstance(extra["omni_attn_config"]["beta"], float)
        assert isinstance(extra["omni_attn_config"]["sink"], int)


def test_omni_attn_is_given_through_attention_not_additional_config_and_needs_a_pd_cluster(tmp_path):
    with pytest.raises(ValueError, match="additional_config: give OmniAttn through attention=omni_attn"):
        AscendSettings(model="m", work_dir=tmp_path, additional_config={"enable_omni_attn": True})
    with pytest.raises(ValueError, match="omni_attn: expected OmniInfer's omni_attn_config keys"):
        AscendSettings(model="m", work_dir=tmp_path, omni_attn={"sink": 1})
    mixed = ClusterSpec(mixed=InstanceGroup(tp=2, block_size=128))
    with pytest.raises(ValueError, match="attention=omni_attn: .*colocated"):
        plan_instances(mixed, AscendSettings(model="m", work_dir=tmp_path, omni_attn=_omni_attn_config()))
    assert plan_instances(mixed, AscendSettings(model="m", work_dir=tmp_path))  # without OmniAttn it plans


def test_backend_run_writes_omni_attn_into_every_nodes_script(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        c = compose("config", overrides=["experiment=omniinfer_r1_7p1d", "backend=ascend", "attention=omni_attn",
                                         "backend.model_path=/data/r1", f"backend.nodes=[{','.join(NODES)}]"])
    experiment, backend = build_experiment(c)
    with pytest.raises(ValueError, match="start_servers=false"):
        backend.run(experiment, tmp_path)
    scripts = {p.name: p.read_text() for p in (tmp_path / "launch").glob("node-*.sh")}
    assert len(scripts) == 11 and all('"enable_omni_attn": true' in t for t in scripts.values())
    assert "--no-enable-prefix-caching" in scripts[f"node-{NODES[7]}.sh"]  # decode's first node
    assert "--no-enable-prefix-caching" not in scripts[f"node-{NODES[0]}.sh"]  # a prefill node
