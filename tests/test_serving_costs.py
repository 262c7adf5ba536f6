"""Serving costs in the simulator (omnisim.sim.serving): each cost shows up where it is charged and nowhere else, and
with serving=none the simulator is the plain one."""
from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from omnisim.app import CONF_DIR, build_experiment
from omnisim.core import Request
from omnisim.metrics import request_latencies
from omnisim.sim import Simulation
from omnisim.sim.instance import Instance
from omnisim.sim.serving import Fifo, ServedInstance, ServingCosts
from tests.sim_fixtures import AffineCost, Workload, colocated, experiment, pd_cluster

BLOCK = 32


class Listed:
    def __init__(self, *requests: Request) -> None:
        self.items = requests

    def requests(self):
        return iter(self.items)


def req(i: int, t: float, prompt: int, output: int) -> Request:
    return Request(f"r{i}", t, prompt, output)


def run(cluster, workload, serving: ServingCosts | None):
    exp = dataclasses.replace(experiment(cluster, workload), serving=serving)
    sim = Simulation(exp)
    result = sim.run()
    lat = request_latencies(result.records)
    return result.records.join(lat).set_index("request_id"), result.instances.set_index("instance_id"), sim


def one(prompt=100, output=10, serving=None, cluster=None):
    records, instances, sim = run(cluster or colocated(n=1, block_size=BLOCK), Listed(req(0, 0.0, prompt, output)),
                                  serving)
    return records.loc["r0"], instances, sim


# -- off means off ---------------------------------------------------------------------------------------------------
def test_serving_none_is_all_zero_and_the_simulator_builds_plain_instances():
    assert not ServingCosts().active
    default, _ = build_experiment(cfg())
    assert default.serving == ServingCosts()  # the default config has none
    exp, _ = build_experiment(cfg("experiment=cpu_tiny_1p1d", "serving=none"))
    assert exp.serving == ServingCosts()
    sim = Simulation(exp)
    assert all(type(i) is Instance for i in sim.instances)
    with_none = Simulation(dataclasses.replace(exp, serving=None)).run().records
    pd.testing.assert_frame_equal(sim.run().records, with_none, check_exact=True)


def test_any_cost_turns_served_instances_on():
    for name in ("frontend_s", "token_s", "step_s", "kv_save_s", "proxy_s"):
        costs = ServingCosts(**{name: 1e-3})
        assert costs.active
        _, _, sim = one(serving=costs)
        assert all(isinstance(i, ServedInstance) for i in sim.instances)
    assert ServingCosts(host_cores=2).active and ServingCosts(kv_rule="example_connector").active
    assert not ServingCosts(background_cores=3.0, engine_cpu=2.0, idle_poll_s=1.0, idle_poll_cpu=1.0).active
    # they only matter with host_cores


def cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


# -- front-end and response --------------------------------------------------------------------------------------------
def test_ttft_and_e2e_grow_by_exactly_the_front_end_and_response_costs():
    base, _, _ = one()
    fe, per_token, resp, proxy = 0.020, 1e-5, 0.003, 0.001
    served, inst, _ = one(serving=ServingCosts(frontend_s=fe, frontend_per_token_s=per_token, response_s=resp,
                                               proxy_s=proxy))
    front = proxy + fe + per_token * 100
    assert served.ttft_s == pytest.approx(base.ttft_s + front, abs=1e-12)
    assert served.e2e_s == pytest.approx(base.e2e_s + front + resp, abs=1e-12)
    # nothing per token: TPOT only carries the response, which the client's last token (its [DONE]) waits for
    assert served.tpot_s == pytest.approx(base.tpot_s + resp / 9, abs=1e-12)
    assert inst.loc["mixed-0", "api_busy_s"] == pytest.approx(fe + per_token * 100 + resp)


def test_requests_in_the_front_end_count_as_waiting_for_the_policy():
    costs = ServingCosts(frontend_s=0.05)
    exp = dataclasses.replace(experiment(colocated(n=1, block_size=BLOCK), Listed(req(0, 0.0, 100, 4))),
                              serving=costs)
    sim = Simulation(exp)
    inst = sim.instances[0]
    seen = []
    sim.env.process(_watch(sim.env, inst, seen))
    sim.run()
    at_10ms = seen[0]
    assert at_10ms.num_waiting == 1 and at_10ms.inflight_prompt_tokens == 100  # not in the engine yet
    assert inst.sched.idle and inst.fe_local == 0


