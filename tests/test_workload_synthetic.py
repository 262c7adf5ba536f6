"""Synthetic workloads: arrivals, lengths, limits, determinism, shared prefixes, summaries."""
from __future__ import annotations

import numpy as np
import pytest

from omnisim.core import Request
from omnisim.workload import (
    Fixed, GammaWorkload, IndependentLengths, Lognormal, PoissonWorkload, PrefixSpec, RequestList, Uniform,
    Workload, chain_hash, summarize_workload,
)

SMALL = IndependentLengths(Uniform(10, 2000), Uniform(1, 300))


def poisson(**kwargs) -> PoissonWorkload:
    args = dict(seed=1, rate=4.0, lengths=SMALL, max_requests=2000)
    args.update(kwargs)
    return PoissonWorkload(**args)


def arrivals(workload: Workload) -> np.ndarray:
    return np.array([r.arrival_s for r in workload.requests()])


def test_requests_are_ordered_unique_and_valid():
    workload = poisson()
    assert isinstance(workload, Workload)
    requests = list(workload.requests())
    assert len(requests) == 2000
    assert [r.id for r in requests[:3]] == ["r0", "r1", "r2"]
    assert len({r.id for r in requests}) == len(requests)
    times = np.array([r.arrival_s for r in requests])
    assert np.all(np.diff(times) >= 0) and 0 <= times[0] < 2.0
    assert all(10 <= r.prompt_tokens <= 2000 and 1 <= r.output_tokens <= 300 for r in requests)
    assert all(r.prefix_hashes == () for r in requests)


def test_same_seed_same_sequence_fresh_iterator_each_call():
    workload = poisson()
    first = workload.requests()
    assert next(first) == next(workload.requests())  # a second call does not share the first iterator's state
    assert list(workload.requests()) == list(poisson().requests())
    assert list(poisson(seed=2).requests()) != list(workload.requests())


def test_limits_do_not_change_the_requests_they_keep():
    long = list(poisson(max_requests=3000).requests())
    assert list(poisson(max_requests=1500).requests()) == long[:1500]


def test_poisson_rate_and_cv():
    summary = summarize_workload(poisson(rate=10.0, max_requests=20000))
    assert summary["mean_rate_per_s"] == pytest.approx(10.0, rel=0.03)
    assert summary["interarrival_cv"] == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_cv_close_to_asked(cv):
    workload = GammaWorkload(seed=3, rate=5.0, cv=cv, lengths=SMALL, max_requests=40000)
    summary = summarize_workload(workload)
    assert summary["interarrival_cv"] == pytest.approx(cv, rel=0.08)
    assert summary["mean_rate_per_s"] == pytest.approx(5.0, rel=0.08)


def test_gamma_cv_zero_is_evenly_spaced():
    times = arrivals(GammaWorkload(seed=0, rate=2.0, cv=0.0, lengths=SMALL, max_requests=5))
    np.testing.assert_allclose(times, [0.5, 1.0, 1.5, 2.0, 2.5])


def test_rate_scale_divides_arrival_times():
    base = arrivals(poisson())
    np.testing.assert_allclose(arrivals(poisson(rate_scale=2.0)), base / 2.0)


def test_duration_limit_applies_after_scaling():
    times = arrivals(poisson(max_requests=None, duration_s=100.0, rate_scale=2.0))
    assert times.max() < 100.0
    assert len(times) == pytest.approx(800, rel=0.12)  # 4 req/s * 2 * 100 s


def test_unbounded_synthetic_workload_is_refused():
    with pytest.raises(ValueError, match="max_requests or workload.duration_s"):
        PoissonWorkload(seed=0, rate=1.0, lengths=SMALL)


@pytest.mark.parametrize("kwargs, field", [
    (dict(rate=0.0), "workload.rate"), (dict(rate_scale=-1.0), "workload.rate_scale"),
    (dict(max_requests=-1), "workload.max_requests"), (dict(duration_s=0.0), "workload.duration_s"),
    (dict(lengths=Fixed(3).value), "workload.lengths"),
    (dict(lengths=Lognormal(mean=100, cv=1)), "workload.lengths must draw .prompt, output. pairs"),
])
def test_bad_synthetic_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        poisson(**kwargs)


def test_rate_steps_shape_the_rate_and_pause():
    workload = poisson(rate=10.0, max_requests=None, duration_s=300.0,
                       rate_steps=[[0, 1.0], [100, 3.0], [200, 0.0], [250, 1.0]])
    counts, _ = np.histogram(arrivals(workload), bins=[0, 100, 200, 250, 300])
    assert counts[0] == pytest.approx(1000, rel=0.1)
    assert counts[1] == pytest.approx(3000, rel=0.1)
    assert counts[2] == 0
    assert counts[3] == pytest.approx(500, rel=0.15)


@pytest.mark.parametrize("steps", [[[5, 1.0]], [[0, 1.0], [0, 2.0]], [[0, 1.0], [10, 0.0]], [[0, -1.0]], [[0]]])
def test_bad_rate_steps_are_refused(steps):
    with pytest.raises(ValueError, match="rate_steps"):
        poisson(rate_steps=steps)


def test_lognormal_by_mean_and_cv():
    rng = np.random.default_rng(0)
    values = Lognormal(mean=1000, cv=0.8).sample(rng, 200_000)
    assert values.mean() == pytest.approx(1000, rel=0.02)
    assert values.std() / values.mean() == pytest.approx(0.8, rel=0.05)
    assert values.min() >= 1


