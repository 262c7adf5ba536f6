"""Each policy's published decision rule, pinned on small hand-made views."""
from __future__ import annotations

import math

import pytest

from omnisim.core import BatchSample, ClusterView, InstanceState, Phase, Request, Role, Waiting
from omnisim.policies import (ByPhase, KVAware, LeastLoad, LeastRequests, OmniProxy, PDDecider, PowerOfTwo,
                              Predictive, PrefixAware, RandomChoice, RoundRobin)
from omnisim.policies.step_fit import StepLine, fit_step_line

P, D = Phase.PREFILL, Phase.DECODE


class Cache:
    """Prefix lookup from a dict {(request id, instance id): cached tokens}."""

    def __init__(self, cached=None):
        self.cached = cached or {}

    def cached_tokens(self, request, instance_id):
        return self.cached.get((request.id, instance_id), 0)


def inst(id, role=Role.PREFILL, **kw):
    return InstanceState(id=id, role=role, **kw)


def view(*states, now=100.0, cached=None):
    return ClusterView(now_s=now, instances=tuple(states), prefix=Cache(cached))


def wait(id, prompt=1000, output=100, arrival=0.0, queued=None):
    r = Request(id=id, arrival_s=arrival, prompt_tokens=prompt, output_tokens=output)
    return Waiting(r, queued_s=arrival if queued is None else queued)


def targets(out):
    return {a.request_id: a.instance_id for a in out}


# ---- baselines ------------------------------------------------------------------------------------------------------
def test_round_robin_cycles_per_phase_over_healthy_candidates():
    rr = RoundRobin()
    v = view(inst("p0"), inst("p1", healthy=False), inst("p2"), inst("d0", Role.DECODE), inst("d1", Role.DECODE))
    assert [a.instance_id for a in rr.schedule(P, [wait("a"), wait("b"), wait("c")], v)] == ["p0", "p2", "p0"]
    assert [a.instance_id for a in rr.schedule(D, [wait("d"), wait("e"), wait("f")], v)] == ["d0", "d1", "d0"]
    assert [a.instance_id for a in rr.schedule(P, [wait("g")], v)] == ["p2"]


def test_random_is_seeded_and_uniform():
    v = view(*(inst(f"p{i}") for i in range(4)))
    q = [wait(f"r{i}") for i in range(400)]
    a, b, c = RandomChoice(seed=1), RandomChoice(seed=1), RandomChoice(seed=2)
    out = a.schedule(P, q, v)
    assert out == b.schedule(P, q, v) and out != c.schedule(P, q, v)
    counts = {f"p{i}": 0 for i in range(4)}
    for x in out:
        counts[x.instance_id] += 1
    assert min(counts.values()) > 60


def test_least_load_counts_uncached_tokens_it_dispatches():
    v = view(inst("p0", inflight_prompt_tokens=1000), inst("p1", inflight_prompt_tokens=1500),
             cached={("a", "p0"): 900})
    # a: p0 (1000 < 1500), adds 2000 - 900 = 1100 -> 2100; b: p1 (1500 < 2100)
    assert targets(LeastLoad().schedule(P, [wait("a", 2000), wait("b", 2000)], v)) == {"a": "p0", "b": "p1"}


def test_least_load_decode_uses_context_tokens_and_mixed_prefill_counts_both():
    v = view(inst("d0", Role.DECODE, decode_tokens=5000), inst("d1", Role.DECODE, decode_tokens=4000))
    assert targets(LeastLoad().schedule(D, [wait("a", 500), wait("b", 500), wait("c", 500)], v)) == \
        {"a": "d1", "b": "d1", "c": "d0"}
    m = view(inst("m0", Role.MIXED, inflight_prompt_tokens=0, decode_tokens=9000),
             inst("m1", Role.MIXED, inflight_prompt_tokens=4000, decode_tokens=0))
    assert targets(LeastLoad().schedule(P, [wait("a")], m)) == {"a": "m1"}


