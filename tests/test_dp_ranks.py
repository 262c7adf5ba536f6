"""DP ranks as separate engine cores (cluster dp_mode=ranks): each rank its own queue, limits and KV; requests to
the rank with the least 4 * waiting + running; every step waits for the slowest rank; runs of decode steps in closed
form equal one event per step; the roofline splits rank-local from shared (MoE) work; the proxy's prefix index sees
the union of the ranks' caches; bad setups fail naming the field."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import simpy
from hydra.utils import instantiate

from omnisim.cluster import ClusterSpec, InstanceGroup
from omnisim.core import Request, Role
from omnisim.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from omnisim.app import compose_option
from omnisim.cost import Parallelism, RooflineModel
from omnisim.sim import Simulation
from omnisim.engine.dp_ranks import CacheUnion, rank_step_times
from omnisim.sim.dp_instance import DPInstance
from tests.sim_fixtures import AffineCost, Listed, Workload, experiment


def ranks_group(dp=4, **kw) -> InstanceGroup:
    kw = {"kv_capacity_tokens": 4 * 100_000, "max_model_len": 8192, "max_num_seqs": 64, **kw}
    return InstanceGroup(dp=dp, dp_mode="ranks", **kw)


def run(exp, **kw):
    sim = Simulation(exp, **kw)
    return sim, sim.run()


def assert_same_records(a: pd.DataFrame, b: pd.DataFrame) -> None:
    times = [c for c in a if c.endswith("_s")]
    pd.testing.assert_frame_equal(a.drop(columns=times), b.drop(columns=times))
    for col in times:
        np.testing.assert_allclose(a[col], b[col], rtol=1e-9, atol=1e-9, err_msg=col)


# -- exactness of the closed-form runs -----------------------------------------------------------------------------
@pytest.mark.parametrize("cluster", [
    ClusterSpec(mixed=ranks_group(count=2)),
    ClusterSpec(prefill=ranks_group(dp=2), decode=ranks_group(dp=4, kv_capacity_tokens=4 * 30_000)),
], ids=["colocated", "pd-tight-decode"])
def test_decode_runs_of_synchronised_ranks_equal_one_event_per_step(cluster):
    wl = Workload(n=200, rate=12, prompt=(20, 3000), output=(1, 500))
    fast_sim, fast = run(experiment(cluster, wl))
    exact = run(experiment(cluster, wl), max_run_steps=1)[1]
    assert (fast.records.status == "ok").all() and len(fast.records) == 200
    assert_same_records(fast.records, exact.records)
    # runs were really longer than one step, and work really spread over the ranks
    assert fast.instances.steps.sum() == exact.instances.steps.sum()
    dp = fast_sim.instances[-1]
    assert isinstance(dp, DPInstance) and all(r.decode_tokens_done > 0 for r in dp.ranks)
    assert not dp.rank_of and all(r.idle for r in dp.ranks)


def test_every_step_waits_for_the_slowest_rank():
    # dp=2: r0 (100-token prompt) starts alone on rank 0; r1 (2000 tokens) arrives meanwhile and goes to rank 1.
    # Rank 0's decode steps are then synchronised with rank 1's long prefill.
    cluster = ClusterSpec(mixed=ranks_group(dp=2))
    res = run(experiment(cluster, Listed((0.0, 100, 3), (0.001, 2000, 3))))[1]
    r = res.records.set_index("request_id")
    cost = AffineCost()

    def step(*ranks):
        return max(rank_step_times(cost, 2, list(ranks), 1.0))

    t1 = step((100, 100 * 50.5, 100, 0, 0))
    t2 = step((0, 0.0, 0, 1, 101), (2000, 2000 * 1000.5, 2000, 0, 0))
    t3 = step((0, 0.0, 0, 1, 102), (0, 0.0, 0, 1, 2001))
    assert t2 == cost.step_time(4000, 2 * 2000 * 1000.5, 4000, 0, 0)  # rank 1's prefill, as if on both ranks
    assert r.loc["r0", "first_token_s"] == pytest.approx(t1, rel=1e-12)
    assert r.loc["r1", "first_token_s"] == pytest.approx(t1 + t2, rel=1e-12)
    assert r.loc["r0", "finish_s"] == pytest.approx(t1 + t2 + t3, rel=1e-12)


# -- vLLM's DP load balancer and per-rank limits -------------------------------------------------------------------
def test_requests_go_to_the_rank_with_the_least_four_waiting_plus_running():
    from omnisim.engine import Sequence

    cluster = ClusterSpec(mixed=ranks_group(dp=3))
    sim = Simulation(experiment(cluster, Listed()))
    inst = sim.instances[0]
    seqs = [Sequence(Request(f"q{i}", 0.0, 500, 5000), 16) for i in range(9)]  # none finishes in this test
    for s in seqs[:3]:
        inst.submit(s)  # idle ranks: each takes one in turn (a waiting request counts 4)
    assert [inst.rank_of[s.id] for s in seqs[:3]] == inst.ranks
    for s, r in zip(seqs[3:7], (0, 0, 2, 2)):  # placed by hand: ranks 0 and 2 run three each
        inst.ranks[r].submit(s)
    inst._wake()  # the run of decode steps in flight ends at its next step, where the ranks admit them
    sim.env.run(until=1.0)
    assert [len(r.running) for r in inst.ranks] == [3, 1, 3]
    inst.ranks[1].submit(seqs[7])  # rank 1: one running, one waiting (score 5, but the fewest requests)
    inst.submit(seqs[8])
    assert inst.rank_of["q8"] is inst.ranks[0]  # score 3 (the first of the least)


def test_max_num_seqs_is_per_rank_and_a_request_waits_for_its_own_rank():
    # dp=2, one seat per rank: three long requests; the third waits for the rank it was given (rank 0, whose
    # waiting-plus-running score ties with rank 1's), even if rank 1 frees first.
    cluster = ClusterSpec(mixed=ranks_group(dp=2, max_num_seqs=1))
    sim, res = run(experiment(cluster, Listed((0.0, 200, 400), (0.0, 200, 50), (0.01, 200, 50))))
    r = res.records.set_index("request_id")
    assert r.loc["r2", "prefill_start_s"] >= r.loc["r0", "finish_s"] - 1e-9
    assert r.loc["r1", "finish_s"] < r.loc["r2", "prefill_start_s"]
    assert sim.instances[0].state().max_num_seqs == 2


def test_each_rank_holds_its_share_of_the_kv():
    cluster = ClusterSpec(mixed=ranks_group(dp=4, kv_capacity_tokens=4 * 16_000, max_model_len=8192))
    sim = Simulation(experiment(cluster, Listed()))
    inst = sim.instances[0]
    assert [r.bm.num_blocks for r in inst.ranks] == [1000] * 4
    assert inst.state().kv_capacity_tokens == 64_000
    with pytest.raises(ValueError, match=r"cluster.mixed: the KV cache holds 2000 tokens per DP rank"):
        Simulation(experiment(ClusterSpec(mixed=ranks_group(dp=4, kv_capacity_tokens=8000, max_model_len=4096)),
                              Listed()))


def test_split_mode_is_unchanged_and_dp1_ranks_is_the_plain_instance():
    wl = Workload(n=80, rate=8)
    split = run(experiment(ClusterSpec(mixed=InstanceGroup(dp=4, kv_capacity_tokens=400_000,
                                                           max_model_len=8192)), wl))
    assert type(split[0].instances[0]).__name__ == "Instance"
    one = run(experiment(ClusterSpec(mixed=ranks_group(dp=1, kv_capacity_tokens=100_000)), wl))
    plain = run(experiment(ClusterSpec(mixed=InstanceGroup(kv_capacity_tokens=100_000, max_model_len=8192,
                                                           max_num_seqs=64)), wl))
    assert type(one[0].instances[0]).__name__ == "Instance"
    assert_same_records(one[1].records, plain[1].records)


# -- the roofline's split of rank-local and shared work -------------------------------------------------------------
def roofline(dp=32, ep=32, **kw) -> RooflineModel:
    return RooflineModel(instantiate(compose_option("model", "deepseek_r1")),
                         instantiate(compose_option("hardware", "ascend_910c")), Parallelism(dp=dp, ep=ep), **kw)


@pytest.mark.parametrize("kw", [{}, {"micro_batches": 2}, {"mtp_tokens": 1, "mtp_acceptance": 0.8}])
def test_equal_ranks_cost_what_the_even_split_costs(kw):
    cost = roofline(**kw)
    for n, ctx in [(1, 100), (16, 16 * 2000), (128, 128 * 700)]:
        times = cost.rank_step_times([(0, 0.0, 0, n, ctx)] * 32, 1.3)
        assert times == pytest.approx([cost.step_time(0, 0.0, 0, 32 * n, 32 * ctx, 1.3)] * 32, rel=1e-12)


def test_uneven_ranks_wait_for_the_slowest_and_share_the_experts():
    cost = roofline()
    even = cost.step_time(0, 0.0, 0, 32 * 16, 32 * 16 * 1000)
    # the same 512 sequences, one rank holding twice its share: slower than the even split
    uneven = [(0, 0.0, 0, 32, 32 * 1000)] + [(0, 0.0, 0, 15, 15 * 1000)] * 30 + [(0, 0.0, 0, 14, 14 * 1000)]
    assert max(cost.rank_step_times(uneven)) > even
    # the slowest rank alone is cheaper than every rank holding its batch (the experts compute only real tokens)
    alone = cost.rank_step_times([(0, 0.0, 0, 32, 32 * 1000)])[0]
    assert alone < cost.step_time(0, 0.0, 0, 32 * 32, 32 * 32 * 1000)
    # a prefilling rank makes the step a prefill step for the ranks decoding beside it
    mixed = cost.rank_step_times([(2048, 2048 * 1024.5, 2048, 0, 0), (0, 0.0, 0, 16, 16 * 1000)])
    assert mixed[0] > mixed[1] > cost.rank_step_times([(0, 0.0, 0, 16, 16 * 1000)])[0]


# -- the proxy's view of the ranks' caches -------------------------------------------------------------------------
def test_the_prefix_index_sees_a_block_while_any_rank_caches_it():
    seen = []
    union = CacheUnion(lambda events: seen.append(list(events)), 2)
    r0, r1 = union.rank(0), union.rank(1)
    r0([BlockStored((1, 2), None, 16)])
    r1([BlockStored((2, 3), 1, 16)])
    assert seen == [[BlockStored((1, 2), None, 16)], [BlockStored((3,), 1, 16)]]
    r0([BlockRemoved((2,))])
    assert len(seen) == 2  # rank 1 still holds block 2
    r1([AllBlocksCleared()])
    assert seen[-1] == [BlockRemoved((2, 3))] or sorted(seen[-1][0].block_hashes) == [2, 3]
    r0([BlockRemoved((1, 9))])
    assert seen[-1] == [BlockRemoved((1,))]


def test_prefix_hits_need_the_rank_that_cached_the_prefix():
    # Four requests sharing one long prefix on a dp=2 instance, each arriving while those before it decode: r1 goes
    # to the idle rank 1 (vLLM's balancer ignores the cache) and computes the prefix again, where one scheduler
    # would have reused r0's.
    reqs = [Request(f"r{i}", t, 2048, 400, tuple(range(4)), 512) for i, t in enumerate((0.0, 1.0, 1.001, 2.0))]

    class Same:
        def requests(self):
            return iter(reqs)

    ranks = run(experiment(ClusterSpec(mixed=ranks_group(dp=2)), Same()))[1].records
    split = run(experiment(ClusterSpec(mixed=InstanceGroup(dp=2, kv_capacity_tokens=400_000, max_model_len=8192)),
                           Same()))[1].records
    assert (split.cached_tokens > 0).sum() == 3
    assert (ranks.cached_tokens > 0).sum() == 2


# -- bad setups ----------------------------------------------------------------------------------------------------
def test_bad_dp_mode_and_unsupported_combinations_fail_naming_the_field():
    with pytest.raises(ValueError, match="cluster: dp_mode must be one of split, ranks, got 'rank'"):
        InstanceGroup(dp=2, dp_mode="rank")
    g = ranks_group(dp=2)
    assert g.engine_cores == 2 and g.rank_max_num_seqs == 64
    assert dataclasses.replace(g, dp_mode="split").rank_max_num_seqs == 32


def test_the_serving_cost_model_refuses_ranks():
    from omnisim.sim.serving import ServingCosts

    exp = dataclasses.replace(experiment(ClusterSpec(mixed=ranks_group(dp=2))), serving=ServingCosts(api_step_s=0.001))
    with pytest.raises(ValueError, match=r"cluster.mixed.dp_mode=ranks: the serving-cost model"):
        Simulation(exp)


def applied(trace):
    """A rank's Scheduler.trace with each plan's steps as applied: a rank's run of decode steps ends where the
    synchronised run of all ranks ended (its next plan's first step), not where its own plan would have."""
    return [(start, (trace[i + 1][0] - start) if i + 1 < len(trace) else k, chunks, running)
            for i, (start, k, chunks, running) in enumerate(trace)]


def test_the_emulator_runs_ranks_as_the_simulator_does():
    # The same waves through the simulator's DPInstance and the emulator's engine with 3 ranks: every rank schedules
    # the same steps (chunked prefill, prefix hits, preemption in a small KV), the load balancer places every request
    # alike, and a step lasts as long as its slowest rank.
    import asyncio

    from backends.common.tokens import block_hashes
    from backends.emulator import EmulatedEngine
    from omnisim.engine import Sequence
    from tests.test_emulator import generate
    from tests.test_engine_equivalence import _expand, _waves

    block, dp, kv = 16, 3, 3 * 384
    group = InstanceGroup(dp=dp, dp_mode="ranks", max_num_seqs=6, max_num_batched_tokens=96, block_size=block,
                          kv_capacity_tokens=kv)
    waves = _waves(1)
    env = simpy.Environment()

    class Driver:
        def __init__(self):
            self.done = []

        def finished(self, seq, _inst):
            self.done.append(seq)

    driver = Driver()
    inst = DPInstance(env, "mixed-0", Role.MIXED, group, AffineCost(), kv // block, 1.0, None, driver,
                      reserve_tokens=block)
    for r in inst.ranks:
        r.trace = []
    seqs = []

    def submit(wave, first):
        for j, (tokens, max_tokens) in enumerate(wave):
            seq = Sequence(Request(str(first + j), env.now, len(tokens), max_tokens, block_hashes(tokens, block),
                                   block), block)
            seqs.append(seq)
            inst._rank_for(seq).submit(seq)
        inst._wake()

    first = 0
    for w, wave in enumerate(waves):
        env.timeout(w * 100.0).callbacks.append(lambda _e, wave=wave, first=first: submit(wave, first))
        first += len(wave)
    env.run()
    sim_seqs = {s.id: (s.preemptions, s.cached, s.generated) for s in seqs}

    async def emulate():
        engine = EmulatedEngine(AffineCost(), max_num_seqs=6, max_num_batched_tokens=96, block_size=block,
                                kv_capacity_tokens=kv, time_scale=0.0, ranks=dp)
        for r in engine.ranks:
            r.trace = []
        await engine.start()
        out = {}
        for wave in waves:
            batch = [engine.make_sequence(f"c{i}", tokens, max_tokens) for i, (tokens, max_tokens) in enumerate(wave)]
            await generate(engine, *batch)
            out.update({q.core.id: (q.preemptions, q.cached_tokens, q.generated) for q in batch})
        await engine.stop()
        return engine, out

    engine, emu_seqs = asyncio.run(asyncio.wait_for(emulate(), 60))
    assert engine.max_num_seqs == 18 and engine.pool.num_blocks == 384 // block
    for sim_rank, emu_rank in zip(inst.ranks, engine.ranks):
        assert _expand(applied(sim_rank.trace)) == _expand(emu_rank.trace)
    assert sim_seqs == emu_seqs and len(driver.done) == len(seqs)
    assert all(r.trace for r in engine.ranks)  # every rank got work
    assert sum(p for p, _, _ in sim_seqs.values()) > 0 and sum(c for _, c, _ in sim_seqs.values()) > 0


def test_omniinfers_r1_decode_as_32_engine_cores_runs_exactly_in_closed_form():
    # The published 7P8-1D32 with the decode instance's ranks as vLLM runs them (32 seats each): closed-form runs on
    # the roofline (MLA, EP all-to-all, MTP) equal one event per step. (The MoE runtime is left out: it samples a
    # lone step's imbalance but takes the expectation over a run, by design, in either dp_mode.)
    from hydra import compose, initialize_config_dir

    from omnisim.app import CONF_DIR, build_experiment

    overrides = ["experiment=omniinfer_r1_7p1d", "cluster.decode.dp_mode=ranks", "cluster.decode.max_num_seqs=32",
                 "workload.max_requests=120", "workload.rate=40", "workload.lengths.output.mean=120",
                 "cost.mtp_tokens=1", "cost.mtp_acceptance=0.85"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        fast_sim, fast = run(build_experiment(compose("config", overrides=overrides))[0])
        exact = run(build_experiment(compose("config", overrides=overrides))[0], max_run_steps=1)[1]
    assert_same_records(fast.records, exact.records)
    decode = fast_sim.instances[-1]
    assert isinstance(decode, DPInstance) and len(decode.ranks) == 32
    assert fast.instances.steps.iloc[-1] == exact.instances.steps.iloc[-1]
    assert decode.stats(1.0)["max_num_seqs"] == 1024
