"""MoeRuntime: the imbalance the simulator applies, rebalancing, and the weight moves behind it."""
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from omnisim.app import build_experiment
from omnisim.metrics import summarize
from omnisim.moe import MoeRuntime, RebalanceConfig, UniformLoad, ZipfLoad
from omnisim.policies.placement import (DeepSeekEplb, MigrationAwarePlacement, OmniPlacementStatic,
                                        PredictivePlacement, StaticPlacement)
from omnisim.policies.placement.layout import contiguous_layout

LAYERS, EXPERTS, TOP_K, EP = 6, 64, 4, 16          # 64 experts + 16 redundant = 80 slots, 5 per rank
EXPERT_BYTES = 5e8                                  # 0.01 s per move over 50 GB/s


def runtime(load=None, policy=None, seed=0, **rebalance):
    cfg = RebalanceConfig(num_redundant_experts=16, **rebalance)
    return MoeRuntime.for_ep(LAYERS, EXPERTS, TOP_K, EP, load or ZipfLoad(1.0, seed=1), policy or StaticPlacement(),
                             cfg, EXPERT_BYTES, seed=seed)


def drive(rt, until_s, dt, tokens=256, steps=1):
    out, t = [], 0.0
    while t < until_s:
        factor, stall = rt.step(t, tokens, steps)
        out.append((t, factor, stall, rt.placement.phy2log.copy()))
        t += dt + stall
    return out


def test_imbalance_reflects_skew_and_batch_size():
    skewed, flat = runtime(ZipfLoad(1.0, seed=1)), runtime(UniformLoad())
    assert skewed.step(0.0, 4096)[0] > 1.5
    assert flat.step(0.0, 8192)[0] < 1.1                           # only counting noise is left
    assert flat.step(0.0, 2)[0] > flat.step(0.0, 512)[0] > flat.step(0.0, 8192)[0]
    assert skewed.step(0.0, 0) == (1.0, 0.0)


def test_one_expert_per_rank_leaves_a_whole_expert_on_the_busiest_rank():
    """EP over as many ranks as slots (CloudMatrix's EP320): with every expert equally popular, replicas only halve
    the replicated experts, so the busiest rank keeps an unreplicated one: at least slots / experts of the mean."""
    rt = MoeRuntime.for_ep(LAYERS, EXPERTS, TOP_K, EXPERTS + 16, UniformLoad(), DeepSeekEplb(),
                           RebalanceConfig(num_redundant_experts=16), EXPERT_BYTES)
    large = rt.step(0.0, 65536)[0]
    assert 80 / 64 <= large < 80 / 64 * 1.1
    assert rt.step(0.0, 64)[0] > rt.step(0.0, 1024)[0] > large


def test_sampled_mode_draws_every_step_around_the_expectation():
    cfg = RebalanceConfig(num_redundant_experts=16)
    sampled = MoeRuntime.for_ep(LAYERS, EXPERTS, TOP_K, EP, ZipfLoad(1.0, seed=1), StaticPlacement(), cfg,
                                EXPERT_BYTES, sampling="sampled")
    draws = [sampled.step(0.0, 256)[0] for _ in range(200)]
    assert len(set(draws)) > 20                                    # a fresh draw per step
    expected = runtime(ZipfLoad(1.0, seed=1)).step(0.0, 256)[0]
    assert abs(np.mean(draws) / expected - 1) < 0.05
    assert sampled.step(0.0, 256, steps=8)[0] == sampled.step(0.0, 256, steps=8)[0]  # bulk steps: the expectation


def test_results_are_fixed_by_the_seed():
    def run(seed):
        rt = runtime(policy=DeepSeekEplb(), seed=seed, period_s=1.0, warm_start=False)
        return [(f, s) for _, f, s, _ in drive(rt, 3.0, 0.01, tokens=100)], rt.tables()["moe_moves"]
    (a, moves_a), (b, moves_b) = run(7), run(7)
    assert a == b and moves_a.equals(moves_b)
    assert run(8)[0] != a


