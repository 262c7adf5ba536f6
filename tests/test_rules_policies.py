"""Routing rules pinned where a mutation run (mutmut over omnisim/policies) found them unpinned: boundaries, the
load each policy adds for its own dispatches, defaults, the conf/proxy values as the app composes them, and
argument errors that name the field. Small hand-made views, concrete numbers."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from omnisim.core import BatchSample, ClusterView, InstanceState, Phase, Request, Role, Waiting
from omnisim.policies import (ByPhase, KVAware, LeastLoad, OmniProxy, PDDecider, PowerOfTwo, Predictive, PrefixAware,
                              RoundRobin)
from omnisim.policies.load import added_tokens, inflight_tokens, requests
from omnisim.policies.omni_proxy import prefill_weights
from omnisim.policies.step_fit import StepLine, fit_step_line
from tests.test_policies_rules import Cache, inst, view  # the same small views

P, D = Phase.PREFILL, Phase.DECODE
CONF = Path(__file__).resolve().parents[1] / "conf"


def wait(id, prompt=1000, output=100, arrival=0.0):
    return Waiting(Request(id=id, arrival_s=arrival, prompt_tokens=prompt, output_tokens=output), queued_s=arrival)


def picks(out):
    return [a.instance_id for a in out]


def targets(out):
    return {a.request_id: a.instance_id for a in out}


# ---- conf/proxy as the app composes it ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def app_proxy(option: str, seed: int = 3):
    """The proxy policy the omnisim app builds for ``proxy=<option>`` (the whole conf/config.yaml composed)."""
    from hydra import compose, initialize_config_dir

    from omnisim.app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"proxy={option}", f"seed={seed}"])
    return cfg.proxy


def built(option: str):
    return instantiate(app_proxy(option), _convert_="all")


def check_published_omni_proxy(policy: OmniProxy) -> None:
    """OmniProxy's published constants (REFERENCE.md), read from decisions only: 32000 tokens / 32 requests inclusive
    prefill limits, the 0.8 / 0.2 prefill weight, and decode limited by the instance's own max_num_seqs."""
    # prefill limits, inclusive: 32000 tokens ok, 32001 not; 32 requests ok, 33 not
    v = view(inst("p0", inflight_prompt_tokens=32001), inst("p1", num_running=33), inst("p2", num_running=32,
                                                                                      inflight_prompt_tokens=32000))
    assert targets(policy.schedule(P, [wait("a", arrival=99.0)], v)) == {"a": "p2"}
    assert policy.schedule(P, [wait("a")], view(inst("p0", inflight_prompt_tokens=32001), inst("p1", num_running=33))) \
        == []
    # prompt weight w = 0.8: "old" has the longest prompt and waited longest (weight 1 - w = 0.2); "short" is 26% (or
    # 24%) shorter than the longest and fresh (weight 0.8 * 0.26 = 0.208 > 0.2; 0.8 * 0.24 = 0.192 < 0.2). Any w below
    # 1 / 1.26 = 0.794 flips the first order, any w above 1 / 1.24 = 0.806 flips the second.
    one = view(inst("p0"), now=100.0)
    q = [wait("old", 10000, arrival=99.0), wait("short", 7400, arrival=100.0)]
    assert [w.request.id for w in policy.prefill_order(q, 100.0)] == ["short", "old"]
    q = [wait("old", 10000, arrival=99.0), wait("short", 7600, arrival=100.0)]
    assert [w.request.id for w in policy.prefill_order(q, 100.0)] == ["old", "short"]
    assert [a.request_id for a in policy.schedule(P, q, one)] == ["old", "short"]
    # decode: no fixed running limit, the instance's max_num_seqs (34 here): 2 of 3 requests fit
    d = view(inst("d0", Role.DECODE, num_running=32, max_num_seqs=34))
    assert len(policy.schedule(D, [wait("x"), wait("y"), wait("z")], d)) == 2


