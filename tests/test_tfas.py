"""OmniInfer's TFAS (omnisim.policies.TFAS): its rule with concrete numbers, the engine-policy conformance checker,
and the one object deciding inside the simulator's engine scheduler, a simulated PD run and the emulator's engines."""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
from hydra import compose, initialize_config_dir

from omnisim.app import CONF_DIR, build_experiment, build_node, compose_option
from omnisim.core import FCFS, QueuedPrompt, Request
from omnisim.core.conformance import ConformanceError, check_engine_policy
from omnisim.engine import BlockManager, Scheduler, Sequence
from omnisim.policies import TFAS
from omnisim.sim import Simulation
from tests.sim_fixtures import experiment, pd_cluster


def q(rid, tokens, queued=0.0):
    return QueuedPrompt(rid, tokens, queued)


# -- the rule ------------------------------------------------------------------------------------------------------
def test_budget_is_the_published_formula():
    t = TFAS()
    assert t.bound(0) == 9154  # the floor
    # 0.9 * sqrt(100k / 1024 * 3.6) * 1024, truncated twice as OmniInfer does: sqrt(351.5625) = 18.75 exactly
    assert t.bound(100_000) == int(0.9 * int(18.75 * 1024)) == 17280
    for w in (1, 5_000, 26_500, 26_600, 40_000, 10**6):
        assert t.bound(w) == max(9154, int(0.9 * int(math.sqrt(w / 1024 * 3.6) * 1024)))
    assert TFAS(token_budget=100, alpha=0.5, adjust_param=1.0).bound(4096) == 1024  # 0.5 * sqrt(4) * 1024


def test_order_is_shortest_first_with_timed_out_requests_first_in_arrival_order():
    t = TFAS(timeout_s=60.0)
    queue = [q("a", 5000, 50.0), q("b", 300, 55.0), q("late2", 9000, 20.0), q("c", 300, 10.0 + 80),
             q("late1", 7000, 10.0), q("d", 100, 99.0)]
    order, _ = t.plan(queue, 1 << 20, now_s=100.0)
    # late1 and late2 waited > 60 s: first, in arrival order; then shortest first, equal lengths in queue order
    assert [queue[k].request_id for k in order] == ["late1", "late2", "d", "b", "c", "a"]
    # exactly the timeout is not past it
    assert t.plan([q("x", 9, 0.0), q("y", 1, 0.0)], 100, 60.0)[0] == [1, 0]


def test_the_request_crossing_the_budget_is_admitted_whole_and_the_budget_is_capped():
    t = TFAS(token_budget=1000, adjust_param=1e-6)  # the floor rules: 1000
    queue = [q("a", 700), q("b", 200), q("c", 900)]
    # b (200) + a (700) = 900 <= 1000; + c (900) = 1800 > 1000: the budget grows to 1801 so c is not chunked
    assert t.plan(queue, 1 << 20, 0.0) == ([1, 0, 2], 1801)
    assert t.plan(queue, 1500, 0.0) == ([1, 0, 2], 1500)  # never above max_num_batched_tokens
    assert TFAS(token_budget=1000, adjust_param=1e-6, admit_whole=False).plan(queue, 1 << 20, 0.0)[1] == 1000
    assert t.plan([q("a", 10)], 1 << 20, 0.0) == ([0], 1000)
    assert t.plan([], 32768, 0.0) == ([], 1000)


def test_yaml_defaults_are_the_published_values():
    node = compose_option("engine_policy", "tfas")
    policy = build_node(node, "engine_policy")
    assert isinstance(policy, TFAS)
    assert (policy.token_budget, policy.alpha, policy.adjust_param, policy.timeout_s, policy.admit_whole) == \
        (9154, 0.9, 3.6, 60.0, True)
    assert vars(policy) == vars(TFAS())