def _watch(env, inst, seen):
    yield env.timeout(0.01)
    seen.append(inst.state())


# -- per-token streaming -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", [10, 40])
def test_streaming_cost_is_charged_per_output_token_and_bounds_tpot_when_it_exceeds_the_step(output):
    base, _, _ = one(output=output)
    step = base.tpot_s  # AffineCost: ~4 ms per decode step
    cheap = step / 10
    served, inst, _ = one(output=output, serving=ServingCosts(token_s=cheap))
    assert inst.loc["mixed-0", "api_busy_s"] == pytest.approx(output * cheap)
    # cheaper than a step: the API server keeps up, each token is late by its own processing only
    assert served.ttft_s == pytest.approx(base.ttft_s + cheap)
    assert served.e2e_s == pytest.approx(base.e2e_s + cheap)
    slow = 3 * step
    bound, inst, _ = one(output=output, serving=ServingCosts(token_s=slow))
    assert inst.loc["mixed-0", "api_busy_s"] == pytest.approx(output * slow)
    # dearer than a step: the API server is the bottleneck, tokens leave at its pace
    assert bound.tpot_s == pytest.approx(slow, rel=1e-9)
    assert bound.e2e_s == pytest.approx(base.ttft_s + output * slow, rel=1e-9)


def test_api_step_cost_is_charged_once_per_engine_step_with_output():
    # one request alone: its prefill step and output - 1 decode steps each hand the API server one token
    served, inst, _ = one(output=12, serving=ServingCosts(api_step_s=1e-4, token_s=2e-4))
    assert inst.loc["mixed-0", "api_busy_s"] == pytest.approx(12 * (1e-4 + 2e-4))
    two, inst2, _ = run(colocated(n=1, block_size=BLOCK), Listed(req(0, 0.0, 100, 12), req(1, 0.0, 100, 12)),
                        ServingCosts(api_step_s=1e-4, token_s=2e-4))
    # r0's prefill starts alone (r1 arrives while it runs), r1's joins the next step: 13 steps, 24 tokens
    assert inst2.loc["mixed-0", "steps"] == 13
    assert inst2.loc["mixed-0", "api_busy_s"] == pytest.approx(13 * 1e-4 + 24 * 2e-4)


def test_fifo_closed_form_equals_job_by_job():
    starts = [0.1 + 0.004 * i + 1e-5 * i * i for i in range(30)]
    for work in (0.001, 0.004, 0.009):
        a, b = Fifo(), Fifo()
        a.free_at = b.free_at = 0.12
        done = [a.add(t, work) for t in starts]
        first, last = b.add_steps(starts[0], starts[-1], len(starts), work)
        assert (first, last) == pytest.approx((done[0], done[-1]), abs=1e-12)
        assert a.free_at == pytest.approx(b.free_at) and a.busy_s == pytest.approx(b.busy_s)


def test_step_overhead_is_added_to_every_engine_step():
    base, _, _ = one(output=20)
    served, inst, _ = one(output=20, serving=ServingCosts(step_s=0.002))
    assert served.tpot_s == pytest.approx(base.tpot_s + 0.002, rel=1e-9)
    assert served.ttft_s == pytest.approx(base.ttft_s + 0.002, rel=1e-9)


def test_step_factor_scales_every_engine_step_before_the_overhead():
    base, _, _ = one(output=20)
    served, _, _ = one(output=20, serving=ServingCosts(step_factor=1.5, step_s=0.002))
    assert served.tpot_s == pytest.approx(base.tpot_s * 1.5 + 0.002, rel=1e-9)
    assert served.ttft_s == pytest.approx(base.ttft_s * 1.5 + 0.002, rel=1e-9)