def test_conf_omni_proxy_values_reach_the_policy_and_decide():
    policy = built("omni_proxy")
    assert isinstance(policy, OmniProxy) and policy.seed == 3
    check_published_omni_proxy(policy)
    # the same numbers decide for the PD-decider variant's inner policy
    pd = built("omni_proxy_pd")
    assert isinstance(pd, PDDecider) and isinstance(pd.inner, OmniProxy) and pd.threshold_tokens == 512
    check_published_omni_proxy(pd.inner)


def test_conf_omni_proxy_prompt_weight_is_the_one_the_policy_orders_by():
    cfg = app_proxy("omni_proxy")
    for weight, first in ((0.70, "old"), (0.8, "short")):
        node = OmegaConf.merge(cfg, {"prompt_weight": weight})
        policy = instantiate(node, _convert_="all")
        q = [wait("old", 10000, arrival=99.0), wait("short", 7400, arrival=100.0)]
        assert next(iter(policy.prefill_order(q, 100.0))).request.id == first


def test_constructor_defaults_are_the_published_values_in_conf():
    """Built without arguments, each policy is the one its conf/proxy file publishes (the files name every value)."""
    for name, cls in (("omni_proxy", OmniProxy), ("prefix_aware", PrefixAware), ("kv_aware", KVAware),
                      ("predictive", Predictive)):
        node = OmegaConf.to_container(OmegaConf.load(CONF / "proxy" / f"{name}.yaml"), resolve=False)
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
        for key, value in node.items():
            if key in ("_target_", "seed", "defaults") or isinstance(value, str):
                continue  # interpolations (${seed}, the cluster's batch budget) are the app's
            assert defaults[key] == pytest.approx(value), f"{name}.{key}: default {defaults[key]} != conf {value}"
    # and the defaults decide as published
    check_published_omni_proxy(OmniProxy())
    p = Predictive()
    assert (p.prefill_prior, p.decode_prior) == (StepLine(0.12007, 0.0345e-3), StepLine(0.03, 2e-5))
    assert (p.batch_token_budget, p.max_queue_s, p.prompt_weight, p.lookahead, p.tpot_slo_s, p.prior_weight) == \
        (16384, 0.25, 0.8, 64, 0.05, 1.0)
    assert prefill_weights([wait("a", 1000, arrival=99.0), wait("b", 500, arrival=100.0)], 100.0) == \
        pytest.approx([0.2, 0.4])  # default prompt weight 0.8: a 0 + 0.2 * 1/1; b 0.8 * 500/1000
    assert PDDecider(LeastLoad()).threshold_tokens == 512


# ---- argument checks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, field", [
    (lambda: OmniProxy(prefill_max_inflight_tokens=-1), "prefill_max_inflight_tokens"),
    (lambda: OmniProxy(prefill_max_running=-1), "prefill_max_running"),
    (lambda: OmniProxy(decode_max_running=-1), "decode_max_running"),
    (lambda: OmniProxy(prompt_weight=1.01), "prompt_weight"),
    (lambda: OmniProxy(prompt_weight=-0.01), "prompt_weight"),
    (lambda: PrefixAware(cache_threshold=-0.1), "cache_threshold"),
    (lambda: PrefixAware(balance_abs_threshold=-1), "balance_abs_threshold"),
    (lambda: PrefixAware(balance_rel_threshold=0.99), "balance_rel_threshold"),
    (lambda: KVAware(overlap_score_weight=-1), "overlap_score_weight"),
    (lambda: KVAware(temperature=-0.5), "temperature"),
    (lambda: Predictive(prefill_step_s=0), "prefill_step_s"),
    (lambda: Predictive(prefill_s_per_token=0), "prefill_s_per_token"),
    (lambda: Predictive(decode_step_s=0), "decode_step_s"),
    (lambda: Predictive(decode_s_per_seq=-1), "decode_s_per_seq"),
    (lambda: Predictive(tpot_slo_s=0), "tpot_slo_s"),
    (lambda: Predictive(prior_weight=0), "prior_weight"),
    (lambda: Predictive(batch_token_budget=0), "batch_token_budget"),
    (lambda: Predictive(lookahead=0), "lookahead"),
    (lambda: Predictive(max_queue_s=-0.1), "max_queue_s"),
    (lambda: Predictive(prompt_weight=1.5), "prompt_weight"),
    (lambda: PDDecider("least_load"), "inner"),
    (lambda: PDDecider(LeastLoad(), threshold_tokens=-1), "threshold_tokens"),
    (lambda: ByPhase(prefill="kv_aware", decode=LeastLoad()), "prefill"),
    (lambda: ByPhase(prefill=LeastLoad(), decode=object()), "decode"),
])
def test_bad_arguments_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make()