def test_least_requests_counts_running_and_waiting():
    v = view(inst("p0", num_running=2, num_waiting=2), inst("p1", num_running=3),
             inst("p2", num_running=1, num_waiting=3))
    assert [a.instance_id for a in LeastRequests().schedule(P, [wait("a"), wait("b"), wait("c")], v)] == \
        ["p1", "p0", "p1"]


def test_power_of_two_never_picks_the_most_loaded_of_distinct_loads():
    v = view(inst("p0", inflight_prompt_tokens=100), inst("p1", inflight_prompt_tokens=200),
             inst("p2", inflight_prompt_tokens=300))
    policy = PowerOfTwo(seed=3)
    picks = [policy.schedule(P, [wait(f"r{i}")], v)[0].instance_id for i in range(300)]
    assert "p2" not in picks
    assert picks.count("p0") > picks.count("p1") > 0  # p0 wins every pair it is in: 2/3 of draws


# ---- prefix_aware (SGLang router) -----------------------------------------------------------------------------------
def test_prefix_aware_routes_to_best_match_when_balanced():
    v = view(inst("p0", num_running=10), inst("p1", num_running=2), cached={("a", "p0"): 600, ("a", "p1"): 100})
    assert targets(PrefixAware().schedule(P, [wait("a", 1000)], v)) == {"a": "p0"}


def test_prefix_aware_low_match_goes_to_emptiest_cache():
    v = view(inst("p0", kv_usage=0.5), inst("p1", kv_usage=0.2), inst("p2", kv_usage=0.3), cached={("a", "p0"): 200})
    assert targets(PrefixAware(cache_threshold=0.3).schedule(P, [wait("a", 1000)], v)) == {"a": "p1"}


def test_prefix_aware_imbalance_needs_both_thresholds():
    cached = {("a", "p0"): 900}
    # spread 70 > 64 and 80 > 1.5 * 10: imbalanced -> shortest queue
    v = view(inst("p0", num_running=80), inst("p1", num_running=10), cached=cached)
    assert targets(PrefixAware().schedule(P, [wait("a", 1000)], v)) == {"a": "p1"}
    # spread 65 > 64 but 205 < 1.5 * 140: balanced -> cache
    v = view(inst("p0", num_running=205), inst("p1", num_running=140), cached=cached)
    assert targets(PrefixAware().schedule(P, [wait("a", 1000)], v)) == {"a": "p0"}
    # ratio 8 > 1.5 but spread 7 < 64: balanced -> cache
    v = view(inst("p0", num_running=8), inst("p1", num_running=1), cached=cached)
    assert targets(PrefixAware().schedule(P, [wait("a", 1000)], v)) == {"a": "p0"}


def test_prefix_aware_counts_its_own_dispatches_toward_imbalance():
    v = view(inst("p0"), inst("p1"), cached={(f"r{i}", "p0"): 900 for i in range(20)})
    out = PrefixAware(balance_abs_threshold=3, balance_rel_threshold=1.0).schedule(
        P, [wait(f"r{i}", 1000) for i in range(20)], v)
    n0 = sum(a.instance_id == "p0" for a in out)
    assert 10 < n0 < 20  # cache first, then shortest queue whenever the spread passes 3


# ---- kv_aware (Dynamo) ----------------------------------------------------------------------------------------------
def test_kv_aware_cost_trades_cache_hits_against_load():
    # cost = w * (queued + uncached) + decode + prompt
    v = view(inst("p0", inflight_prompt_tokens=3000), inst("p1", inflight_prompt_tokens=0),
             cached={("a", "p0"): 3500})
    # p0: 3000 + 500 = 3500; p1: 0 + 4000 = 4000 -> p0
    assert targets(KVAware().schedule(P, [wait("a", 4000)], v)) == {"a": "p0"}
    # with decode blocks resident on p0 the balance flips: p0 3500 + 1000 > p1 4000
    v2 = view(inst("p0", inflight_prompt_tokens=3000, decode_tokens=1000), inst("p1"), cached={("a", "p0"): 3500})
    assert targets(KVAware().schedule(P, [wait("a", 4000)], v2)) == {"a": "p1"}
    # weight 0: cache ignored, decode blocks only (p1 has none)
    assert targets(KVAware(overlap_score_weight=0.0).schedule(P, [wait("a", 4000)], v)) == {"a": "p0"}
    assert targets(KVAware(overlap_score_weight=0.0).schedule(P, [wait("a", 4000)], v2)) == {"a": "p1"}