def test_lognormal_by_mu_sigma_and_clipping():
    values = Lognormal(mu=5.0, sigma=1.0, low=50, high=400).sample(np.random.default_rng(0), 10_000)
    assert values.min() == 50 and values.max() == 400
    assert np.median(values) == pytest.approx(np.exp(5.0), rel=0.05)


@pytest.mark.parametrize("kwargs", [dict(mean=10), dict(mean=10, cv=1, mu=1, sigma=1), dict(), dict(mean=-1, cv=1),
                                    dict(mu=1, sigma=0), dict(mean=10, cv=1, low=5, high=2)])
def test_bad_lognormal_is_refused(kwargs):
    with pytest.raises(ValueError, match="Lognormal"):
        Lognormal(**kwargs)


def test_fixed_and_uniform_lengths():
    rng = np.random.default_rng(0)
    assert set(Fixed(7).sample(rng, 10)) == {7}
    values = Uniform(3, 5).sample(rng, 1000)
    assert set(values) == {3, 4, 5}
    with pytest.raises(ValueError, match="Fixed"):
        Fixed(0)
    with pytest.raises(ValueError, match="Uniform"):
        Uniform(5, 3)


def test_chain_hash_is_fixed_across_processes():
    # Pinned values: Python's salted hash() would change them from run to run.
    assert chain_hash(0, 0, 0, 0) == 2836197103604842432
    assert chain_hash(12345, 1, 7, 3, 2) == 1779941283008481079


def test_shared_prefixes_give_equal_leading_hashes():
    prefix = PrefixSpec(num_prefixes=4, prefix_tokens=1100, zipf_s=1.0, share_fraction=0.8, hash_block_tokens=512)
    requests = list(poisson(prefix=prefix, lengths=IndependentLengths(Uniform(1, 3000), Fixed(5))).requests())
    for r in requests:
        assert r.hash_block_tokens == 512
        assert (len(r.prefix_hashes) - 1) * 512 < r.prompt_tokens <= len(r.prefix_hashes) * 512
    by_first_block: dict[int, list[Request]] = {}
    for r in requests:
        by_first_block.setdefault(r.prefix_hashes[0], []).append(r)
    groups = sorted((g for g in by_first_block.values() if len(g) > 1), key=len, reverse=True)
    assert 1 < len(groups) <= 4  # one group per system prompt
    assert len(groups[0]) > len(groups[-1])  # Zipf: prefix 0 is the most popular
    for group in groups:
        assert len({r.prefix_hashes[:2] for r in group}) == 1  # 1100 tokens = two full shared blocks
        assert len({r.prefix_hashes[2:3] for r in group}) == len(group)  # the third block mixes in the request
    assert sum(map(len, groups)) == pytest.approx(0.8 * len(requests), rel=0.1)
    all_hashes = [h for r in requests for h in r.prefix_hashes[2:]]
    assert len(set(all_hashes)) == len(all_hashes)  # unshared blocks never collide


def test_prefix_reuse_shows_in_the_summary():
    many = PrefixSpec(num_prefixes=1000, prefix_tokens=4096, share_fraction=1.0)
    few = PrefixSpec(num_prefixes=2, prefix_tokens=4096, share_fraction=1.0)
    lengths = IndependentLengths(Fixed(512), Fixed(1))
    hit_few = summarize_workload(poisson(prefix=few, lengths=lengths))["prefix_hit_token_fraction"]
    hit_many = summarize_workload(poisson(prefix=many, lengths=lengths))["prefix_hit_token_fraction"]
    assert hit_few == pytest.approx((2000 - 2) * 4096 / (2000 * 4608), rel=1e-6)
    assert hit_many < hit_few


@pytest.mark.parametrize("kwargs", [dict(num_prefixes=0, prefix_tokens=10), dict(num_prefixes=1, prefix_tokens=0),
                                    dict(num_prefixes=1, prefix_tokens=10, share_fraction=1.5),
                                    dict(num_prefixes=1, prefix_tokens=10, hash_block_tokens=0)])
def test_bad_prefix_spec_is_refused(kwargs):
    with pytest.raises(ValueError, match="prefix"):
        PrefixSpec(**kwargs)


def test_summary_of_a_known_list():
    workload = RequestList([
        Request("a", 0.0, 100, 10, (1, 2), 64),
        Request("b", 1.0, 200, 20, (1, 3, 4), 64),
        Request("c", 3.0, 300, 30),
    ])
    summary = summarize_workload(workload)
    assert summary["count"] == 3 and summary["span_s"] == 3.0
    assert summary["mean_rate_per_s"] == pytest.approx(2 / 3)
    assert summary["interarrival_cv"] == pytest.approx(0.5 / 1.5)
    assert summary["prompt_mean"] == 200 and summary["output_max"] == 30
    assert summary["prefix_hit_token_fraction"] == pytest.approx(64 / 600)
    assert summarize_workload(RequestList([])) == {"count": 0}


def test_request_list_checks_order_and_ids():
    with pytest.raises(ValueError, match="duplicate id"):
        RequestList([Request("a", 0.0, 1, 1), Request("a", 1.0, 1, 1)])
    with pytest.raises(ValueError, match="before the previous"):
        RequestList([Request("a", 1.0, 1, 1), Request("b", 0.0, 1, 1)])