def test_boundary_arguments_are_accepted():
    for w in (0.0, 1.0):
        OmniProxy(prompt_weight=w)
        Predictive(prompt_weight=w)
        PrefixAware(cache_threshold=w)
    PrefixAware(balance_abs_threshold=0, balance_rel_threshold=1.0)
    Predictive(lookahead=1, batch_token_budget=1, max_queue_s=0.0)
    OmniProxy(prefill_max_inflight_tokens=0, prefill_max_running=0, decode_max_running=0)
    PDDecider(LeastLoad(), threshold_tokens=0)
    KVAware(overlap_score_weight=0.0, temperature=0.0)


# ---- load.py --------------------------------------------------------------------------------------------------------
def test_load_measures():
    pre = inst("p", inflight_prompt_tokens=700, decode_tokens=500, num_running=3, num_waiting=4)
    mixed = inst("m", Role.MIXED, inflight_prompt_tokens=700, decode_tokens=500)
    assert inflight_tokens(pre, P) == 700  # a prefill instance's resident context is not prefill work
    assert inflight_tokens(mixed, P) == 1200  # a mixed one's decode shares the engine
    assert inflight_tokens(pre, D) == inflight_tokens(mixed, D) == 500
    assert requests(pre) == 7
    r = Request("r", 0.0, 2000, 10)
    assert added_tokens(r, P) == 2000 and added_tokens(r, P, 600) == 1400
    assert added_tokens(r, D) == added_tokens(r, D, 600) == 2000  # decode receives the whole prompt's KV


# ---- baselines ------------------------------------------------------------------------------------------------------
def test_round_robin_walks_forward_over_three_candidates():
    rr = RoundRobin()
    v = view(inst("p0"), inst("p1"), inst("p2"))
    assert picks(rr.schedule(P, [wait("a"), wait("b")], v)) == ["p0", "p1"]
    assert picks(rr.schedule(P, [wait("c"), wait("d")], v)) == ["p2", "p0"]


def test_least_load_prefill_subtracts_the_target_cache_and_decode_does_not():
    # a (2000 tokens, 1800 cached on p0) adds 200 to p0: 1000 -> 1200 < 1500, so b goes to p0 too
    v = view(inst("p0", inflight_prompt_tokens=1000), inst("p1", inflight_prompt_tokens=1500),
             cached={("a", "p0"): 1800})
    assert picks(LeastLoad().schedule(P, [wait("a", 2000), wait("b", 2000)], v)) == ["p0", "p0"]
    # decode: the whole prompt arrives (2000): 1000 -> 3000 > 1500, b goes to d1, whatever d0 caches
    v = view(inst("d0", Role.DECODE, decode_tokens=1000), inst("d1", Role.DECODE, decode_tokens=1500),
             cached={("a", "d0"): 1800})
    assert picks(LeastLoad().schedule(D, [wait("a", 2000), wait("b", 2000)], v)) == ["d0", "d1"]