def test_a_token_count_the_engine_has_not_run_costs_new_shape_s_once():
    # r0: its prefill (100 tokens) and its decode steps (batch 1) are new shapes; r1 repeats both; r2's prefill of
    # 120 tokens is new, its decode steps are not. Requests one after another, no prefix shared.
    reqs = Listed(req(0, 0.0, 100, 10), req(1, 5.0, 100, 10), req(2, 10.0, 120, 10))
    base, _, _ = run(colocated(n=1, block_size=BLOCK), reqs, None)
    served, _, _ = run(colocated(n=1, block_size=BLOCK), reqs, ServingCosts(new_shape_s=0.01))
    assert served.ttft_s.to_list() == pytest.approx((base.ttft_s + [0.01, 0.0, 0.01]).to_list(), rel=1e-9)
    assert served.e2e_s.to_list() == pytest.approx((base.e2e_s + [0.02, 0.0, 0.01]).to_list(), rel=1e-9)
    # a server warmed up on every count up to 110: only r2's 120-token prefill is new
    warm, _, _ = run(colocated(n=1, block_size=BLOCK), reqs, ServingCosts(new_shape_s=0.01, warm_tokens=110))
    assert warm.e2e_s.to_list() == pytest.approx((base.e2e_s + [0.0, 0.0, 0.01]).to_list(), rel=1e-9)


def test_each_request_costs_admit_s_once_in_the_step_that_admits_it():
    # r0's step admits r0 alone; r1 and r2 arrive during it and share the next step, which admits both (so r0's
    # decode step beside them is slower too); r3 comes later, alone
    reqs = Listed(req(0, 0.0, 100, 10), req(1, 0.001, 100, 10), req(2, 0.001, 100, 10), req(3, 5.0, 100, 10))
    base, _, _ = run(colocated(n=1, block_size=BLOCK), reqs, None)
    served, _, _ = run(colocated(n=1, block_size=BLOCK), reqs, ServingCosts(admit_s=0.004))
    assert base.ttft_s["r0"] > 0.001 and base.ttft_s["r1"] == base.ttft_s["r2"]
    assert served.ttft_s.to_list() == pytest.approx((base.ttft_s + [0.004, 0.012, 0.012, 0.004]).to_list(), rel=1e-9)
    assert served.e2e_s["r0"] - base.e2e_s["r0"] == pytest.approx(0.012, rel=1e-9)
    assert served.tpot_s["r3"] == pytest.approx(base.tpot_s["r3"], rel=1e-9)  # its decode steps admit none
    # PD: prefill admits the request, then decode's first step for it admits it again, in either connector mode
    for rule in ("link", "example_connector"):
        plain, _ = pd_run(100, kv_rule=rule)
        admitted, _ = pd_run(100, kv_rule=rule, admit_s=0.004)
        assert admitted.prefill_end_s - plain.prefill_end_s == pytest.approx(0.004, rel=1e-6)
        assert admitted.ttft_s - plain.ttft_s == pytest.approx(0.008, rel=1e-6)
        assert admitted.tpot_s == pytest.approx(plain.tpot_s, rel=1e-9)


def test_prefill_token_s_is_charged_per_prompt_token_a_step_computes():
    base, _, _ = one(prompt=100, output=20)
    served, _, _ = one(prompt=100, output=20, serving=ServingCosts(prefill_token_s=1e-5))
    assert served.ttft_s == pytest.approx(base.ttft_s + 100 * 1e-5, rel=1e-9)
    assert served.tpot_s == pytest.approx(base.tpot_s, rel=1e-9)  # decode steps compute no prompt token
    # PD with the connector: prefill computes all 100, decode's admitting step the 4 it did not load
    plain, _ = pd_run(100, kv_rule="example_connector")
    charged, _ = pd_run(100, kv_rule="example_connector", prefill_token_s=1e-5)
    assert charged.prefill_end_s - plain.prefill_end_s == pytest.approx(100 * 1e-5, rel=1e-6)
    assert charged.ttft_s - plain.ttft_s == pytest.approx(104 * 1e-5, rel=1e-6)
    assert charged.tpot_s == pytest.approx(plain.tpot_s, rel=1e-9)