@pytest.mark.parametrize("dt", [0.004, 0.05])       # time-bound (fast steps) and step-bound (slow steps)
def test_never_serves_a_slot_before_its_weights_arrive(dt):
    rt = runtime(policy=DeepSeekEplb(), period_s=1.0, warm_start=False, moves_per_rank_per_step=1)
    start = contiguous_layout(LAYERS, EXPERTS, rt.topology)
    trace = drive(rt, 1.99, dt)                     # exactly one rebalance, at t = 1.0
    moves = rt.tables()["moe_moves"]
    applied = moves[moves["applied_s"].notna()]
    assert len(applied) > 0
    assert (applied["applied_s"] >= applied["transfer_done_s"] - 1e-9).all()
    assert (applied["steps_since_decision"] >= applied["queue_position"] + 1).all()   # N = 1 per rank per step
    for t, _, _, served in trace:
        expected = start.copy()
        landed = moves[moves["applied_s"] <= t]
        expected[landed["layer"], landed["slot"]] = landed["new_expert"]
        assert np.array_equal(served, expected)
        assert (np.bincount((served + np.arange(LAYERS)[:, None] * EXPERTS).ravel(),
                            minlength=LAYERS * EXPERTS) > 0).all()   # every expert served at every step


def test_synchronous_rebalance_stalls_for_the_transfer():
    rt = runtime(policy=DeepSeekEplb(), period_s=1.0, warm_start=False, asynchronous=False,
                 moves_per_rank_per_step=0)
    trace = drive(rt, 1.5, 0.01)
    stalls = [(t, s) for t, _, s, _ in trace if s > 0]
    assert len(stalls) == 1 and stalls[0][0] >= 1.0
    row = rt.tables()["moe_rebalances"].iloc[0]
    assert math.isclose(stalls[0][1], row["max_moves_per_rank"] * 0.01)
    moves = rt.tables()["moe_moves"]
    assert np.allclose(moves["applied_s"], stalls[0][0] + stalls[0][1])
    assert rt.summary()["moe_stall_s"] == pytest.approx(stalls[0][1])


def test_synchronous_moves_limited_per_step_stall_every_step():
    rt = runtime(policy=DeepSeekEplb(), period_s=1.0, warm_start=False, asynchronous=False,
                 moves_per_rank_per_step=2)
    trace = drive(rt, 1.5, 0.01)
    stalls = [s for t, _, s, _ in trace if s > 0]
    queue = rt.tables()["moe_rebalances"].iloc[0]["max_moves_per_rank"]
    assert len(stalls) == math.ceil(queue / 2) and max(stalls) == pytest.approx(0.02)


def test_rebalancing_cuts_imbalance_against_static():
    static = runtime(ZipfLoad(1.0, seed=1))
    balanced = runtime(ZipfLoad(1.0, seed=1), policy=MigrationAwarePlacement(expert_bytes=EXPERT_BYTES),
                       period_s=1.0, warm_start=False)
    drive(balanced, 3.0, 0.01)
    assert not balanced.migrating
    assert balanced.step(3.0, 4096)[0] < 0.75 * static.step(3.0, 4096)[0]
    table = balanced.tables()["moe_balancedness"]
    overall = table[table["layer"] == -1]
    assert overall["max_over_mean"].iloc[-1] < overall["max_over_mean"].iloc[0]
    assert set(table["layer"]) == set(range(-1, LAYERS))


def test_a_rebalance_waits_for_the_previous_moves():
    rt = runtime(policy=DeepSeekEplb(), period_s=0.05, warm_start=False, moves_per_rank_per_step=1)
    drive(rt, 0.3, 0.05)
    statuses = rt.tables()["moe_rebalances"]["status"].tolist()
    assert statuses[0] == "applied" and "busy" in statuses


def test_step_based_period_and_window():
    rt = runtime(policy=DeepSeekEplb(), period_steps=50, window_steps=20, warm_start=False, asynchronous=False,
                 moves_per_rank_per_step=0)
    trace = drive(rt, 1.8, 0.01)
    rows = rt.tables()["moe_rebalances"]
    calls = [t for t, *_ in trace]
    assert rows["time_s"].tolist()[:2] == [calls[50], calls[100]]    # after 50 and 100 steps
    assert (rows["window_tokens"] == 20 * 256).all()