def test_kv_aware_temperature_samples_softmax_of_costs():
    v = view(inst("p0"), inst("p1", inflight_prompt_tokens=4000))
    policy = KVAware(temperature=0.5, seed=7)
    picks = [policy.schedule(P, [wait(f"r{i}", 4000)], v)[0].instance_id for i in range(2000)]
    # costs 8000 vs 12000 (p1 has 4000 queued + 4000 new + 4000 prompt), normalised 2/3 vs 1
    expected = 1 / (1 + math.exp(-(1 - 2 / 3) / 0.5))
    assert abs(picks.count("p0") / 2000 - expected) < 0.04
    again = KVAware(temperature=0.5, seed=7)
    assert picks == [again.schedule(P, [wait(f"r{i}", 4000)], v)[0].instance_id for i in range(2000)]  # seeded


# ---- omni_proxy -----------------------------------------------------------------------------------------------------
def test_omni_proxy_prefill_order_weights():
    q = [wait("mid", 1000, arrival=99.9), wait("short", 100, arrival=99.99), wait("old_long", 4000, arrival=90.0)]
    # maxPrompt 4000, maxWait 10 s: mid 0.8*0.75 + 0.2*0.01 = 0.602; short 0.78 + 0.0002; old_long 0 + 0.2
    assert [w.request.id for w in OmniProxy().prefill_order(q, now_s=100.0)] == ["short", "mid", "old_long"]
    # aging: a long prompt that waited overtakes a slightly shorter fresh one
    q = [wait("fresh", 3500, arrival=100.0), wait("aged", 4000, arrival=99.0)]
    # fresh 0.8 * 500/4000 = 0.1; aged 0.2 * 1/1 = 0.2
    assert [w.request.id for w in OmniProxy().prefill_order(q, now_s=100.0)] == ["aged", "fresh"]
    # the wait is normalised by at least 50 ms: 10 ms of waiting is worth 0.2 * 0.2
    q = [wait("a", 1000, arrival=99.99), wait("b", 960, arrival=100.0)]
    # a: 0 + 0.2 * 0.01/0.05 = 0.04; b: 0.8 * 40/1000 = 0.032
    assert [w.request.id for w in OmniProxy().prefill_order(q, now_s=100.0)] == ["a", "b"]


def test_omni_proxy_eligibility_limits_and_hold():
    v = view(inst("p0", inflight_prompt_tokens=32001), inst("p1", num_running=33),
             inst("p2", inflight_prompt_tokens=32000, num_running=32))
    assert targets(OmniProxy().schedule(P, [wait("a")], v)) == {"a": "p2"}  # limits are inclusive
    v = view(inst("p0", inflight_prompt_tokens=32001), inst("p1", num_running=30, num_waiting=3))
    assert OmniProxy().schedule(P, [wait("a"), wait("b")], v) == []  # held in the proxy


def test_omni_proxy_deepest_match_then_fewer_tokens_then_fewer_running():
    cached = {("a", "p0"): 512, ("a", "p1"): 1024, ("a", "p2"): 1024, ("a", "p3"): 1024}
    v = view(inst("p0"), inst("p1", inflight_prompt_tokens=9000, num_running=1),
             inst("p2", inflight_prompt_tokens=8000, num_running=5), inst("p3", inflight_prompt_tokens=8000,
                                                                            num_running=4), cached=cached)
    assert targets(OmniProxy().schedule(P, [wait("a", 2000)], v)) == {"a": "p3"}


