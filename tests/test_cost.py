"""Cost model: model/hardware specs from conf/, roofline step times, KV capacity."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from omnisim.app import compose_option
from omnisim.cost.roofline import COMM_OPS
from omnisim.cost import (HardwareSpec, ModelSpec, Parallelism, RooflineModel, kv_capacity_tokens,
                          weight_bytes_per_device)
from tests.config_keys import check_keys

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
HARDWARE = sorted(p.stem for p in (CONF / "hardware").glob("*.yaml"))


def load(group: str, name: str):
    return instantiate(compose_option(group, name))  # defaults list applied (deepseek_v3 is deepseek_r1 renamed)


# ---- configs --------------------------------------------------------------------------------------------------------
def test_every_model_and_hardware_listed_in_the_brief_exists():
    assert {"deepseek_r1", "deepseek_v3", "qwen3_235b_a22b", "llama3_8b", "llama3_70b", "llama2_70b", "tiny_llama",
            "tiny_qwen3_moe"} <= set(MODELS)
    assert {"ascend_910b", "ascend_910c", "h100", "h200", "h800", "a100", "cpu"} <= set(HARDWARE)


@pytest.mark.parametrize("name", HARDWARE)
def test_every_hardware_coefficient_names_its_source(name):
    """Each value line of conf/hardware/NAME.yaml carries a comment: a source tag of the header, a measurement, or
    the word estimate."""
    lines = [ln for ln in (CONF / "hardware" / f"{name}.yaml").read_text().splitlines()
             if ln and not ln.startswith("#") and not ln.startswith(("_target_", "name:"))]
    assert lines and all("#" in ln and ln.split("#", 1)[1].strip() for ln in lines), \
        [ln for ln in lines if "#" not in ln]


def test_h800_is_h100_with_h800_nvlink():
    h100, h800 = load("hardware", "h100"), load("hardware", "h800")
    differ = {f for f in h100.__dataclass_fields__ if getattr(h100, f) != getattr(h800, f)}
    assert differ == {"name", "intra_node_GBps"}
    assert h800.intra_node_GBps == 200.0  # NVLink 400 GB/s bidirectional


@pytest.mark.parametrize("group,name", [("model", n) for n in MODELS] + [("hardware", n) for n in HARDWARE])
def test_config_instantiates_with_exactly_constructor_keys(group, name):
    cfg = compose_option(group, name)
    spec = instantiate(cfg)
    assert isinstance(spec, ModelSpec if group == "model" else HardwareSpec)
    assert spec.name == name
    check_keys(cfg, f"{group}/{name}", group)


@pytest.mark.parametrize("name", ["roofline", "table"])
def test_cost_configs_build_a_step_time_model_per_instance_group(name):
    cfg = compose_option("cost", name)
    check_keys(cfg, f"cost/{name}", "cost")  # less model, hardware, parallel: the app adds them
    make = instantiate(cfg)
    cost = make(model=load("model", "tiny_llama"), hardware=load("hardware", "cpu"), parallel=Parallelism())
    small, big = cost.step_time(0, 0.0, 0, 1, 100), cost.step_time(0, 0.0, 0, 64, 64 * 1000)
    assert 0 < small < big < 1.0


# ---- model shapes against published numbers ------------------------------------------------------------------------
def test_kv_bytes_per_token():
    assert load("model", "deepseek_r1").kv_bytes_per_token == 61 * 576 * 2 == 70_272
    assert load("model", "deepseek_r1").kv_values_per_token_layer == 576
    assert load("model", "llama3_8b").kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    assert load("model", "qwen3_235b_a22b").kv_bytes_per_token == 94 * 2 * 4 * 128 * 2


@pytest.mark.parametrize("name,total,active", [
    ("deepseek_v3", 671e9, 37e9), ("deepseek_r1", 671e9, 37e9), ("qwen3_235b_a22b", 235e9, 22e9),
    ("llama3_8b", 8.03e9, 8.03e9), ("llama3_70b", 70.6e9, 70.6e9), ("llama2_70b", 69.0e9, 69.0e9)])
def test_parameter_counts_match_published_sizes(name, total, active):
    """Within 1% (total) and 2% (active): norms and biases are left out, the rest is exact."""
    m = load("model", name)
    assert m.total_params == pytest.approx(total, rel=0.01)
    assert m.active_params == pytest.approx(active, rel=0.02)
    assert m.weight_bytes == m.total_params * m.dtype_bytes


def test_tiny_llama_matches_the_locally_built_hf_model():
    # LlamaForCausalLM(hidden 128, 2 layers, intermediate 256, 4 heads, 2 KV heads, vocab 512) has 426,624
    # parameters, 640 of them RMSNorm weights, which ModelSpec leaves out.
    assert load("model", "tiny_llama").total_params == 426_624 - 640


def test_moe_structure():
    ds = load("model", "deepseek_r1")
    assert (ds.moe_layers, ds.dense_layers, ds.num_experts, ds.top_k) == (58, 3, 256, 8)
    qwen = load("model", "qwen3_235b_a22b")
    assert (qwen.moe_layers, qwen.dense_layers) == (94, 0)
    assert load("model", "llama3_8b").moe_layers == 0


# ---- validation ----------------------------------------------------------------------------------------------------
TINY = dict(name="t", layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512)
TINY_MOE = dict(TINY, num_experts=8, top_k=2, expert_intermediate=64)


@pytest.mark.parametrize("changes,field", [
    (dict(TINY, layers=0), "layers"), (dict(TINY, kv_heads=3), "kv_heads"), (dict(TINY, attention="mha"), "attention"),
    (dict(TINY, attention="mla"), "kv_lora_rank"), (dict(TINY, dtype_bytes=0), "dtype_bytes"),
    (dict(TINY, top_k=2), "num_experts"), (dict(TINY_MOE, top_k=9), "top_k"),
    (dict(TINY_MOE, expert_intermediate=0), "expert_intermediate"),
    (dict(TINY_MOE, first_dense_layers=2), "first_dense_layers"),
    (dict(TINY_MOE, num_expert_groups=3), "num_expert_groups"),
    (dict(TINY_MOE, num_expert_groups=4, topk_groups=5), "topk_groups"),
])
def test_model_spec_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelSpec(**changes)


H100_ARGS = dict(name="x", bf16_tflops=989, hbm_GB=80, hbm_TBps=3.35, intra_node_GBps=450, inter_node_GBps=50,
                 devices_per_node=8)


@pytest.mark.parametrize("changes,field", [
    (dict(bf16_tflops=0), "bf16_tflops"), (dict(gemm_efficiency=1.5), "gemm_efficiency"),
    (dict(memory_efficiency=0), "memory_efficiency"), (dict(devices_per_node=0), "devices_per_node"),
    (dict(reserved_GB=80), "reserved_GB"), (dict(step_overhead_s=-1), "step_overhead_s"),
    (dict(int8_tflops=-1), "int8_tflops"), (dict(roofline_smoothing=0.5), "roofline_smoothing"),
    (dict(kernel_latency_s=-1e-6), "kernel_latency_s"), (dict(a2a_efficiency=0), "a2a_efficiency"),
    (dict(bus_efficiency=1.2), "bus_efficiency"), (dict(int8_gemm_efficiency=2), "int8_gemm_efficiency"),
    (dict(link_latency_s=-1), "link_latency_s"), (dict(bulk_bus_efficiency=0), "bulk_bus_efficiency"),
    (dict(bulk_allreduce_bytes=-1), "bulk_allreduce_bytes"), (dict(bulk_link_latency_s=-1), "bulk_link_latency_s"),
    (dict(elementwise_efficiency=1.5), "elementwise_efficiency"),
])
def test_hardware_spec_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        HardwareSpec(**{**H100_ARGS, **changes})


def test_parallelism_and_roofline_errors():
    with pytest.raises(ValueError, match="ep=3"):
        Parallelism(tp=2, dp=2, ep=3)
    with pytest.raises(ValueError, match="tp"):
        Parallelism(tp=0)
    with pytest.raises(ValueError, match="dense"):
        RooflineModel(load("model", "llama3_8b"), load("hardware", "h100"), Parallelism(tp=2, ep=2))
    with pytest.raises(ValueError, match="comm_overlap"):
        RooflineModel(load("model", "llama3_8b"), load("hardware", "h100"), comm_overlap=1.5)
    with pytest.raises(ValueError, match="mtp_tokens"):
        RooflineModel(load("model", "llama3_8b"), load("hardware", "h100"), mtp_tokens=-1)
    with pytest.raises(ValueError, match="mtp_acceptance"):
        RooflineModel(load("model", "llama3_8b"), load("hardware", "h100"), mtp_tokens=1, mtp_acceptance=1.0)
    with pytest.raises(ValueError, match="micro_batches"):
        RooflineModel(load("model", "llama3_8b"), load("hardware", "h100"), micro_batches=0)
    with pytest.raises(ValueError, match="not both"):
        RooflineModel(load("model", "llama3_8b"), load("hardware", "h100"), micro_batches=2, comm_overlap=0.5)


# ---- roofline behaviour --------------------------------------------------------------------------------------------
def roofline(model: str, hardware: str, tp: int = 1, dp: int = 1, ep: int = 1, **knobs) -> RooflineModel:
    return RooflineModel(load("model", model), load("hardware", hardware), Parallelism(tp=tp, dp=dp, ep=ep), **knobs)


def chunk(new: int, cached: int = 0) -> tuple[int, float, int]:
    """(prefill_tokens, prefill_attention, prefill_context) of one prefill chunk."""
    return new, new * (cached + (new + 1) / 2), cached + new


CONFIGS = [("llama3_8b", "h100", {}), ("llama3_70b", "h200", dict(tp=4)),
           ("deepseek_r1", "ascend_910c", dict(dp=32, ep=32, comm_overlap=0.5)),
           ("qwen3_235b_a22b", "h100", dict(tp=4, dp=2, ep=8)), ("deepseek_v3", "a100", dict(tp=8)),
           ("tiny_qwen3_moe", "cpu", {}), ("tiny_llama", "cpu", dict(tp=2)),
           ("deepseek_v3", "h800", dict(dp=16, ep=16, comm_overlap=1.0, mtp_tokens=1, mtp_acceptance=0.875)),
           ("llama2_70b", "a100", dict(tp=2, mtp_tokens=2, mtp_acceptance=0.6)),
           ("deepseek_r1", "ascend_910c_cm384", dict(dp=16, ep=16, micro_batches=2, mtp_tokens=1,
                                                     mtp_acceptance=0.8))]


@pytest.mark.parametrize("model,hardware,kw", CONFIGS)
def test_step_time_is_the_sum_of_the_breakdown(model, hardware, kw):
    cost = roofline(model, hardware, **kw)
    rng = np.random.default_rng(0)
    for _ in range(50):
        p, a, c = chunk(int(rng.integers(0, 8192)), int(rng.integers(0, 8192)))
        d = int(rng.integers(0, 512))
        args = (p, a, c if p else 0, d, d * int(rng.integers(1, 8192)), float(rng.uniform(1, 3)))
        if p == 0 and d == 0:
            continue
        parts = cost.breakdown(*args)
        assert all(v >= 0 for v in parts.values())
        assert cost.step_time(*args) == pytest.approx(sum(parts.values()), rel=1e-12)


@pytest.mark.parametrize("model,hardware,kw", CONFIGS)
def test_step_time_grows_with_tokens_sequences_context_and_imbalance(model, hardware, kw):
    cost = roofline(model, hardware, **kw)
    rng = np.random.default_rng(1)

    def step(new, cached, seqs, ctx, imbalance):
        return cost.step_time(*chunk(new, cached), seqs, seqs * ctx, imbalance) if new else \
            cost.step_time(0, 0.0, 0, seqs, seqs * ctx, imbalance)

    for _ in range(100):
        base = [int(rng.integers(0, 4096)), int(rng.integers(0, 4096)), int(rng.integers(1, 256)),
                int(rng.integers(1, 8192)), float(rng.uniform(1, 2))]
        t0 = step(*base)
        for i, bump in enumerate([int(rng.integers(1, 4096)), int(rng.integers(1, 4096)), int(rng.integers(1, 64)),
                                  int(rng.integers(1, 4096)), 0.5]):
            if i == 1 and base[0] == 0:
                continue  # cached prefix only matters to a prefill chunk
            more = list(base)
            more[i] += bump
            assert step(*more) >= t0 * (1 - 1e-12), (base, i, bump)


def test_prefill_is_compute_bound_and_decode_memory_bound():
    cost = roofline("llama3_8b", "h100")
    pre = cost.bounds(*chunk(8192), 0, 0)
    assert pre["dense_gemm"][0] > 3 * pre["dense_gemm"][1]
    assert pre["prefill_attention"][0] > pre["prefill_attention"][1]
    dec = cost.bounds(0, 0.0, 0, 1, 1000)
    assert dec["dense_gemm"][1] > 100 * dec["dense_gemm"][0]
    dec = cost.bounds(0, 0.0, 0, 64, 64 * 2000)
    assert dec["dense_gemm"][1] > dec["dense_gemm"][0]
    assert dec["decode_attention"][1] > dec["decode_attention"][0]  # GQA decode reads more than it computes
    parts = cost.breakdown(0, 0.0, 0, 1, 1000)
    assert parts["dense_gemm"] == max(parts.values())


def test_moe_is_weight_bound_at_small_batch_and_gemm_bound_at_large():
    cost = roofline("deepseek_r1", "h100", dp=8, ep=8)
    small = cost.bounds(0, 0.0, 0, 8, 8 * 1024)["moe"]
    assert small[1] > 10 * small[0]
    large = cost.bounds(*chunk(8 * 4096), 0, 0)["moe"]
    assert large[0] > large[1]
    # one token touches top_k of 256 experts per layer, so far less than the rank's experts are read
    one, full = cost.bounds(0, 0.0, 0, 1, 1)["moe"][1], cost.bounds(0, 0.0, 0, 8 * 512, 8 * 512)["moe"][1]
    assert one < 0.1 * full


def test_moe_imbalance_raises_step_time_only_with_expert_parallelism():
    ep = roofline("deepseek_r1", "ascend_910c", dp=32, ep=32)
    args = (0, 0.0, 0, 32 * 64, 32 * 64 * 4096)
    assert ep.step_time(*args, moe_imbalance=1.5) > ep.step_time(*args, moe_imbalance=1.0) * 1.02
    assert ep.breakdown(*args, 2.0)["ep_all_to_all"] > ep.breakdown(*args, 1.0)["ep_all_to_all"]
    tp = roofline("deepseek_r1", "ascend_910c", tp=8)
    assert tp.step_time(*args, moe_imbalance=1.5) == tp.step_time(*args, moe_imbalance=1.0)


def test_ep_all_to_all_grows_with_ep_and_jumps_past_the_node():
    per_rank = 64  # decode sequences per EP rank, held fixed
    a2a = []
    for ep in (2, 4, 8, 16, 32):
        cost = roofline("deepseek_r1", "h100", dp=ep, ep=ep)
        a2a.append(cost.breakdown(0, 0.0, 0, ep * per_rank, ep * per_rank * 2048)["ep_all_to_all"])
    assert all(x < y for x, y in zip(a2a, a2a[1:]))
    assert a2a[3] > 3 * a2a[2]  # 16 ranks leave the 8-GPU NVLink domain for 50 GB/s RDMA
    assert roofline("deepseek_r1", "h100", tp=8).breakdown(0, 0.0, 0, 64, 64 * 2048)["ep_all_to_all"] == 0.0


def test_comm_overlap_hides_communication_but_never_more_than_compute():
    args = (0, 0.0, 0, 16 * 96, 16 * 96 * 4096)
    plain = roofline("deepseek_r1", "ascend_910c", dp=16, ep=16)
    hidden = roofline("deepseek_r1", "ascend_910c", dp=16, ep=16, comm_overlap=1.0)
    parts = plain.breakdown(*args)
    compute = sum(parts[k] for k in ("dense_gemm", "lm_head", "prefill_attention", "decode_attention", "moe"))
    comm = parts["ep_all_to_all"] + parts["tp_all_reduce"]
    assert hidden.step_time(*args) == pytest.approx(plain.step_time(*args) - min(comm, compute))


def test_tensor_parallelism_cuts_step_time_of_big_gemms():
    prefill = [roofline("llama3_70b", "h100", tp=tp).prefill_time(8192) for tp in (1, 2, 4, 8)]
    decode = [roofline("llama3_70b", "h100", tp=tp).decode_time(1, 1000) for tp in (1, 2, 4, 8)]
    assert all(x > y for x, y in zip(prefill, prefill[1:]))
    assert all(x > y for x, y in zip(decode, decode[1:]))
    assert prefill[0] / prefill[3] > 4  # near-linear for compute-bound prefill despite the all-reduces
    assert roofline("llama3_70b", "h100", tp=4).breakdown(*chunk(8192), 0, 0)["tp_all_reduce"] > 0


def test_mla_latent_is_not_split_by_tensor_parallelism():
    args = (0, 0.0, 0, 64, 64 * 8192)
    tp1, tp8 = roofline("deepseek_r1", "h200", tp=1), roofline("deepseek_r1", "h200", tp=8)
    assert tp8.bounds(*args)["decode_attention"][1] == pytest.approx(tp1.bounds(*args)["decode_attention"][1])
    g1, g8 = roofline("llama3_70b", "h200", tp=1), roofline("llama3_70b", "h200", tp=8)
    assert g8.bounds(*args)["decode_attention"][1] == pytest.approx(g1.bounds(*args)["decode_attention"][1] / 8)


def test_engine_overhead_per_step_and_per_sequence():
    cost = roofline("tiny_llama", "cpu")
    hw = load("hardware", "cpu")
    parts = cost.breakdown(0, 0.0, 0, 100, 100 * 10)
    assert parts["overhead"] == pytest.approx(hw.step_overhead_s + 100 * hw.seq_overhead_s)
    assert roofline("tiny_llama", "cpu", overhead_s=0.0, seq_overhead_s=0.0).breakdown(0, 0.0, 0, 1, 1)[
        "overhead"] == 0.0


# ---- sanity against published figures (loose bands: a roofline with estimated efficiencies is meant to land within
# a factor of about two of real systems, not to reproduce them) ------------------------------------------------------
def test_llama3_8b_h100_decode_step_at_batch_1():
    """vLLM on one H100 decodes Llama-3-8B at batch 1 in about 6-10 ms per token (16 GB of weights per step)."""
    assert 0.006 <= roofline("llama3_8b", "h100").decode_time(1, 1000) <= 0.010


def test_deepseek_r1_prefill_throughput_per_h100_node():
    """DeepSeek reports ~73.7k input tokens/s per H800 node in prefill (cache hits included, all-to-all overlapped,
    H800 NVLink slower than H100's). Band: 0.5x-2x. Setup: DP8 attention + EP8, 4 prompts of 4096 per rank."""
    cost = roofline("deepseek_r1", "h100", dp=8, ep=8)
    tokens = 8 * 4 * 4096
    step = cost.step_time(tokens, 8 * 4 * 4096 * 4097 / 2, tokens, 0, 0)
    assert 0.5 * 73_700 <= tokens / step <= 2 * 73_700


def test_deepseek_r1_cloudmatrix_throughput_per_npu():
    """CloudMatrix384 (910C, EP320): decode ~1,943 tokens/s per NPU at TPOT < 50 ms, prefill ~6,688 tokens/s per NPU.
    Band 0.5x-2x (MTP, microbatch overlap and the exact die/chip accounting are not modelled). Decode context ~4k
    tokens (OmniInfer's 3.5k-in / 1.2k-out mix); the batch is the largest per NPU that keeps a step under 50 ms."""
    decode = roofline("deepseek_r1", "ascend_910c_cm384", dp=320, ep=320)
    batch = max(b for b in range(1, 513) if decode.decode_time(320 * b, 4096) <= 0.050)
    assert 0.5 * 1943 <= batch / decode.decode_time(320 * batch, 4096) <= 2 * 1943
    prefill = roofline("deepseek_r1", "ascend_910c_cm384", dp=16, ep=16)
    tokens = 16 * 4 * 4096
    step = prefill.step_time(tokens, 16 * 4 * 4096 * 4097 / 2, tokens, 0, 0)
    assert 0.5 * 6688 <= tokens / step / 16 <= 2 * 6688


# ---- the cost model's structure ----------------------------------------------------------------------------------
def random_steps(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        p, a, c = chunk(int(rng.integers(0, 8192)), int(rng.integers(0, 8192)))
        d = int(rng.integers(0, 512))
        if p == 0 and d == 0:
            continue
        yield (p, a, c if p else 0, d, d * int(rng.integers(1, 8192)), float(rng.uniform(1, 3)))


@pytest.mark.parametrize("model,hardware,kw", CONFIGS)
def test_smooth_roofline_lies_between_max_and_sum_of_compute_and_memory(model, hardware, kw):
    """Every roofline operator takes at least max(compute, memory) (the plain roofline: optimistic near the ridge
    point) and at most their sum (no overlap at all)."""
    cost = roofline(model, hardware, **kw)
    mb = cost.micro_batches  # with micro-batches every operator runs once per micro-batch of 1/mb of the work
    for args in random_steps(40, 2):
        parts, bounds = cost.breakdown(*args), cost.bounds(*(a / mb for a in args[:5]), args[5])
        scale = (cost.tokens_per_step if cost.mtp_tokens and args[3] and not args[0] else 1.0) / mb
        for op in ("dense_gemm", "lm_head", "prefill_attention", "moe"):
            c, m = bounds[op]
            assert max(c, m) * (1 - 1e-12) <= parts[op] * scale <= (c + m) * (1 + 1e-12), (op, args)


def test_roofline_smoothing_interpolates_between_the_roofline_and_no_overlap():
    model = load("model", "llama3_70b")
    hw = load("hardware", "h100")
    args = (0, 0.0, 0, 128, 128 * 1024)  # decode GEMMs near the BF16 ridge point: compute and memory alike
    times = {n: RooflineModel(model, replace(hw, roofline_smoothing=n)).breakdown(*args)["dense_gemm"]
             for n in (1.0, 2.0, 4.0, math.inf)}
    c, m = RooflineModel(model, hw).bounds(*args)["dense_gemm"]
    assert times[math.inf] == pytest.approx(max(c, m))
    assert times[1.0] == pytest.approx(c + m)
    assert times[2.0] == pytest.approx(math.hypot(c, m))
    assert times[1.0] > times[2.0] > times[4.0] > times[math.inf]


def test_every_kernel_pays_the_hardware_kernel_latency():
    model, hw = load("model", "deepseek_r1"), load("hardware", "h800")
    base = RooflineModel(model, replace(hw, kernel_latency_s=0.0))
    more = RooflineModel(model, replace(hw, kernel_latency_s=5e-6))
    for args in ((0, 0.0, 0, 1, 100), (*chunk(4096), 0, 0)):
        assert more.step_time(*args) - base.step_time(*args) == pytest.approx(more.kernels_per_step * 5e-6)
    # the fixed part per layer makes a one-sequence decode step cost more than streaming its weights
    assert base.kernels_per_step > model.layers * 10


def test_fixed_costs_weigh_most_in_small_batch_decode():
    """Per-kernel latencies, the engine's step overhead and the all-reduces' latency do not shrink with the batch:
    a larger share of a one-sequence decode step than of a 128-sequence one."""
    cost = roofline("llama2_70b", "a100", tp=2)

    def fixed_share(seqs: int) -> float:
        parts = cost.breakdown(0, 0.0, 0, seqs, seqs * 4096)
        return (parts["elementwise"] + parts["overhead"] + parts["tp_all_reduce"]) / sum(parts.values())

    assert fixed_share(1) > 0.05 and fixed_share(1) > fixed_share(128)


@pytest.mark.parametrize("model,hardware,kw", CONFIGS)
def test_decode_step_is_affine_in_context(model, hardware, kw):
    """The simulator sums a decode run of k steps in closed form, which needs step time affine in the batch's total
    context at a fixed batch; the smooth roofline keeps it so (compute and KV bytes both grow with the context)."""
    cost = roofline(model, hardware, **kw)
    for seqs in (1, 17, 256):
        t = [cost.step_time(0, 0.0, 0, seqs, ctx, 1.2) for ctx in (seqs * 100, seqs * 2100, seqs * 4100)]
        assert t[1] - t[0] == pytest.approx(t[2] - t[1], rel=1e-9)


def test_small_kernels_move_a_tp_ranks_share_at_the_elementwise_fraction():
    """Norms run on every TP rank's whole hidden vector; rope on its q heads and KV heads, activations on its slice
    of the FFN width (Vidur's A100 tables: those kernels shrink with TP, the norms do not); routed experts' on the
    experts a device holds. The traffic is read at elementwise_efficiency of HBM (0 = memory_efficiency)."""
    model, hw = load("model", "llama3_70b"), load("hardware", "h100")

    def traffic(spec, parallel, tokens=4096):  # bytes per token and layer the step's elementwise term charges
        cost = RooflineModel(model if parallel.ep == 1 else moe, spec, parallel)
        extra = cost.breakdown(tokens, float(tokens), tokens, 0, 0)["elementwise"] - \
            cost.kernels_per_step * spec.kernel_latency_s
        return extra / tokens * spec.elementwise_Bps / cost.model.layers

    moe = load("model", "deepseek_r1")
    norms = 2 * 4 * model.hidden * 2
    for tp in (1, 2, 8):
        rope = 2 * (model.heads / tp + model.kv_heads / min(tp, model.kv_heads)) * model.attention_head_dim * 2
        act = 3 * model.intermediate / tp * 2
        assert traffic(hw, Parallelism(tp=tp)) == pytest.approx(norms + rope + act)
    # two DP ranks halve each device's tokens
    assert traffic(hw, Parallelism(tp=2, dp=2)) == pytest.approx(traffic(hw, Parallelism(tp=2)) / 2)
    # MLA and MoE (tp 2 x dp 4, ep 8): the latents' norms and the one rope key on every rank, the shared expert's
    # activation on a TP slice of each DP rank's tokens, the routed ones on top_k / ep of all assignments
    m = moe
    per_rank = (2 * 4 * m.hidden + 2 * (m.q_lora_rank + m.kv_lora_rank) + 2 * (m.heads / 2 + 1) * m.qk_rope_head_dim) \
        * m.layers + 3 * (m.dense_layers * m.intermediate + m.moe_layers * m.shared_experts * m.expert_intermediate) / 2
    routed = 3 * m.moe_layers * m.top_k * m.expert_intermediate / 8
    assert traffic(hw, Parallelism(tp=2, dp=4, ep=8)) * m.layers == pytest.approx((per_rank / 4 + routed) * 2)
    slow = replace(hw, elementwise_efficiency=hw.memory_efficiency / 2)
    assert slow.elementwise_Bps == pytest.approx(hw.memory_Bps / 2) and hw.elementwise_Bps == hw.memory_Bps
    base = RooflineModel(model, hw, Parallelism(tp=2)).breakdown(4096, 4096.0, 4096, 0, 0)["elementwise"]
    halved = RooflineModel(model, slow, Parallelism(tp=2)).breakdown(4096, 4096.0, 4096, 0, 0)["elementwise"]
    fixed = RooflineModel(model, hw, Parallelism(tp=2)).kernels_per_step * hw.kernel_latency_s
    assert halved - fixed == pytest.approx(2 * (base - fixed))


def test_tp_all_reduce_is_alpha_beta_in_message_and_group_size():
    """Ring all-reduce: 2(n-1) steps of latency alpha plus a base per collective, and 2(n-1)/n of the message over
    the link's bus bandwidth (bus_efficiency of its peak); two per layer."""
    model, hw = load("model", "llama3_70b"), load("hardware", "h100")
    def ar(tp, tokens, spec=hw):
        return RooflineModel(model, spec, Parallelism(tp=tp)).breakdown(0, 0.0, 0, tokens, tokens * 10)[
            "tp_all_reduce"]
    for tp in (2, 4, 8):
        intercept = 2 * model.layers * (hw.collective_base_s + 2 * (tp - 1) * hw.link_latency_s)
        slope = 2 * model.layers * 2 * (tp - 1) / tp * model.hidden * 2 / (hw.intra_node_GBps * 1e9 * hw.bus_efficiency)
        assert ar(tp, 1) == pytest.approx(intercept + slope)
        assert ar(tp, 4096) == pytest.approx(intercept + 4096 * slope)
    small = [ar(tp, 1) for tp in (2, 4, 8)]  # latency grows with the ring's steps
    assert small[0] < small[1] < small[2]
    slow = replace(hw, bus_efficiency=hw.bus_efficiency / 2)
    assert ar(8, 4096, slow) - ar(8, 1, slow) == pytest.approx(2 * (ar(8, 4096) - ar(8, 1)))
    # past the node the ring runs at the scale-out link with the network's alpha
    assert ar(16, 4096) > 3 * ar(8, 4096)


def test_tp_all_reduce_takes_the_bandwidth_path_from_the_bulk_size_per_rank():
    """From bulk_allreduce_bytes per rank (each rank's tokens x hidden x 2 bytes) a TP all-reduce inside a node is
    charged the bulk coefficients, below it the latency path's; across nodes, and with bulk 0, one path."""
    from omnisim.cost.roofline import all_reduce_s

    model = load("model", "llama3_70b")
    hw = replace(load("hardware", "h100"), bulk_allreduce_bytes=8 * 2 ** 20, bulk_collective_base_s=40e-6,
                 bulk_link_latency_s=3e-6, bulk_bus_efficiency=0.6)
    switch = 8 * 2 ** 20 // (model.hidden * 2)  # tokens per rank whose message is 8 MiB: 512 at hidden 8192
    for tp, dp in ((2, 1), (8, 1), (4, 2)):
        cost = RooflineModel(model, hw, Parallelism(tp=tp, dp=dp))
        for tokens in (1, switch - 1, switch, 4 * switch):
            got = cost.breakdown(tokens * dp, float(tokens * dp), tokens * dp, 0, 0)["tp_all_reduce"]
            message = tokens * model.hidden * 2
            assert got == pytest.approx(2 * model.layers * all_reduce_s(hw, tp, message))
            steps = 2 * (tp - 1)
            base, alpha, eff = (hw.collective_base_s, hw.link_latency_s, hw.bus_efficiency) if tokens < switch \
                else (40e-6, 3e-6, 0.6)
            assert all_reduce_s(hw, tp, message) == pytest.approx(
                base + steps * alpha + steps / tp * message / (hw.intra_node_GBps * 1e9 * eff))
        # the step itself jumps by the two paths' difference at the switch (the rest of the step is smooth)
        cost1 = RooflineModel(model, replace(hw, bulk_allreduce_bytes=0.0), Parallelism(tp=tp, dp=dp))
        extra = [cost.step_time(t * dp, float(t * dp), t * dp, 0, 0) - cost1.step_time(t * dp, float(t * dp),
                                                                                      t * dp, 0, 0)
                 for t in (switch - 1, switch)]
        assert extra[0] == pytest.approx(0.0, abs=1e-12) and extra[1] > 2 * model.layers * 30e-6
    # across nodes the network's coefficients, whatever the size
    plain = replace(hw, bulk_allreduce_bytes=0.0)
    assert all_reduce_s(hw, 16, 64 * 2 ** 20) == all_reduce_s(plain, 16, 64 * 2 ** 20)
    assert all_reduce_s(hw, 1, 64 * 2 ** 20) == 0.0


def test_moe_with_tp_and_one_dp_rank_dispatches_only_when_asked():
    """vLLM's rule (moe_dispatch=auto): with one DP rank every TP rank holds every token and the TP all-reduce after
    the MoE sums the experts' outputs, so no dispatch/combine is charged (the busiest EP rank still computes its
    share); with attention DP the tokens are dispatched; moe_dispatch=all_to_all dispatches whenever ep > 1."""
    model, hw = load("model", "deepseek_r1"), load("hardware", "h100")
    def parts(parallel, **kw):
        return RooflineModel(model, hw, parallel, **kw).breakdown(4096, 4096.0, 4096, 0, 0, 1.3)
    auto, a2a = parts(Parallelism(tp=8, ep=8)), parts(Parallelism(tp=8, ep=8), moe_dispatch="all_to_all")
    assert auto["ep_all_to_all"] == 0.0 < a2a["ep_all_to_all"]
    assert auto["tp_all_reduce"] == a2a["tp_all_reduce"] > 0 and auto["moe"] == a2a["moe"]
    balanced = RooflineModel(model, hw, Parallelism(tp=8, ep=8)).breakdown(4096, 4096.0, 4096, 0, 0, 1.0)
    assert auto["moe"] > balanced["moe"]  # the busiest EP rank's load still counts
    assert parts(Parallelism(tp=8, ep=8)) == auto
    dp = parts(Parallelism(tp=2, dp=4, ep=8))
    assert dp["ep_all_to_all"] > 0 and dp == parts(Parallelism(tp=2, dp=4, ep=8), moe_dispatch="all_to_all")
    with pytest.raises(ValueError, match="moe_dispatch must be one of auto, all_to_all"):
        RooflineModel(model, hw, Parallelism(tp=8, ep=8), moe_dispatch="deepep")


def test_ep_all_to_all_is_alpha_beta_with_bus_efficiency():
    model, hw = load("model", "deepseek_r1"), load("hardware", "h800")
    def a2a(spec, tokens):
        return RooflineModel(model, spec, Parallelism(dp=32, ep=32)).breakdown(0, 0.0, 0, tokens, tokens)[
            "ep_all_to_all"]
    latency = 2 * model.moe_layers * (hw.collective_base_s + hw.net_latency_s)
    per_token = a2a(hw, 1001) - a2a(hw, 1000)
    assert a2a(hw, 1000) == pytest.approx(latency + 1000 * per_token)
    half = replace(hw, a2a_efficiency=hw.a2a_efficiency / 2)
    assert a2a(half, 1001) - a2a(half, 1000) == pytest.approx(2 * per_token)


def test_mtp_verifies_k_plus_one_tokens_and_yields_the_expected_accepted_tokens():
    model, hw = load("model", "deepseek_r1"), load("hardware", "h800")
    par = Parallelism(dp=8, ep=8)
    plain = RooflineModel(model, hw, par)
    for k, a in ((1, 0.875), (2, 0.7), (3, 0.5)):
        mtp = RooflineModel(model, hw, par, mtp_tokens=k, mtp_acceptance=a)
        assert mtp.tokens_per_step == pytest.approx((1 - a ** (k + 1)) / (1 - a))
        args = (0, 0.0, 0, 8 * 16, 8 * 16 * 2048)
        verify = mtp.verify_time(*args)
        assert verify > plain.step_time(*args)  # k + 1 tokens through the model plus the draft module
        assert mtp.step_time(*args) == pytest.approx(verify / mtp.tokens_per_step)  # charged per accepted token
        assert mtp.bounds(*args)["dense_gemm"][0] == pytest.approx((k + 1) * plain.bounds(*args)["dense_gemm"][0])
        # a step with prefill is charged in full (the engine advances its decodes one token)
        mixed = (*chunk(512), 8 * 16, 8 * 16 * 2048)
        assert mtp.step_time(*mixed) == mtp.verify_time(*mixed) > plain.step_time(*mixed)
    # memory-bound small batches gain (TPOT falls); a rejected draft is pure cost
    assert RooflineModel(model, hw, par, mtp_tokens=1, mtp_acceptance=0.875).decode_time(8, 2048) < \
        plain.decode_time(8, 2048)
    assert RooflineModel(model, hw, par, mtp_tokens=1, mtp_acceptance=0.0).decode_time(8, 2048) > \
        plain.decode_time(8, 2048)


def test_micro_batches_pipeline_communication_at_the_cost_of_rereading_weights():
    """m micro-batches: a two-stage pipeline of compute C and communication K, max(C, K) + min(C, K) / m, where C
    sums the micro-batches' compute (each reads the weights and launches the kernels again)."""
    model, hw, par = load("model", "deepseek_v3"), load("hardware", "h800"), Parallelism(dp=32, ep=32)
    one = RooflineModel(model, hw, par)
    two = RooflineModel(model, hw, par, micro_batches=2)
    for args in ((*chunk(32 * 8192), 0, 0), (0, 0.0, 0, 32 * 128, 32 * 128 * 4096)):
        half = tuple(a / 2 for a in args)
        parts = one.breakdown(*half)
        compute = 2 * sum(v for k, v in parts.items() if k not in COMM_OPS + ("overhead",))
        comm = 2 * sum(parts[k] for k in COMM_OPS)
        expected = max(compute, comm) + min(compute, comm) / 2 + one.breakdown(*args)["overhead"]
        assert two.step_time(*args) == pytest.approx(expected, rel=1e-9)
        assert two.step_time(*args) == pytest.approx(sum(two.breakdown(*args).values()), rel=1e-12)
    # large prefill: hiding the all-to-all pays; one decode sequence: reading the weights twice does not
    assert two.prefill_time(8192 * 32) < one.prefill_time(8192 * 32)
    assert two.decode_time(32, 1024) > one.decode_time(32, 1024)


def test_cpu_profile_stays_calibrated_to_the_committed_vllm_cpu_table():
    """conf/hardware/cpu.yaml is fitted to conf/cost/tables/vllm_cpu_tiny_llama.csv (benchmarks/cost_calibration.py):
    the roofline's median error over its rows stays small and decode (engine-overhead bound) is close."""
    table = CONF / "cost" / "tables" / "vllm_cpu_tiny_llama.csv"
    lines = [ln for ln in table.read_text().splitlines() if ln and not ln.startswith("#")]
    header, rows = lines[0].split(","), [dict(zip(lines[0].split(","), map(float, ln.split(",")))) for ln in lines[1:]]
    assert header[-1] == "step_s"
    cost = roofline("tiny_llama", "cpu")
    errors = [cost.step_time(int(r["prefill_tokens"]), r["prefill_attention"], int(r["prefill_context"]),
                             int(r["decode_seqs"]), int(r["decode_context"])) / r["step_s"] - 1 for r in rows]
    decode = [abs(e) for e, r in zip(errors, rows) if r["prefill_tokens"] == 0]
    assert float(np.median(np.abs(errors))) < 0.2
    assert float(np.median(decode)) < 0.1


# ---- KV capacity ---------------------------------------------------------------------------------------------------
def test_kv_capacity_from_memory_left_after_weights():
    model, hw = load("model", "llama3_8b"), load("hardware", "h100")
    free = (80 * 0.9 - hw.reserved_GB) * 1e9 - model.weight_bytes
    assert kv_capacity_tokens(model, hw, Parallelism(), 0.9) == int(free // 131_072)
    # TP halves the weights per device and splits the KV heads, so capacity more than doubles
    assert kv_capacity_tokens(model, hw, Parallelism(tp=2), 0.9) > 2 * kv_capacity_tokens(model, hw, Parallelism(), 0.9)
    one = kv_capacity_tokens(model, hw, Parallelism(), 0.9)
    assert kv_capacity_tokens(model, hw, Parallelism(dp=2), 0.9) == 2 * one


def test_kv_capacity_shards_experts_over_ep_and_keeps_mla_whole():
    model, hw = load("model", "deepseek_r1"), load("hardware", "ascend_910c")
    assert weight_bytes_per_device(model, Parallelism(dp=8, ep=8)) == pytest.approx(
        (model.total_params - model.routed_expert_params + model.routed_expert_params / 8) * model.dtype_bytes)
    tp8 = kv_capacity_tokens(model, hw, Parallelism(tp=8))
    dp8 = kv_capacity_tokens(model, hw, Parallelism(dp=8, ep=8))
    assert dp8 > 3 * tp8  # DeepSeek's reason for DP attention: TP replicates the MLA latent on every rank


def test_kv_capacity_errors_when_weights_do_not_fit():
    with pytest.raises(ValueError, match=r"deepseek_r1.*a100"):
        kv_capacity_tokens(load("model", "deepseek_r1"), load("hardware", "a100"), Parallelism(), 0.9)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_capacity_tokens(load("model", "llama3_8b"), load("hardware", "h100"), Parallelism(), 1.5)
    assert kv_capacity_tokens(load("model", "tiny_llama"), load("hardware", "cpu"), Parallelism(), 0.9) > 1_000_000