def test_connector_step_s_is_charged_in_every_step_of_a_pd_instance_and_nowhere_else():
    plain, _ = pd_run(100, output=20, kv_rule="example_connector")
    charged, _ = pd_run(100, output=20, kv_rule="example_connector", connector_step_s=0.001)
    assert charged.prefill_end_s - plain.prefill_end_s == pytest.approx(0.001, rel=1e-6)  # the prefill step
    assert charged.ttft_s - plain.ttft_s == pytest.approx(0.002, rel=1e-6)  # and decode's admitting step
    assert charged.tpot_s == pytest.approx(plain.tpot_s + 0.001, rel=1e-6)  # and every decode step
    base, _, _ = one(output=20, serving=ServingCosts(step_s=1e-12))
    colocated_run, _, _ = one(output=20, serving=ServingCosts(step_s=1e-12, connector_step_s=0.001))
    assert colocated_run.e2e_s == pytest.approx(base.e2e_s, rel=1e-12)  # a colocated instance runs no connector


@pytest.mark.parametrize("rule", ["link", "example_connector"])
def test_every_remote_request_is_admitted_once_on_decode_even_when_its_step_is_formed_again(rule, monkeypatch):
    # New work arriving before a planned step starts forms that step again; the requests its first forming had
    # joined are still admitted in it (under load this happens a few times in 300 requests).
    admitted: dict = {}
    timed = ServedInstance._time

    def recording(self, plan, now):
        admitted[(self.id, now)] = len(self._joined[1])  # a step formed again replaces its first forming
        return timed(self, plan, now)

    monkeypatch.setattr(ServedInstance, "_time", recording)
    wl = Workload(n=300, rate=6.0, seed=1)
    records, _, _ = run(pd_cluster(p=2, d=1, block_size=BLOCK), wl, ServingCosts(admit_s=0.002, kv_rule=rule))
    assert (records.status == "ok").all()
    assert sum(n for (inst, _t), n in admitted.items() if inst.startswith("decode")) == len(records) == 300


# -- the KV connector ----------------------------------------------------------------------------------------------
def pd_run(prompt, output=4, **costs):
    cluster = pd_cluster(p=1, d=1, block_size=BLOCK)
    cluster = dataclasses.replace(cluster, kv_link=dataclasses.replace(cluster.kv_link, latency_s=0.0,
                                                                       bandwidth_GBps=1e9))
    records, instances, _ = run(cluster, Listed(req(0, 0.0, prompt, output)),
                                ServingCosts(**costs) if costs else None)
    return records.loc["r0"], instances