def test_omni_proxy_no_match_least_tokens_round_robin_from_last_pick():
    policy = OmniProxy()
    v = view(inst("p0", inflight_prompt_tokens=100), inst("p1", inflight_prompt_tokens=100),
             inst("p2", inflight_prompt_tokens=100))
    picks = [policy.schedule(P, [wait(f"r{i}")], v)[0].instance_id for i in range(4)]
    assert picks == ["p0", "p1", "p2", "p0"]  # equal loads: the scan starts after the last pick


def test_omni_proxy_counts_dispatched_tokens_and_stops_at_the_limit():
    v = view(inst("p0", inflight_prompt_tokens=20000), inst("p1", inflight_prompt_tokens=25000))
    q = [wait(f"r{i}", 5000, arrival=99.0) for i in range(6)]
    out = OmniProxy().schedule(P, q, v)
    # p0 20000 -> 25000 (ok) -> 30000 -> 35000 (out); p1 25000 -> 30000 -> 35000 (out): 5 dispatched, 1 held
    assert len(out) == 5 and [a.instance_id for a in out].count("p0") == 3


def test_omni_proxy_decode_longest_first_onto_fewest_tokens_with_running_limit():
    v = view(inst("d0", Role.DECODE, decode_tokens=1000, num_running=30),
             inst("d1", Role.DECODE, decode_tokens=5000, num_running=10))
    q = [wait("s", 100, 10), wait("l", 3000, 1000), wait("m", 1000, 500)]
    out = OmniProxy(decode_max_running=32).schedule(D, q, v)
    # l -> d0 (1000 < 5000) -> 4000; m -> d0 (4000 < 5000) -> 5000, running 32 (full); s -> d1
    assert [(a.request_id, a.instance_id) for a in out] == [("l", "d0"), ("m", "d0"), ("s", "d1")]
    full = view(inst("d0", Role.DECODE, num_running=32))
    assert OmniProxy(decode_max_running=32).schedule(D, q, full) == []
    # 0 = the instance's own max_num_seqs
    assert len(OmniProxy(decode_max_running=0).schedule(D, q, view(inst("d0", Role.DECODE, num_running=32,
                                                                       max_num_seqs=34)))) == 2


# ---- predictive -----------------------------------------------------------------------------------------------------
def test_step_fit_recovers_a_line_and_keeps_the_prior_slope_when_samples_cannot_tell():
    prior = StepLine(0.1, 1e-5)
    pts = [(x, 0.05 + 2e-5 * x) for x in (1000, 4000, 8000, 16000)]
    line = fit_step_line(pts, prior, weight=1e-6, x_scale=16384)
    assert line.intercept_s == pytest.approx(0.05, rel=1e-3) and line.slope_s == pytest.approx(2e-5, rel=1e-3)
    same_x = fit_step_line([(8000, 0.5)] * 3, prior, weight=1.0, x_scale=8000)
    assert same_x.at(8000) == pytest.approx(0.5, rel=0.15)  # level moves toward what was seen
    assert same_x.slope_s > 0.5 * prior.slope_s  # slope stays near the prior


def test_predictive_ttft_trades_cache_hits_against_queued_work():
    policy = Predictive(prefill_step_s=0.1, prefill_s_per_token=1e-4, batch_token_budget=10000, max_queue_s=10)
    cached = {("a", "p0"): 6000}
    # p0: 1e-4 * (4000 + 2000) + 0.1 = 0.7 s; p1: 1e-4 * 8000 + 0.1 = 0.9 s -> p0
    v = view(inst("p0", inflight_prompt_tokens=4000), inst("p1"), cached=cached)
    assert targets(policy.schedule(P, [wait("a", 8000)], v)) == {"a": "p0"}
    # p0 with 7000 queued: 1e-4 * 9000 + 0.1 = 1.0 s > 0.9 s -> p1
    v = view(inst("p0", inflight_prompt_tokens=7000), inst("p1"), cached=cached)
    assert targets(policy.schedule(P, [wait("a", 8000)], v)) == {"a": "p1"}