def test_power_of_two_with_two_candidates_is_least_tokens_then_fewest_requests():
    # two candidates: every draw compares both, so the choice is deterministic unless they tie exactly
    for seed in range(3):
        v = view(inst("p0", inflight_prompt_tokens=1000), inst("p1", inflight_prompt_tokens=1500),
                 cached={("a", "p0"): 1800})
        assert picks(PowerOfTwo(seed).schedule(P, [wait("a", 2000), wait("b", 2000)], v)) == ["p0", "p0"]
        v = view(inst("d0", Role.DECODE, decode_tokens=1000), inst("d1", Role.DECODE, decode_tokens=1500),
                 cached={("a", "d0"): 1800})
        assert picks(PowerOfTwo(seed).schedule(D, [wait("a", 2000), wait("b", 2000)], v)) == ["d0", "d1"]
        # its own dispatches count: p0 1000 + 1000 = 2000 > 1500
        v = view(inst("p0", inflight_prompt_tokens=1000), inst("p1", inflight_prompt_tokens=1500))
        assert picks(PowerOfTwo(seed).schedule(P, [wait("a", 1000), wait("b", 1000)], v)) == ["p0", "p1"]
        # equal tokens: fewer requests wins, counting the ones just sent (p0: 5 + 1 = 6 > 5)
        v = view(inst("p0", inflight_prompt_tokens=1000, num_running=5),
                 inst("p1", inflight_prompt_tokens=2000, num_running=5))
        assert picks(PowerOfTwo(seed).schedule(P, [wait("a", 1000), wait("b", 1000)], v)) == ["p0", "p1"]
        # p0 sends two (0 -> 1000 -> 2000 tokens, 2 requests); then tokens tie at 2000 and 2 < 3 requests on p1
        v = view(inst("p0"), inst("p1", inflight_prompt_tokens=2000, num_running=3))
        assert picks(PowerOfTwo(seed).schedule(P, [wait("a"), wait("b"), wait("c")], v)) == ["p0", "p0", "p0"]


# ---- prefix_aware ---------------------------------------------------------------------------------------------------
def test_prefix_aware_default_thresholds_at_their_boundaries():
    cached = {("a", "p0"): 900}

    def to(hi, lo):
        return targets(PrefixAware().schedule(P, [wait("a")], view(inst("p0", num_running=hi),
                                                                    inst("p1", num_running=lo), cached=cached)))["a"]
    assert to(80, 15) == "p1"   # spread 65 > 64 and 80 > 1.5 * 15: imbalanced, shortest queue
    assert to(74, 10) == "p0"   # spread 64 is not > 64: balanced, cache
    assert to(200, 100) == "p1"  # spread 100, 200 > 150: imbalanced
    assert to(300, 200) == "p0"  # 300 is not > 1.5 * 200: balanced
    # match rate must exceed the threshold: 300 / 1000 = 0.3 is not > 0.3 -> emptiest cache (p1)
    v = view(inst("p0", kv_usage=0.5), inst("p1", kv_usage=0.1), cached={("a", "p0"): 300, ("b", "p0"): 301})
    assert targets(PrefixAware().schedule(P, [wait("a")], v)) == {"a": "p1"}
    assert targets(PrefixAware().schedule(P, [wait("b")], v)) == {"b": "p0"}


def test_prefix_aware_counts_each_dispatch_as_one_request():
    # everything cached on p0; imbalance (spread > 3, rel 1.0) sends a request to p1 whenever p0 leads by 4
    v = view(inst("p0"), inst("p1"), cached={(f"r{i}", "p0"): 900 for i in range(8)})
    out = PrefixAware(balance_abs_threshold=3, balance_rel_threshold=1.0).schedule(
        P, [wait(f"r{i}") for i in range(8)], v)
    assert picks(out) == ["p0", "p0", "p0", "p0", "p1", "p0", "p1", "p0"]


def test_prefix_aware_low_match_counts_what_it_adds_to_each_cache():
    # no match: lowest KV usage, plus prompt / capacity for each request sent (1000 / 10000 = 0.1)
    v = view(inst("p0", kv_usage=0.2, kv_capacity_tokens=10000), inst("p1", kv_usage=0.25, kv_capacity_tokens=10000))
    assert picks(PrefixAware().schedule(P, [wait("a"), wait("b")], v)) == ["p0", "p1"]  # 0.3 > 0.25
    v = view(inst("p0", kv_usage=0.2, kv_capacity_tokens=10000), inst("p1", kv_usage=0.35, kv_capacity_tokens=10000))
    assert picks(PrefixAware().schedule(P, [wait("a"), wait("b")], v)) == ["p0", "p0"]  # 0.3 < 0.35
    # unknown capacity (0): usage does not move, so ties fall to fewer requests
    v = view(inst("p0", kv_usage=0.2), inst("p1", kv_usage=0.2))
    assert picks(PrefixAware().schedule(P, [wait("a"), wait("b")], v)) == ["p0", "p1"]