@pytest.mark.parametrize("field,value", [("token_budget", 0), ("token_budget", 2.5), ("token_budget", True),
                                         ("alpha", 0), ("alpha", math.nan), ("adjust_param", -1.0),
                                         ("adjust_param", math.inf), ("timeout_s", -1), ("timeout_s", math.nan),
                                         ("admit_whole", 1)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"tfas: {field}"):
        TFAS(**{field: value})
    assert TFAS(timeout_s=math.inf).plan([q("a", 5, -1e9), q("b", 1)], 100, 0.0)[0] == [1, 0]


# -- the conformance checker ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [TFAS, FCFS, lambda: TFAS(token_budget=1, timeout_s=0.0, admit_whole=False)])
def test_tfas_and_fcfs_pass_the_engine_policy_checker(make):
    check_engine_policy(lambda seed: make())


class _Dup:
    def plan(self, waiting, m, now):
        return [0] * len(waiting), m


class _Over:
    def plan(self, waiting, m, now):
        return list(range(len(waiting))), m + 1


class _Float:
    def plan(self, waiting, m, now):
        return list(range(len(waiting))), float(m)


class _Mutates:
    def plan(self, waiting, m, now):
        if isinstance(waiting, list) and waiting:
            waiting.reverse()
        return list(range(len(waiting))), m


class _Stateful:
    def __init__(self):
        self.calls = 0

    def plan(self, waiting, m, now):
        self.calls += 1
        return list(range(len(waiting))), max(1, min(m, self.calls))


class _Clock:
    def plan(self, waiting, m, now):
        return list(range(len(waiting))), m if time.time() > 0 else 1


@pytest.mark.parametrize("policy,why", [(_Dup, "not a permutation"), (_Over, "exceeds max_num_batched_tokens"),
                                        (_Float, "not an int"), (_Mutates, "mutated"),
                                        (_Stateful, "replayed"), (_Clock, "wall clock")])
def test_the_checker_refuses_broken_engine_policies(policy, why):
    with pytest.raises(ConformanceError, match=why):
        check_engine_policy(lambda seed: policy(), calls=60)


# -- in the simulator's engine scheduler ---------------------------------------------------------------------------
B = 16


class _Events:
    def pull_kv(self, seq): ...

    def prefilled(self, seq): ...

    def finished(self, seq): ...


def _sched(policy, tokens=100_000):
    return Scheduler("p", BlockManager(2000, B), _Events(), max_num_seqs=8, max_num_batched_tokens=tokens,
                     policy=policy)


def _submit(s, rid, prompt, dispatched=0.0):
    x = Sequence(Request(rid, 0.0, prompt, 4), B)
    x.t_prefill_dispatch = dispatched
    s.submit(x)


def test_in_the_engine_scheduler_tfas_orders_shortest_first_and_sets_the_formula_budget():
    s = _sched(TFAS(token_budget=500, admit_whole=False))
    for rid, n in (("long", 5000), ("short", 100), ("mid", 1000)):
        _submit(s, rid, n)
    plan = s.schedule(0.0)
    budget = int(0.9 * int(math.sqrt(6100 / 1024 * 3.6) * 1024))  # 0.9 * 4742
    assert [(x.id, c) for x, c in plan.chunks] == [("short", 100), ("mid", 1000), ("long", budget - 1100)]
    assert plan.prefill_tokens == budget == 4267


def test_in_the_engine_scheduler_admit_whole_lets_the_crossing_prompt_in_unchunked_up_to_the_cap():
    s = _sched(TFAS(token_budget=500))
    for rid, n in (("long", 5000), ("short", 100), ("mid", 1000)):
        _submit(s, rid, n)
    assert [(x.id, c) for x, c in s.schedule(0.0).chunks] == [("short", 100), ("mid", 1000), ("long", 5000)]
    capped = _sched(TFAS(token_budget=500), tokens=3000)
    for rid, n in (("long", 5000), ("short", 100), ("mid", 1000)):
        _submit(capped, rid, n)
    assert capped.schedule(0.0).prefill_tokens == 3000  # max_num_batched_tokens


def test_in_the_engine_scheduler_a_timed_out_request_goes_first():
    s = _sched(TFAS(token_budget=64, adjust_param=1e-9, admit_whole=False), tokens=64)
    _submit(s, "old_long", 3000, dispatched=0.0)
    _submit(s, "short", 50, dispatched=60.5)
    _submit(s, "older_long", 2000, dispatched=-5.0)
    plan = s.schedule(61.0)  # old_long waited 61 s, older_long 66 s: both past 60 s, the older first
    assert [x.id for x, _ in plan.chunks] == ["older_long"] and plan.prefill_tokens == 64
    # the queue in TFAS's order; only the request the step computes is admitted (vLLM admits no request into a step
    # that computes none of it)
    assert [x.id for x in s.prefilling] == ["older_long"] and [x.id for x in s.waiting] == ["old_long", "short"]


# -- a simulated PD run, TFAS vs FCFS ------------------------------------------------------------------------------
class _Burst:
    """Four long prompts, then a short one just behind them; then a steady trickle."""

    def requests(self):
        t = 0.0
        for i in range(4):
            yield Request(f"long{i}", t, 6000, 20)
            t += 0.001
        yield Request("short", t, 100, 20)
        for i in range(20):
            t += 0.05
            yield Request(f"r{i}", t, 500 + 300 * (i % 5), 20)


def _run(policy):
    cluster = pd_cluster(p=1, d=1, max_num_batched_tokens=2048)
    exp = dataclasses.replace(experiment(cluster, _Burst()), engine_policy=policy)
    sim = Simulation(exp)
    records = sim.run().records.set_index("request_id")
    assert (records.status == "ok").all()
    return records, sim


def test_a_short_prompt_behind_long_ones_is_admitted_first_under_tfas():
    tfas = TFAS(token_budget=1024)
    fcfs_records, _ = _run(None)
    tfas_records, sim = _run(tfas)
    prefill, decode = sim.instances
    assert prefill.sched.policy is tfas and decode.sched.policy is None  # prefill instances only
    ttft = lambda r: r.first_token_s - r.arrival_s  # noqa: E731
    # FCFS: the short prompt's prefill ends with the last long one's; TFAS: with the first one's (already being
    # prefilled when it arrived), ahead of the other three
    longs = [f"long{i}" for i in range(4)]
    assert (fcfs_records.loc["short", "prefill_end_s"] >= fcfs_records.loc[longs, "prefill_end_s"]).all()
    assert (tfas_records.loc["short", "prefill_end_s"] < tfas_records.loc[longs[1:], "prefill_end_s"]).all()
    assert tfas_records.loc["short", "prefill_end_s"] >= tfas_records.loc["long0", "prefill_end_s"]
    assert ttft(tfas_records.loc["short"]) < 0.5 * ttft(fcfs_records.loc["short"])
    assert ttft(tfas_records).mean() < ttft(fcfs_records).mean()


def test_no_engine_policy_and_fcfs_simulate_identically():
    a, _ = _run(None)
    b, _ = _run(FCFS())
    assert a.equals(b)


# -- wired from the config into the simulator and the emulator -----------------------------------------------------
def _experiment(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return build_experiment(compose("config", overrides=["experiment=cpu_tiny_1p1d", *overrides]))


def test_the_configured_object_decides_in_the_simulator_and_in_the_emulator():
    exp, _ = _experiment("engine_policy=tfas", "backend=sim")
    assert isinstance(exp.engine_policy, TFAS)
    assert exp.options["engine_policy_config"]["_target_"] == "omnisim.policies.tfas.TFAS"
    sim = Simulation(exp)
    assert {i.id: i.sched.policy for i in sim.instances} == {"prefill-0": exp.engine_policy, "decode-0": None}

    exp, backend = _experiment("engine_policy=tfas", "backend=emulator")
    fleet = backend.fleet(exp)
    policies = {s.engine_id: s.engine.sched.policy for s in fleet.servers}
    assert policies == {"prefill-0": exp.engine_policy, "decode-0": None}
    exp, backend = _experiment("backend=emulator")
    assert all(s.engine.sched.policy is None for s in backend.fleet(exp).servers)