def test_predictive_learns_a_slow_instance_from_its_batches():
    slow = tuple(BatchSample(0.1 + 3e-4 * x, x, 0) for x in (2000, 6000, 9000))
    fast = tuple(BatchSample(0.1 + 1e-4 * x, x, 0) for x in (2000, 6000, 9000))
    policy = Predictive(prefill_step_s=0.1, prefill_s_per_token=1e-4, batch_token_budget=10000, max_queue_s=10)
    # p0 has less queued, but its batches run 3x slower per token
    v = view(inst("p0", inflight_prompt_tokens=1000, recent_batches=slow),
             inst("p1", inflight_prompt_tokens=2000, recent_batches=fast))
    assert targets(policy.schedule(P, [wait("a", 4000)], v)) == {"a": "p1"}
    assert policy.step_line(v.instances[0], P).slope_s > 2e-4


def test_predictive_holds_when_every_queue_exceeds_the_horizon_and_orders_shortest_first():
    policy = Predictive(prefill_step_s=0.1, prefill_s_per_token=1e-4, batch_token_budget=2000, max_queue_s=0.5)
    busy = view(inst("p0", inflight_prompt_tokens=5000), inst("p1", inflight_prompt_tokens=9000))
    assert policy.schedule(P, [wait("a")], busy) == []  # 0.8 s and 1.4 s of queued work
    # an idle instance takes requests shortest first while under one batch (2000) or 0.5 s queued: 1000, 3000 tokens
    # (0.3 + 0.2 = 0.5 s), then 6000 (0.9 s) closes it
    idle = view(inst("p0"))
    q = [wait("long", 3000), wait("short", 1000), wait("mid", 2000), wait("longest", 4000)]
    assert [a.request_id for a in policy.schedule(P, q, idle)] == ["short", "mid", "long"]


def test_predictive_serves_the_queue_in_omni_proxy_order():
    policy = Predictive(prefill_step_s=0.1, prefill_s_per_token=1e-4, batch_token_budget=1, max_queue_s=0.0)
    v = view(inst("p0"), now=100.0)
    # one request fills the idle instance; OmniProxy's weights: aged 0.2 * 1/1 = 0.2 beats fresh 0.8 * 500/4000
    q = [wait("fresh", 3500, arrival=100.0), wait("aged", 4000, arrival=99.0)]
    assert [a.request_id for a in policy.schedule(P, q, v)] == ["aged"]
    q = [wait("fresh", 3000, arrival=100.0), wait("aged", 4000, arrival=99.0)]  # fresh: 0.8 * 1000/4000 = 0.2
    assert [a.request_id for a in policy.schedule(P, q, v)] == ["fresh"]  # equal weights: queue order


def test_predictive_decode_tpot_guard():
    batches = tuple(BatchSample(0.02 + 0.001 * n, 0, n) for n in (10, 20, 25))
    policy = Predictive(decode_step_s=0.02, decode_s_per_seq=0.001, tpot_slo_s=0.0505, prior_weight=0.01)
    v = view(inst("d0", Role.DECODE, num_running=25, recent_batches=batches),
             inst("d1", Role.DECODE, num_running=20, recent_batches=batches))
    q = [wait(f"r{i}", 100, 10, arrival=float(i)) for i in range(20)]
    out = policy.schedule(D, q, v)
    # step 0.02 + 0.001 * n <= 0.05 allows 30 sequences each: 5 + 10 = 15 dispatched, the rest held
    assert len(out) == 15 and [a.request_id for a in out] == [f"r{i}" for i in range(15)]
    assert sum(a.instance_id == "d1" for a in out) == 10
    # KV capacity is a guard too, but an empty instance always takes work
    v = view(inst("d0", Role.DECODE, num_running=1, decode_tokens=900, kv_capacity_tokens=1000), inst(
        "d1", Role.DECODE, kv_capacity_tokens=100))
    assert targets(policy.schedule(D, [wait("a", 100, 10)], v)) == {"a": "d1"}