# ---- kv_aware -------------------------------------------------------------------------------------------------------
def test_kv_aware_counts_its_own_prefill_and_decode_blocks():
    # weight 10: prefill blocks dominate. cost = 10 * (queued + uncached) + decode + prompt
    # a: p0 10 * 2000 + 1000 = 21000 < p1 26000; p0 -> 10 * 3000 + 2000 = 32000 > 26000: b -> p1; c -> p0
    v = view(inst("p0", inflight_prompt_tokens=1000), inst("p1", inflight_prompt_tokens=1500))
    assert picks(KVAware(overlap_score_weight=10).schedule(P, [wait("a"), wait("b"), wait("c")], v)) == \
        ["p0", "p1", "p0"]
    # weight 0: decode blocks only; a: p0 1000 + 1000 < p1 1500 + 1000; p0 -> 2000 + 1000 > 2500: b -> p1; c -> p0
    v = view(inst("p0", decode_tokens=1000), inst("p1", decode_tokens=1500))
    assert picks(KVAware(overlap_score_weight=0).schedule(P, [wait("a"), wait("b"), wait("c")], v)) == \
        ["p0", "p1", "p0"]


# ---- omni_proxy -----------------------------------------------------------------------------------------------------
def test_omni_proxy_empty_queue_is_no_work():
    v = view(inst("p0"), inst("d0", Role.DECODE))
    assert OmniProxy().schedule(P, [], v) == [] and OmniProxy().schedule(D, [], v) == []


def test_omni_proxy_prompt_weight_is_used_for_ordering():
    # w = 0.5: old 0.5 * 1/1 = 0.5; short 0.5 * 0.9 = 0.45 -> old first (the default 0.8 puts short first)
    q = [wait("old", 10000, arrival=99.0), wait("short", 1000, arrival=100.0)]
    assert [w.request.id for w in OmniProxy(prompt_weight=0.5).prefill_order(q, 100.0)] == ["old", "short"]
    assert [w.request.id for w in OmniProxy().prefill_order(q, 100.0)] == ["short", "old"]


def test_omni_proxy_prefill_counts_uncached_tokens_and_requests_against_the_limits():
    # match branch: a (4000, 1000 cached) brings p0 from 29000 to exactly 32000: still eligible, b follows
    v = view(inst("p0", inflight_prompt_tokens=29000), cached={("a", "p0"): 1000})
    # (a waited longer, so it goes first)
    assert picks(OmniProxy().schedule(P, [wait("a", 4000, arrival=0.0), wait("b", 4000, arrival=50.0)], v)) == \
        ["p0", "p0"]
    # no-match branch: 31001 + 1000 = 32001 > 32000: p0 closes after a, b is held
    v = view(inst("p0", inflight_prompt_tokens=31001))
    assert [a.request_id for a in OmniProxy().schedule(P, [wait("a", 1000), wait("b", 1000)], v)] == ["a"]
    # requests: 31 -> 32 (still <= 32) -> 33 (closed): two of three dispatched
    v = view(inst("p0", num_running=31))
    assert [a.request_id for a in OmniProxy().schedule(P, [wait("a", 10), wait("b", 10), wait("c", 10)], v)] == \
        ["a", "b"]


def test_omni_proxy_full_tie_on_a_match_goes_to_the_earlier_upstream():
    cached = {("a", "p0"): 512, ("a", "p1"): 512}
    v = view(inst("p0", inflight_prompt_tokens=100, num_running=1), inst("p1", inflight_prompt_tokens=100,
                                                                         num_running=1), cached=cached)
    assert targets(OmniProxy().schedule(P, [wait("a")], v)) == {"a": "p0"}