def test_warm_start_uses_the_policy_on_the_load_profile():
    cold = runtime(policy=OmniPlacementStatic(), warm_start=False)
    warm = runtime(policy=OmniPlacementStatic(), warm_start=True)
    assert np.array_equal(cold.placement.phy2log, contiguous_layout(LAYERS, EXPERTS, cold.topology))
    assert warm.step(0.0, 4096)[0] < cold.step(0.0, 4096)[0]


def test_each_runtime_gets_its_own_copy_of_a_stateful_policy():
    policy = PredictivePlacement()
    a = runtime(policy=policy, period_s=1.0)
    runtime(policy=policy, period_s=1.0)
    drive(a, 2.5, 0.05)
    assert policy._level is None and a.policy is not policy


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="do not divide over ep=24"):
        MoeRuntime.for_ep(LAYERS, EXPERTS, TOP_K, 24, UniformLoad(), StaticPlacement(),
                          RebalanceConfig(num_redundant_experts=16), EXPERT_BYTES)
    with pytest.raises(ValueError, match="top_k"):
        MoeRuntime.for_ep(LAYERS, EXPERTS, 65, EP, UniformLoad(), StaticPlacement(),
                          RebalanceConfig(num_redundant_experts=16), EXPERT_BYTES)
    with pytest.raises(ValueError, match="sampling"):
        MoeRuntime.for_ep(LAYERS, EXPERTS, TOP_K, EP, UniformLoad(), StaticPlacement(),
                          RebalanceConfig(num_redundant_experts=16), EXPERT_BYTES, sampling="exact")


def test_tables_and_summary():
    rt = runtime(policy=DeepSeekEplb(), period_s=1.0, warm_start=False)
    drive(rt, 2.5, 0.01, tokens=64, steps=4)
    tables = rt.tables()
    assert set(tables) == {"moe_balancedness", "moe_moves", "moe_rebalances"}
    assert {"decided_s", "transfer_done_s", "applied_s", "layer", "slot", "rank", "old_expert", "new_expert",
            "bytes"} <= set(tables["moe_moves"].columns)
    assert (tables["moe_moves"]["bytes"] == EXPERT_BYTES).all()
    summary = rt.summary()
    assert summary["moe_rebalances"] >= 1 and summary["moe_moves"] == len(tables["moe_moves"])
    assert summary["moe_imbalance_mean"] > 1.0


def simulate_r1(*overrides: str):
    """OmniInfer's 7P8-1D32 DeepSeek-R1 deployment, 100 requests, skewed expert load: (summary, backend extras)."""
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["name=test", "experiment=omniinfer_r1_7p1d", "workload.max_requests=100",
                                           "expert_load=zipf", "expert_load.exponent=0.9", *overrides])
    experiment, backend = build_experiment(cfg)
    backend.progress = False
    result = backend.run(experiment, None)
    return summarize(result.records, experiment.slo), result.extra


def test_placement_reaches_the_simulated_step_times():
    static, static_extra = simulate_r1("placement=static", "rebalance=none")
    placed, placed_extra = simulate_r1("placement=omni_placement_static", "rebalance=none")
    for instance in ("prefill-0", "decode-0"):   # EP8 prefill, EP32 decode
        assert placed_extra[f"moe_imbalance_mean.{instance}"] < 0.8 * static_extra[f"moe_imbalance_mean.{instance}"]
    assert placed["tpot_s"]["mean"] < static["tpot_s"]["mean"]  # the max-loaded rank sets the MoE layer time
    assert static_extra["moe_moves.decode-0"] == 0
    _, vllm_extra = simulate_r1("placement=deepseek_eplb", "rebalance=vllm")  # synchronous: moves stall serving
    assert vllm_extra["moe_moves.decode-0"] > 0 and vllm_extra["moe_stall_s.decode-0"] > 0