@pytest.mark.parametrize("prompt, loaded", [(64, 32), (65, 0), (66, 64), (100, 96), (20, 0), (33, 0), (34, 32)])
def test_example_connector_rule_loads_the_blocks_both_sides_agree_on(prompt, loaded):
    costs = ServingCosts(kv_rule="example_connector")
    stored, got = costs.connector_tokens(prompt, BLOCK)
    assert stored == max(0, (prompt - 1) // BLOCK * BLOCK) and got == loaded
    assert ServingCosts().connector_tokens(prompt, BLOCK) == (prompt, prompt)  # "link": the whole prompt
    _, inst = pd_run(prompt, kv_rule="example_connector")
    assert inst.loc["decode-0", "kv_bytes_in"] == pytest.approx(loaded * 70_000.0)


def test_connector_load_and_save_cost_grow_with_the_bytes_moved():
    per_byte = 1e-9
    for prompt in (100, 300):
        stored, loaded = ServingCosts(kv_rule="example_connector").connector_tokens(prompt, BLOCK)
        base, _ = pd_run(prompt, kv_rule="example_connector")
        load, _ = pd_run(prompt, kv_rule="example_connector", kv_load_s=0.002, kv_load_per_byte_s=per_byte)
        assert load.ttft_s - base.ttft_s == pytest.approx(0.002 + per_byte * loaded * 70_000.0, rel=1e-6)
        save, _ = pd_run(prompt, kv_rule="example_connector", kv_save_s=0.001, kv_save_per_byte_s=per_byte)
        assert save.ttft_s - base.ttft_s == pytest.approx(0.001 + per_byte * stored * 70_000.0, rel=1e-6)
        # the save is in the prefill step, so the decode side sees the prefill end that much later
        assert save.prefill_end_s - base.prefill_end_s == pytest.approx(0.001 + per_byte * stored * 70_000.0,
                                                                         rel=1e-6)


def test_decode_recomputes_the_tail_the_connector_did_not_bring():
    # "link" moves the whole prompt (here in no time): decode's first step is a decode step.
    link, _ = pd_run(100, kv_rule="link", step_s=1e-12)
    example, _ = pd_run(100, kv_rule="example_connector")  # loads 96, recomputes 4 tokens in a mixed step
    miss, _ = pd_run(97, kv_rule="example_connector")  # 97 - 1 is a multiple of 32: the keys differ, all recomputed
    c = AffineCost()
    tail = c.step_time(4, 4 * (96 + 2.5), 100, 0, 0) - c.step_time(0, 0, 0, 1, 100)
    first_link = link.first_token_s - link.prefill_end_s
    assert example.first_token_s - example.prefill_end_s == pytest.approx(first_link + tail - 1e-12, rel=1e-6)
    full = c.step_time(97, 97 * 49, 97, 0, 0)
    assert miss.first_token_s - miss.prefill_end_s == pytest.approx(full, rel=1e-6)


# -- host CPU contention -------------------------------------------------------------------------------------------
def two_at_once(**costs):
    cluster = colocated(n=2, block_size=BLOCK)
    records, _, _ = run(cluster, Listed(req(0, 0.0, 100, 60), req(1, 0.0, 100, 60)),
                        ServingCosts(**costs) if costs else None)
    return records


def test_contention_slows_steps_only_when_demand_exceeds_the_cores():
    alone = two_at_once()
    fits = two_at_once(host_cores=2, engine_cpu=1.0)  # two engines of one core each on two cores
    assert fits.tpot_s.to_list() == pytest.approx(alone.tpot_s.to_list(), rel=1e-12)
    over = two_at_once(host_cores=2, engine_cpu=1.5)  # 3 cores wanted of 2: everything 1.5x slower
    assert over.tpot_s.to_list() == pytest.approx((alone.tpot_s * 1.5).to_list(), rel=1e-9)
    loaded = two_at_once(host_cores=2, engine_cpu=1.0, background_cores=1.0)  # 3 of 2 again
    assert loaded.tpot_s.to_list() == pytest.approx((alone.tpot_s * 1.5).to_list(), rel=1e-9)
    no_host = two_at_once(engine_cpu=1.5, background_cores=1.0)  # host_cores=0: no host model
    assert no_host.tpot_s.to_list() == pytest.approx(alone.tpot_s.to_list(), rel=1e-12)


def test_a_run_started_alone_slows_down_once_the_other_engine_starts_stepping():
    # r0 starts its decode run while the other engine idles; r1 arrives a moment later on the other engine. From
    # then on both want 1.5 cores of 2, and both streams are 1.5x slower for the rest: the run of r0 is cut at the
    # next step boundary and timed again, not kept at the pace it was planned at.
    reqs = Listed(req(0, 0.0, 100, 60), req(1, 0.001, 100, 60))
    alone, _, _ = run(colocated(n=2, block_size=BLOCK), reqs, None)
    hosted, _, _ = run(colocated(n=2, block_size=BLOCK), reqs, ServingCosts(host_cores=2, engine_cpu=1.5))
    assert hosted.loc["r1"].tpot_s == pytest.approx(1.5 * alone.loc["r1"].tpot_s, rel=0.02)
    assert hosted.loc["r0"].tpot_s == pytest.approx(1.5 * alone.loc["r0"].tpot_s, rel=0.02)
    # and once r1 is done, r0 (longer) speeds up again
    reqs = Listed(req(0, 0.0, 100, 120), req(1, 0.001, 100, 20))
    alone, _, _ = run(colocated(n=2, block_size=BLOCK), reqs, None)
    hosted, _, _ = run(colocated(n=2, block_size=BLOCK), reqs, ServingCosts(host_cores=2, engine_cpu=1.5))
    assert alone.loc["r0"].tpot_s < hosted.loc["r0"].tpot_s < 1.3 * alone.loc["r0"].tpot_s


def test_one_engine_alone_is_not_slowed_by_the_other_idle_one():
    records, _, _ = run(colocated(n=2, block_size=BLOCK), Listed(req(0, 0.0, 100, 60)), None)
    alone = records.loc["r0"]
    records, _, _ = run(colocated(n=2, block_size=BLOCK), Listed(req(0, 0.0, 100, 60)),
                        ServingCosts(host_cores=2, engine_cpu=1.5))
    assert records.loc["r0"].tpot_s == pytest.approx(alone.tpot_s, rel=1e-12)


def test_an_engine_that_just_stopped_keeps_polling_and_slows_the_others_until_its_poll_ends():
    # r0 (engine 0) is done long before r1 (engine 1) arrives right after it: engine 0's worker still spins on its
    # queue, 1 core, so r1's engine gets 2 / (1.5 + 1) of what it wants while that lasts, and its own pace after.
    reqs = Listed(req(0, 0.0, 100, 2), req(1, 0.05, 100, 200))
    cluster = colocated(n=2, block_size=BLOCK)
    quiet, _, _ = run(cluster, reqs, ServingCosts(host_cores=2, engine_cpu=1.5))
    polled, _, _ = run(cluster, reqs, ServingCosts(host_cores=2, engine_cpu=1.5, idle_poll_s=100.0,
                                                   idle_poll_cpu=1.0))
    assert polled.loc["r1"].tpot_s == pytest.approx(1.25 * quiet.loc["r1"].tpot_s, rel=1e-9)
    assert polled.loc["r0"].tpot_s == pytest.approx(quiet.loc["r0"].tpot_s, rel=1e-12)  # nobody polled before
    # a poll of 0.2 s: r1's run is timed again when it ends, so only its first part is slower
    short, _, _ = run(cluster, reqs, ServingCosts(host_cores=2, engine_cpu=1.5, idle_poll_s=0.2, idle_poll_cpu=1.0))
    r0_done = quiet.loc["r0"].finish_s
    assert r0_done < 0.05
    polled_steps = (r0_done + 0.2 - quiet.loc["r1"].first_token_s) / (1.25 * quiet.loc["r1"].tpot_s)
    expected = quiet.loc["r1"].tpot_s * (1 + 0.25 * polled_steps / 199)
    assert short.loc["r1"].tpot_s == pytest.approx(expected, rel=0.02)
    # no cores named, no poll
    none, _, _ = run(cluster, reqs, ServingCosts(host_cores=2, engine_cpu=1.5, idle_poll_s=100.0))
    assert none.loc["r1"].tpot_s == pytest.approx(quiet.loc["r1"].tpot_s, rel=1e-12)


def test_a_poll_takes_its_cores_only_from_its_delay_after_the_last_step():
    # r1 starts right after r0's engine stopped: with a delay of 0.1 s its steps run at their own pace until the
    # poll takes hold, 1.25x slower after, and at its own pace again when the poll ends
    reqs = Listed(req(0, 0.0, 100, 2), req(1, 0.05, 100, 200))
    cluster = colocated(n=2, block_size=BLOCK)
    quiet, _, _ = run(cluster, reqs, ServingCosts(host_cores=2, engine_cpu=1.5))
    costs = dict(host_cores=2, engine_cpu=1.5, idle_poll_s=0.3, idle_poll_cpu=1.0)
    at_once, _, _ = run(cluster, reqs, ServingCosts(**costs))
    delayed, _, _ = run(cluster, reqs, ServingCosts(**costs, idle_poll_delay_s=0.1))
    q = quiet.loc["r1"]
    polled_from, polled_to = quiet.loc["r0"].finish_s + 0.1, quiet.loc["r0"].finish_s + 0.3
    assert q.first_token_s < polled_from < polled_to < q.finish_s  # the poll falls inside r1's decode
    slow = (polled_to - polled_from) / (1.25 * q.tpot_s)  # steps taken while it polls
    assert delayed.loc["r1"].tpot_s == pytest.approx(q.tpot_s * (1 + 0.25 * slow / 199), rel=0.02)
    assert q.tpot_s < delayed.loc["r1"].tpot_s < at_once.loc["r1"].tpot_s
    # the delay cannot outlast the poll
    with pytest.raises(ValueError, match="idle_poll_delay_s .* must be <= idle_poll_s"):
        ServingCosts(**costs, idle_poll_delay_s=0.5)


def test_an_api_server_sees_its_own_stepping_engine_as_own_engine_cpu_and_any_other_as_engine_cpu():
    from types import SimpleNamespace

    from omnisim.sim.serving import HostCPU

    def host(**costs):
        h = HostCPU(ServingCosts(host_cores=2, engine_cpu=1.5, **costs), Fifo())
        stepping = SimpleNamespace(busy=True, idle_since=-math.inf, api=Fifo())
        idle = SimpleNamespace(busy=False, idle_since=-math.inf, api=Fifo())
        h.instances += [stepping, idle]
        return h, stepping, idle

    for own in (0.0, 1.0, 1.5):
        h, stepping, idle = host(own_engine_cpu=own)
        assert h.stretch(0.0, idle, False, 1e-3) == pytest.approx(1.25)  # the other server's API: 1 + 1.5 of 2
        assert h.stretch(0.0, None, False, 1e-3) == pytest.approx(1.25)  # the proxy's likewise
        assert h.stretch(0.0, idle, True, 1e-3) == pytest.approx(1.5)  # an engine step beside it: 1.5 + 1.5 of 2
        assert h.stretch(0.0, stepping, False, 1e-3) == pytest.approx(max(1.0, (1 + own) / 2))  # its own API


def test_the_hypervisors_steal_slows_every_cpu_job_even_on_idle_cores():
    # one stream on two cores: nothing shares them, but the host takes 20% of the time each core wants to run
    costs = ServingCosts(frontend_s=0.01, api_step_s=1e-4, host_cores=2, engine_cpu=1.5)
    clean, _, _ = one(output=20, serving=costs)
    stolen, inst, _ = one(output=20, serving=dataclasses.replace(costs, steal=0.2))
    assert stolen.tpot_s == pytest.approx(clean.tpot_s / 0.8, rel=1e-9)
    assert stolen.ttft_s == pytest.approx(clean.ttft_s / 0.8, rel=1e-9)
    assert not ServingCosts(steal=0.5).active  # only with host_cores
    off, _, _ = one(output=20, serving=ServingCosts(frontend_s=0.01, api_step_s=1e-4, steal=0.5))
    on, _, _ = one(output=20, serving=ServingCosts(frontend_s=0.01, api_step_s=1e-4))
    assert off.tpot_s == on.tpot_s


def test_a_process_busy_for_part_of_a_step_counts_by_that_part():
    # A lone stream: its API server works 10% of each step (1.5 + 0.1 cores wanted of 2: no slowdown); counted as a
    # whole core for the step it would be 2.5 of 2 and every step 1.25x longer.
    base, _, _ = one(output=20)
    work = base.tpot_s / 10
    plain, _, _ = one(output=20, serving=ServingCosts(api_step_s=work))
    hosted, _, _ = one(output=20, serving=ServingCosts(api_step_s=work, host_cores=2, engine_cpu=1.5))
    assert hosted.tpot_s == pytest.approx(plain.tpot_s, rel=1e-9)
    # the same API server busy for most of each step: the steps slow down
    busy, _, _ = one(output=20, serving=ServingCosts(api_step_s=8 * work, host_cores=2, engine_cpu=1.5))
    plain_busy, _, _ = one(output=20, serving=ServingCosts(api_step_s=8 * work))
    assert busy.tpot_s > plain_busy.tpot_s * 1.1


def test_work_queued_for_later_leaves_a_process_idle_until_it_arrives():
    f = Fifo()
    f.add(1.0, 0.001)  # one job at t=1 s
    assert f.share(0.0, 0.5) == 0.0 and f.share(0.9995, 0.001) == pytest.approx(0.5)
    assert f.share(1.0, 0.0) == 1.0 and f.share(0.5, 0.0) == 0.0
    g = Fifo()
    g.add_steps(2.0, 2.1, 11, 0.002)  # 11 jobs of 2 ms spread over 2.0 .. 2.102 s
    assert g.share(2.0, 0.05) == pytest.approx(0.022 / 0.102) and g.share(1.0, 0.5) == 0.0


def test_the_proxys_cost_per_chunk_slows_a_lone_stream_by_its_share_of_the_cores_only():
    # a stream on two cores: its engine wants 1.6, its API server 30% of each 4 ms step, the proxy 1%; all fits.
    # The proxy's next chunk waits for the API server: counted busy from the moment it was queued, the proxy made
    # the whole run 1.2x longer
    base = ServingCosts(api_step_s=1.2e-3, host_cores=2, engine_cpu=1.6)
    plain, _, _ = one(output=40, serving=base)
    relayed, _, _ = one(output=40, serving=dataclasses.replace(base, proxy_token_s=5e-5))
    assert relayed.tpot_s == pytest.approx(plain.tpot_s, rel=0.005)


def test_a_request_arriving_mid_run_queues_behind_the_tokens_made_before_it_not_ahead():
    # r1's front-end work (30 ms) reaches r0's API server while r0 streams (4 ms steps, 2 ms of API work a token):
    # the tokens r0 made before it are sent first. Queued at the end of r0's run, behind r1's work, they made r0
    # 34 ms late and r1's first token wait for all of them (0.33 s).
    costs = ServingCosts(frontend_s=0.03, token_s=2e-3)
    alone, _, _ = run(colocated(n=1, block_size=BLOCK), Listed(req(0, 0.0, 100, 80)), costs)
    both, _, _ = run(colocated(n=1, block_size=BLOCK), Listed(req(0, 0.0, 100, 80), req(1, 0.2, 100, 2)), costs)
    assert both.loc["r0"].finish_s < alone.loc["r0"].finish_s + 0.005  # r1's steps in its batch, r1's response
    assert 0.2 + 0.03 < both.loc["r1"].first_token_s < 0.2 + 0.03 + 0.03  # its front-end, its prefill, a few tokens


# -- whole runs ----------------------------------------------------------------------------------------------------
def test_a_served_run_accounts_for_every_request_and_is_deterministic():
    costs = ServingCosts(frontend_s=0.01, token_s=5e-4, response_s=0.002, step_s=5e-4, kv_rule="example_connector",
                         kv_load_s=0.002, kv_save_s=0.001, host_cores=2, engine_cpu=1.3, background_cores=0.5)
    wl = Workload(n=200, rate=20.0, prompt=(40, 400), output=(2, 40))
    a, _, _ = run(pd_cluster(p=1, d=1, block_size=BLOCK), wl, costs)
    b, _, _ = run(pd_cluster(p=1, d=1, block_size=BLOCK), wl, costs)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert len(a) == 200 and (a.status == "ok").all()
    assert (a.first_token_s >= a.arrival_s).all() and (a.finish_s >= a.first_token_s).all()
    base, _, _ = run(pd_cluster(p=1, d=1, block_size=BLOCK), wl, None)
    assert (a.ttft_s > base.ttft_s.reindex(a.index)).all()


@pytest.mark.parametrize("field, value, words", [
    ("frontend_s", -1.0, "serving.frontend_s must be >= 0"),
    ("token_s", math.nan, "serving.token_s: expected a finite number"),
    ("kv_rule", "nfs", "serving.kv_rule: expected one of"),
    ("host_cores", 1.5, "serving.host_cores"),
    ("engine_cpu", 0.0, "serving.engine_cpu must be > 0"),
    ("step_factor", 0.0, "serving.step_factor must be > 0"),
    ("warm_tokens", 1.5, "serving.warm_tokens: expected a whole number"),
    ("new_shape_s", -0.001, "serving.new_shape_s must be >= 0"),
    ("admit_s", -0.001, "serving.admit_s must be >= 0"),
    ("idle_poll_s", -1.0, "serving.idle_poll_s must be >= 0"),
    ("steal", 1.0, "serving.steal must be < 1"),
    ("idle_poll_cpu", math.inf, "serving.idle_poll_cpu: expected a finite number"),
])
def test_bad_serving_values_fail_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        ServingCosts(**{field: value})


def test_bad_serving_value_through_the_app_names_the_key():
    with pytest.raises(ValueError, match=r"serving\.step_s"):
        build_experiment(cfg("experiment=cpu_tiny_colocated", "serving.step_s=-0.1"))