def test_omni_proxy_scan_takes_a_strictly_lower_load_after_a_nonzero_one():
    # only an idle upstream (0 tokens) ends the scan early: from p0 (1 token) the scan still reaches idle p1
    v = view(inst("p0", inflight_prompt_tokens=1), inst("p1"))
    assert targets(OmniProxy().schedule(P, [wait("a")], v)) == {"a": "p1"}


def test_omni_proxy_decode_longest_total_first_and_tokens_counted_round_robin():
    # order by prompt + max_tokens: a (100 + 2000) before b (1000 + 10)
    v = view(inst("d0", Role.DECODE, decode_tokens=1000), inst("d1", Role.DECODE, decode_tokens=5000))
    assert picks(OmniProxy().schedule(D, [wait("b", 1000, 10), wait("a", 100, 2000)], v)) == ["d0", "d0"]
    out = OmniProxy().schedule(D, [wait("b", 1000, 10), wait("a", 100, 2000)], v)
    assert [a.request_id for a in out] == ["a", "b"]
    # a adds its prompt (1000 -> 2000); the scan starts after the last pick: d1 1500, then d0 2000 is not lower
    v = view(inst("d0", Role.DECODE, decode_tokens=1000), inst("d1", Role.DECODE, decode_tokens=1500))
    assert picks(OmniProxy().schedule(D, [wait("a"), wait("b"), wait("c")], v)) == ["d0", "d1", "d0"]


def test_omni_proxy_decode_round_robin_across_calls():
    policy = OmniProxy()
    v = view(*(inst(f"d{i}", Role.DECODE, decode_tokens=100) for i in range(3)))
    assert [policy.schedule(D, [wait(f"r{i}")], v)[0].instance_id for i in range(4)] == ["d0", "d1", "d2", "d0"]


# ---- pd_decider -----------------------------------------------------------------------------------------------------
def test_pd_decider_default_threshold_is_strictly_below_512_uncached_tokens():
    v = view(inst("p0"), inst("d0", Role.DECODE))
    out = PDDecider(LeastLoad()).schedule(P, [wait("short", 511), wait("edge", 512)], v)
    assert targets(out) == {"short": "d0", "edge": "p0"}


# ---- by_phase -------------------------------------------------------------------------------------------------------
def test_by_phase_decode_uses_the_decode_policy():
    v = view(inst("p0"), inst("d0", Role.DECODE, decode_tokens=10000), inst("d1", Role.DECODE))
    by = ByPhase(prefill=RoundRobin(), decode=LeastLoad())
    assert picks(by.schedule(D, [wait("a"), wait("b")], v)) == ["d1", "d1"]  # round robin would give d0, d1


# ---- predictive -----------------------------------------------------------------------------------------------------
def test_predictive_prefill_seconds_formula():
    p = Predictive(batch_token_budget=1000)
    line = StepLine(0.5, 0.001)
    assert p.prefill_seconds(line, 0) == 0.0
    assert p.prefill_seconds(line, 1) == pytest.approx(0.001 + 0.5)
    assert p.prefill_seconds(line, 2500) == pytest.approx(2.5 + 0.5 * 3)  # 3 steps of at most 1000 tokens


def test_predictive_prefill_ties_go_to_the_earlier_instance_and_closing_one_keeps_the_others():
    # one request fills an instance (1000 tokens = one budget); a and b tie on idle p0 / p1
    policy = Predictive(prefill_step_s=0.1, prefill_s_per_token=1e-4, batch_token_budget=1000, max_queue_s=0.0)
    v = view(inst("p0"), inst("p1"))
    assert targets(policy.schedule(P, [wait("a"), wait("b")], v)) == {"a": "p0", "b": "p1"}
    # exactly one budget queued: closed (takes work only below a full batch or within max_queue_s)
    assert policy.schedule(P, [wait("a")], view(inst("p0", inflight_prompt_tokens=1000))) == []
    assert len(policy.schedule(P, [wait("a")], view(inst("p0", inflight_prompt_tokens=999)))) == 1


