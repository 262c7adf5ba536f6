"""OmniAttn (attention=omni_attn) on decode instances: the two KV pools and their seats, decode attention capped at
the sink + recent window on compressed layers, smaller PD transfers, no prefix caching there; closed-form runs of
decode steps equal one event per step across window crossings; the emulator honours it the same way; the real
backends write OmniInfer's config (ascend) or refuse (vllm); bad setups fail naming the field."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from omnisim.attention import DecodePools, OmniAttn
from omnisim.experiment import Experiment
from omnisim.policies import RoundRobin
from omnisim.sim import Simulation
from tests.sim_fixtures import AffineCost, Listed, Workload, colocated, pd_cluster

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 4
# Half the layers compressed; sink 1 + recent 3 blocks of 16 tokens: a 64-token window.
SPEC = OmniAttn((1, 0, 1, 0), sink=1, recent=3, beta=0.2)
WINDOW = 64
KV_BYTES = 70_000.0


def experiment(cluster, workload, attention=SPEC, seed=0) -> Experiment:
    model = SimpleNamespace(kv_bytes_per_token=KV_BYTES, layers=LAYERS)
    return Experiment("omni-attn", seed, model, None, cluster, workload, RoundRobin(seed), None, AffineCost,
                      attention=attention)


def run(exp, **kw):
    sim = Simulation(exp, **kw)
    return sim, sim.run()


def ac(context: int) -> float:
    """The attention context of one sequence under SPEC (half the layers full, half capped at the window)."""
    return 0.5 * context + 0.5 * min(context, WINDOW)


# -- the spec ------------------------------------------------------------------------------------------------------
def test_decode_pools_follow_omniinfers_split_and_seat_every_request_at_the_window():
    pools = SPEC.decode_pools(1000, 16, LAYERS)
    full, comp = SPEC.pool_blocks(1000)
    assert (full, comp) == (int(1000 * (1 + 0.8 * 2 / 3)), 200)
    assert pools == DecodePools(full, 200 // 4, 200, 4, WINDOW, 0.5, 0.5)
    assert pools.seat_usage == 4 / 200
    for c in (0, 1, 63, 64, 65, 5000):
        assert pools.attention_context(c) == SPEC.attention_context(c, 16, LAYERS) == ac(c)


def test_the_mtp_entry_is_no_model_layer_and_the_shipped_r1_pattern_fits_r1():
    spec = OmniAttn((1, 0, 1, 0, 1))  # four layers + a compressed MTP layer
    spec.check_model(4)
    assert spec.model_fractions(4) == (0.5, 0.5)
    import yaml

    shipped = yaml.safe_load((ROOT / "conf" / "attention" / "omni_attn.yaml").read_text())
    r1 = OmniAttn(tuple(shipped["pattern"]))
    r1.check_model(61)
    assert len(r1.pattern) == 62 and r1.compressed == 30
    assert r1.omniinfer_config() == {"sink": 1, "recent": 3, "beta": 0.2, "pattern": list(shipped["pattern"])}
    assert type(r1.omniinfer_config()["beta"]) is float  # OmniInfer's check wants a float


# -- exactness -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_kv,rate", [(100_000, 6), (9_000, 40)], ids=["roomy", "tight-preempting"])
def test_bulk_decode_runs_equal_one_event_per_step_across_window_crossings(d_kv, rate):
    # Prompts of 5..600 tokens around the 64-token window: many sequences cross it while decoding.
    wl = dict(n=160, rate=rate, prompt=(5, 600), output=(1, 400))
    fast_sim, fast = run(experiment(pd_cluster(d_kv=d_kv), Workload(**wl)))
    exact = run(experiment(pd_cluster(d_kv=d_kv), Workload(**wl)), max_run_steps=1)[1].records
    fast = fast.records
    assert (fast.status == "ok").all()
    if d_kv < 100_000:
        assert fast.preemptions.sum() > 0  # preemption leaves the window bookkeeping right too
    times = [c for c in fast if c.endswith("_s")]
    pd.testing.assert_frame_equal(fast.drop(columns=times), exact.drop(columns=times))
    for col in times:
        np.testing.assert_allclose(fast[col], exact[col], rtol=1e-9, atol=1e-9, err_msg=col)
    # the spec changed the timing (the test is not comparing two full-attention runs)
    full = run(experiment(pd_cluster(d_kv=d_kv), Workload(**wl), attention=None))[1].records
    assert not np.allclose(full.finish_s, fast.finish_s)
    decode = fast_sim.instances[-1].sched
    assert decode.win_sum == decode.below == decode.ctx_sum == 0


def test_the_window_bookkeeping_matches_a_recount_after_every_step():
    sim = Simulation(experiment(pd_cluster(d_kv=9_000), Workload(n=120, rate=40, prompt=(5, 600), output=(1, 400))))
    sched = sim.instances[-1].sched
    complete = sched.complete
    checked = []

    def recount(*args):
        complete(*args)
        ctxs = [s.prompt + s.generated + sched.steps - s.join_step for s in sched.running.values()]
        assert sched.ctx_sum == sum(ctxs)
        assert sched.win_sum == sum(min(c, WINDOW) for c in ctxs)
        assert sched.below == sum(c < WINDOW for c in ctxs)
        checked.append(len(ctxs))

    sched.complete = recount
    sim.run()
    assert len(checked) > 100 and max(checked) > 1 and sched.n_preemptions > 0


@pytest.mark.parametrize("prompt,output", [(1000, 5), (30, 60)], ids=["past-the-window", "crosses-the-window"])
def test_one_request_is_timed_at_its_attention_context(prompt, output):
    cluster = pd_cluster(p=1, d=1)
    r = run(experiment(cluster, Listed((1.0, prompt, output))))[1].records.iloc[0]
    c = AffineCost()
    assert r.kv_transfer_end_s - r.prefill_end_s == pytest.approx(cluster.kv_link.transfer_s(ac(prompt) * KV_BYTES))
    assert r.first_token_s - r.kv_transfer_end_s == pytest.approx(c.step_time(0, 0, 0, 1, ac(prompt)))
    rest = sum(c.step_time(0, 0, 0, 1, ac(prompt + i)) for i in range(1, output))
    assert r.finish_s - r.first_token_s == pytest.approx(rest, rel=1e-12)
    # prefill runs full attention: the same prefill time as without OmniAttn
    plain = run(experiment(cluster, Listed((1.0, prompt, output)), attention=None))[1].records.iloc[0]
    assert r.prefill_end_s == plain.prefill_end_s


# -- what it changes -----------------------------------------------------------------------------------------------
def test_decode_batches_get_bigger_with_the_full_layers_pool():
    # Decode KV for about ten 2,000-token sequences: without OmniAttn the batch is KV bound.
    wl = dict(n=120, rate=20, prompt=(1500, 2500), output=(300, 600))
    plain_sim, plain = run(experiment(pd_cluster(d_kv=20_000), Workload(**wl), attention=None))
    omni_sim, omni = run(experiment(pd_cluster(d_kv=20_000), Workload(**wl)))
    p, o = plain.instances.iloc[-1], omni.instances.iloc[-1]
    assert o.kv_blocks == SPEC.decode_capacity(20_000 // 16)[0] > 1.5 * p.kv_blocks
    assert o.mean_decode_batch > 1.3 * p.mean_decode_batch
    assert o.preemptions < p.preemptions
    assert omni.records.finish_s.max() < plain.records.finish_s.max()


def test_seats_cap_the_batch_and_kv_usage_is_the_fuller_pool():
    spec = dataclasses.replace(SPEC, beta=0.05)  # compressed pool: int(1250 * 0.05) = 62 blocks = 15 seats
    sim = Simulation(experiment(pd_cluster(d_kv=20_000), Workload(n=80, rate=50, prompt=(100, 300),
                                                                  output=(200, 400)), attention=spec))
    decode = sim.instances[-1]
    assert decode.max_seqs == decode.sched.max_seqs == 15 and decode.state().max_num_seqs == 15
    sched, complete, seen = decode.sched, decode.sched.complete, []

    def watch(*args):
        complete(*args)
        held = len(sched.running) + len(sched.prefilling) + sched.transferring + len(sched.ready)
        assert held <= 15
        seen.append(held)
        bm = sched.bm
        assert decode.state().kv_usage == sched.kv_usage() == pytest.approx(max(held * 4 / 62, bm.used / bm.num_blocks))

    sched.complete = watch
    result = sim.run()
    assert max(seen) == 15
    assert result.instances.iloc[-1].peak_kv_usage == pytest.approx(15 * 4 / 62)


def test_tpot_falls_at_long_context_and_not_at_short():
    def tpot(prompt, attention, output=(100, 200)):
        wl = Workload(n=60, rate=2, prompt=prompt, output=output)
        r = run(experiment(pd_cluster(), wl, attention=attention))[1].records
        return ((r.finish_s - r.first_token_s) / (r.output_tokens - 1)).median()

    assert tpot((4000, 6000), SPEC) < 0.97 * tpot((4000, 6000), None)
    # contexts that stay below the window (at most 20 + 40 tokens): every layer reads everything, nothing changes
    assert tpot((5, 20), SPEC, (2, 40)) == pytest.approx(tpot((5, 20), None, (2, 40)), rel=1e-12)


def test_kv_transfers_move_the_compressed_layers_windows_only():
    wl = dict(n=80, rate=5, prompt=(10, 3000), output=(1, 50))
    omni = run(experiment(pd_cluster(), Workload(**wl)))[1]
    plain = run(experiment(pd_cluster(), Workload(**wl), attention=None))[1]
    prompts = [r.prompt_tokens for r in Workload(**wl).requests()]
    assert omni.extra["kv_bytes_moved"] == pytest.approx(sum(ac(p) for p in prompts) * KV_BYTES)
    assert plain.extra["kv_bytes_moved"] == pytest.approx(sum(prompts) * KV_BYTES)
    moved = lambda r: (r.kv_transfer_end_s - r.prefill_end_s).mean()  # noqa: E731
    assert moved(omni.records) < 0.7 * moved(plain.records)


def test_prefix_caching_is_off_on_decode_instances_only():
    wl = Workload(n=80, rate=5, prefixes=3)
    sim, res = run(experiment(pd_cluster(), wl))
    prefill, decode = sim.instances[0], sim.instances[-1]
    assert prefill.sched.caching and not decode.sched.caching
    assert res.records.cached_tokens.sum() > 0  # prefill instances still hit
    # what policies see: nothing is ever cached on the decode instance, prefill instances hold prefixes
    assert decode.bm.refs == {} and all(sim.prefix.cached_tokens(req, decode.id) == 0 for req in wl.requests())
    assert any(sim.prefix.cached_tokens(req, prefill.id) > 0 for req in wl.requests())


# -- bad setups ----------------------------------------------------------------------------------------------------
def test_a_pattern_that_does_not_fit_the_model_names_attention_pattern():
    with pytest.raises(ValueError, match=r"attention\.pattern has 4 entries; the model has 6 layers"):
        Simulation(dataclasses.replace(experiment(pd_cluster(), Workload(n=5)),
                                       model=SimpleNamespace(kv_bytes_per_token=KV_BYTES, layers=6)))


def test_a_colocated_cluster_is_refused_naming_attention():
    with pytest.raises(ValueError, match="attention=omni_attn: OmniAttn runs on the decode instances"):
        Simulation(experiment(colocated(), Workload(n=5)))


def test_a_compressed_pool_with_no_seat_is_refused():
    with pytest.raises(ValueError, match=r"cluster\.decode: .*seats no sequence.*attention\.beta"):
        Simulation(experiment(pd_cluster(d_kv=9_000), Workload(n=5), attention=dataclasses.replace(SPEC, beta=0.001)))


@pytest.mark.parametrize("kwargs,field", [(dict(pattern=()), "attention.pattern"),
                                          (dict(pattern=(0, 2)), r"attention.pattern\[1\]"),
                                          (dict(pattern=(1,), sink=-1), "attention.sink"),
                                          (dict(pattern=(1,), recent=0), "attention.recent"),
                                          (dict(pattern=(1,), beta=1.0), "attention.beta")])
def test_bad_specs_name_their_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OmniAttn(**kwargs)


def omnisim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnisim.app", *args, "workload.max_requests=3",
                           f"hydra.run.dir={cwd / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


@pytest.mark.parametrize("args,message", [
    (("attention=omni_attn",), "attention.pattern has 62 entries; the model has 32 layers"),
    (("backend=vllm", "experiment=omniinfer_r1_7p1d", "attention=omni_attn"),
     "attention=omni_attn: upstream vLLM has no OmniAttn"),
], ids=["pattern-vs-llama", "vllm-refuses"])
def test_the_command_line_error_is_one_line(tmp_path, args, message):
    out = omnisim(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("omnisim: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in out.stderr, out.stderr


def test_vllm_refuses_before_starting_anything(tmp_path):
    from backends.vllm.backend import VllmBackend

    backend = VllmBackend(start_servers=True)
    with pytest.raises(ValueError, match="upstream vLLM has no OmniAttn"):
        backend.run(experiment(pd_cluster(), Workload(n=3)), tmp_path)
    assert not any(tmp_path.iterdir())


# -- the emulator --------------------------------------------------------------------------------------------------
class Recording:
    def __init__(self):
        self.calls = []

    def step_time(self, pt, pa, pc, n, ctx, imb=1.0):
        self.calls.append((pt, n, ctx))
        return 0.0


@pytest.mark.timeout(60)
def test_the_emulator_honours_the_spec_as_the_simulator_does():
    import asyncio

    from backends.emulator import EmulatedEngine

    async def main():
        model = Recording()
        engine = EmulatedEngine(model, block_size=16, kv_capacity_tokens=20_000, time_scale=0.0, attention=SPEC,
                                layers=LAYERS)
        pools = SPEC.decode_pools(20_000 // 16, 16, LAYERS)
        assert engine.pool.num_blocks == pools.full_blocks and engine.max_num_seqs == min(256, pools.seats)
        assert engine.kv_capacity_tokens == pools.full_blocks * 16 and not engine.sched.caching
        moved = []
        link = EmulatedEngine.link(lambda tokens: moved.append(tokens) or 0.0)
        await engine.start()
        seq = engine.make_sequence("a", list(range(30)), 60, remote_kv=True)
        engine.add(seq, link)
        while not seq.done:
            await seq.changed.wait()
            seq.changed.clear()
        await engine.stop()
        assert seq.error is None and seq.generated == 60
        assert moved == [ac(30)]
        # one decode step per token, each timed at the attention context (the window is crossed at step 34)
        assert model.calls == [(0, 1, ac(30 + i)) for i in range(60)]

    asyncio.run(main())


def test_the_emulator_backend_gives_decode_engines_the_spec_and_refuses_colocated():
    from hydra import compose, initialize_config_dir

    from backends.emulator.backend import EmulatorBackend
    from omnisim.app import CONF_DIR, build_experiment

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["backend=emulator", "experiment=omniinfer_r1_7p1d", "attention=omni_attn"])
    exp, backend = build_experiment(cfg)
    fleet = backend.fleet(exp)
    engines = {s.engine_id: s.engine for s in fleet.servers}
    assert engines["decode-0"].pools is not None and engines["prefill-0"].pools is None
    assert engines["prefill-0"].sched.caching and not engines["decode-0"].sched.caching
    with pytest.raises(ValueError, match="attention=omni_attn"):
        EmulatorBackend().fleet(dataclasses.replace(exp, cluster=colocated()))
    assert isinstance(backend, EmulatorBackend)