# ---- combinators ----------------------------------------------------------------------------------------------------
def test_pd_decider_prefills_short_uncached_prompts_on_decode():
    v = view(inst("p0"), inst("d0", Role.DECODE), cached={("c", "d0"): 1800})
    policy = PDDecider(LeastLoad(), threshold_tokens=512)
    q = [wait("short", 300), wait("long", 2000), wait("c", 2000)]
    assert targets(policy.schedule(P, q, v)) == {"short": "d0", "long": "p0", "c": "d0"}
    assert targets(PDDecider(LeastLoad(), threshold_tokens=0).schedule(P, q, v)) == \
        {"short": "p0", "long": "p0", "c": "p0"}
    # decode phase and colocated clusters pass through
    assert targets(policy.schedule(D, q, v)) == {"short": "d0", "long": "d0", "c": "d0"}
    m = view(inst("m0", Role.MIXED))
    assert targets(policy.schedule(P, q, m)) == {"short": "m0", "long": "m0", "c": "m0"}


def test_pd_decider_short_requests_follow_the_inner_decode_rule():
    v = view(inst("p0"), inst("d0", Role.DECODE, num_running=32), inst("d1", Role.DECODE, num_running=10))
    out = PDDecider(OmniProxy(decode_max_running=32), threshold_tokens=512).schedule(P, [wait("s", 100)], v)
    assert targets(out) == {"s": "d1"}  # d0 is at OmniProxy's decode running limit


def test_by_phase_delegates():
    v = view(inst("p0", inflight_prompt_tokens=10), inst("p1"), inst("d0", Role.DECODE), inst("d1", Role.DECODE))
    policy = ByPhase(prefill=LeastLoad(), decode=RoundRobin())
    assert targets(policy.schedule(P, [wait("a")], v)) == {"a": "p1"}
    assert [a.instance_id for a in policy.schedule(D, [wait("b"), wait("c")], v)] == ["d0", "d1"]


@pytest.mark.parametrize("make", [lambda: PrefixAware(cache_threshold=2.0), lambda: KVAware(temperature=-1),
                                  lambda: OmniProxy(prefill_max_running=-1), lambda: Predictive(tpot_slo_s=0),
                                  lambda: PDDecider(LeastLoad(), threshold_tokens=-5),
                                  lambda: ByPhase(prefill=LeastLoad(), decode="least_load")])
def test_bad_arguments_name_the_field(make):
    with pytest.raises(ValueError, match=r"(cache_threshold|temperature|prefill_max_running|tpot_slo_s|"
                                         r"threshold_tokens|decode)"):
        make()


def test_no_candidates_means_no_assignment():
    v = view(inst("p0", healthy=False), inst("d0", Role.DECODE, healthy=False))
    for policy in (RoundRobin(), RandomChoice(), LeastLoad(), LeastRequests(), PowerOfTwo(), PrefixAware(), KVAware(),
                   OmniProxy(), Predictive(), PDDecider(LeastLoad())):
        assert policy.schedule(P, [wait("a")], v) == [] and policy.schedule(D, [wait("a")], v) == []


def test_predictive_waits_for_a_busy_instance_whose_cache_makes_it_faster():
    policy = Predictive(prefill_step_s=0.1, prefill_s_per_token=1e-4, batch_token_budget=2000, max_queue_s=0.5)
    # p0 holds 9000 of a's 10000 tokens but has 5000 queued (0.5 + 3 * 0.1 = 0.8 s > 0.5 s): a's TTFT there is
    # 1e-4 * 6000 + 3 * 0.1 = 0.9 s against 1.5 s on idle p1, so a waits in the proxy; b (no cache) goes to p1.
    v = view(inst("p0", inflight_prompt_tokens=5000), inst("p1"), cached={("a", "p0"): 9000})
    assert targets(policy.schedule(P, [wait("a", 10000), wait("b", 10000)], v)) == {"b": "p1"}