def test_predictive_prompt_weight_is_used_for_ordering():
    # one slot; w = 0.5 serves the old long prompt first, the default 0.8 the fresh short one
    q = [wait("old", 10000, arrival=99.0), wait("short", 1000, arrival=100.0)]
    kw = dict(prefill_step_s=0.1, prefill_s_per_token=1e-4, batch_token_budget=1, max_queue_s=0.0)
    assert [a.request_id for a in Predictive(prompt_weight=0.5, **kw).schedule(P, q, view(inst("p0")))] == ["old"]
    assert [a.request_id for a in Predictive(**kw).schedule(P, q, view(inst("p0")))] == ["short"]


def decode_policy(**kw):
    # binary fractions, so the SLO boundaries are exact: step = 0.25 + 0.125 * seqs, no batches to learn from
    return Predictive(decode_step_s=0.25, decode_s_per_seq=0.125, **kw)


def test_predictive_decode_slo_boundary_and_guard():
    # slo 0.5: one running -> 0.25 + 0.125 * 2 = 0.5 <= 0.5 takes the request; slo 0.4999 holds it
    v = view(inst("d0", Role.DECODE, num_running=1))
    assert len(decode_policy(tpot_slo_s=0.5).schedule(D, [wait("a")], v)) == 1
    assert decode_policy(tpot_slo_s=0.4999).schedule(D, [wait("a")], v) == []
    # slo 0.375 = the one-sequence step exactly: the instance is still guarded (at(1) <= slo), so 0.5 > 0.375 holds
    assert decode_policy(tpot_slo_s=0.375).schedule(D, [wait("a")], v) == []
    # slo below the one-sequence step: unguarded, capacity only
    assert len(decode_policy(tpot_slo_s=0.3).schedule(D, [wait("a")], v)) == 1


def test_predictive_decode_capacity_boundary_and_own_dispatches():
    slo = dict(tpot_slo_s=100.0)
    # d0 (1 running) is faster than d1 (5 running); its KV fits the request's final context exactly: 900 + 100
    v = view(inst("d0", Role.DECODE, num_running=1, decode_tokens=900, kv_capacity_tokens=1000),
             inst("d1", Role.DECODE, num_running=5))
    assert targets(decode_policy(**slo).schedule(D, [wait("a", 90, 10)], v)) == {"a": "d0"}
    v = view(inst("d0", Role.DECODE, num_running=1, decode_tokens=950, kv_capacity_tokens=1000),
             inst("d1", Role.DECODE, num_running=5))
    assert targets(decode_policy(**slo).schedule(D, [wait("a", 90, 10)], v)) == {"a": "d1"}
    # a adds its prompt (700 -> 900); b's 900 + 210 > 1000 does not fit: held (FCFS)
    v = view(inst("d0", Role.DECODE, num_running=1, decode_tokens=700, kv_capacity_tokens=1000))
    assert [a.request_id for a in decode_policy(**slo).schedule(D, [wait("a", 200, 10, 0.0), wait("b", 200, 10, 1.0)],
                                                                v)] == ["a"]
    # equal steps: the earlier instance
    v = view(inst("d0", Role.DECODE), inst("d1", Role.DECODE))
    assert picks(decode_policy(**slo).schedule(D, [wait("a", arrival=0.0), wait("b", arrival=1.0)], v)) == \
        ["d0", "d1"]


def test_predictive_step_lines_read_the_right_batches_and_follow_new_ones():
    policy = Predictive(prior_weight=1.0, batch_token_budget=8192)
    prior_p, prior_d = policy.prefill_prior, policy.decode_prior
    decode_only = (BatchSample(0.5, 0, 8), BatchSample(0.6, 0, 16))
    mixed = (BatchSample(0.9, 4000, 8), BatchSample(1.2, 6000, 16))
    idle = (BatchSample(0.7, 0, 0),)
    # prefill line: batches with prefill tokens only (>= 1 token)
    assert policy.step_line(inst("a", recent_batches=decode_only + idle), P) == prior_p
    assert policy.step_line(inst("b", recent_batches=(BatchSample(10.0, 1, 0),)), P) != prior_p
    # decode line: pure decode batches (no prefill, >= 1 sequence) only
    assert policy.step_line(inst("c", recent_batches=mixed + idle), D) == prior_d
    assert policy.step_line(inst("d", recent_batches=(BatchSample(10.0, 0, 1),)), D) != prior_d
    fitted = policy.step_line(inst("e", recent_batches=decode_only), D)
    assert fitted == fit_step_line([(8, 0.5), (16, 0.6)], prior_d, 1.0, 1)  # max_num_seqs 0 -> x_scale 1
    assert policy.step_line(inst("f", recent_batches=decode_only, max_num_seqs=256), D) == \
        fit_step_line([(8, 0.5), (16, 0.6)], prior_d, 1.0, 256)
    # new batches for the same instance: a new line, not the remembered one
    first = policy.step_line(inst("g", recent_batches=mixed), P)
    later = policy.step_line(inst("g", recent_batches=mixed[:1]), P)
    assert later == fit_step_line([(4000, 0.9)], prior_p, 1.0, 8192) != first
    assert policy.step_line(inst("g", recent_batches=tuple(mixed)), P) == first


# ---- step_fit -------------------------------------------------------------------------------------------------------
def ridge_reference(points, prior, weight, x_scale):
    """The published two-stage fit, computed independently: a scale factor shrunk toward 1, then ridge regression
    toward the scaled prior (intercept penalty ``weight``, slope penalty ``weight * x_scale**2``), floored at a
    tenth of the scaled prior."""
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    scale = (weight + np.sum(y / (prior.intercept_s + prior.slope_s * x))) / (weight + len(x))
    a0, b0 = prior.intercept_s * scale, prior.slope_s * scale
    design = np.vstack([np.column_stack([np.ones_like(x), x]),
                        [[np.sqrt(weight), 0.0], [0.0, np.sqrt(weight) * x_scale]]])
    target = np.concatenate([y, [np.sqrt(weight) * a0, np.sqrt(weight) * x_scale * b0]])
    a, b = np.linalg.lstsq(design, target, rcond=None)[0]
    return max(a, 0.1 * a0), max(b, 0.1 * b0)


@pytest.mark.parametrize("points, weight, x_scale", [
    ([(1000, 0.3), (4000, 0.5), (9000, 0.9)], 1.0, 8192),
    ([(8000, 1.5)] * 3, 2.0, 8000),
    ([(2, 0.05), (30, 0.04), (60, 0.09)], 0.5, 64),
    ([(100, 0.2), (200, 0.1)], 3.0, 1.0),
])
def test_step_fit_matches_the_published_two_stage_fit(points, weight, x_scale):
    prior = StepLine(0.1, 1e-4)
    line = fit_step_line(points, prior, weight, x_scale)
    assert (line.intercept_s, line.slope_s) == pytest.approx(ridge_reference(points, prior, weight, x_scale),
                                                             rel=1e-9, abs=1e-15)
    assert fit_step_line([], prior, weight, x_scale) == prior


# ---- seeds ----------------------------------------------------------------------------------------------------------
def test_every_policy_keeps_its_seed_and_defaults_to_seed_zero():
    from omnisim.policies import LeastRequests, RandomChoice

    for cls in (RoundRobin, RandomChoice, LeastLoad, LeastRequests, PowerOfTwo, PrefixAware, KVAware, OmniProxy,
                Predictive):
        assert cls(seed=11).seed == 11 and cls().seed == 0, cls.__name__
    # the random policies' default draws are seed 0's: RandomChoice(), PowerOfTwo() and a sampling KVAware() replay
    v = view(*(inst(f"p{i}", inflight_prompt_tokens=100 * i) for i in range(5)))
    q = [wait(f"r{i}") for i in range(40)]
    for make in (RandomChoice, PowerOfTwo, lambda seed=0: KVAware(temperature=1.0, seed=seed)):
        assert make().schedule(P, q, v) == make(seed=0).schedule(P, q, v) != make(seed=1).schedule(P, q, v)
