"""Trace loaders on the real public traces in ../shared/traces (documented statistics in its README)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omnisim.workload import (
    AZURE_CONV_PATH, MOONCAKE_CONV_PATH, SHAREGPT_PATH, AzureTrace, EmpiricalLengths, MooncakeTrace, REPO_ROOT,
    ShareGPTWorkload, summarize_workload,
)

TRACES = REPO_ROOT / "../shared/traces"
pytestmark = pytest.mark.skipif(not TRACES.is_dir(), reason=f"public traces not found at {TRACES.resolve()}")


@pytest.fixture(scope="module")
def azure() -> AzureTrace:
    return AzureTrace(seed=0)


@pytest.fixture(scope="module")
def mooncake() -> MooncakeTrace:
    return MooncakeTrace(seed=0)


def arrivals(workload) -> np.ndarray:
    return np.array([r.arrival_s for r in workload.requests()])


def test_azure_conversation_matches_published_stats(azure):
    summary = summarize_workload(azure)
    assert summary["count"] == 19366
    assert summary["first_arrival_s"] == 0.0
    assert summary["span_s"] == pytest.approx(3501.72, abs=0.01)
    assert summary["mean_rate_per_s"] == pytest.approx(5.53, abs=0.01)
    assert summary["interarrival_cv"] == pytest.approx(1.09, abs=0.01)
    assert summary["prompt_mean"] == pytest.approx(1155, abs=1)
    assert (summary["prompt_p50"], summary["prompt_p99"], summary["prompt_max"]) == (1020, 4142, 14050)
    assert summary["output_mean"] == pytest.approx(211, abs=1)
    assert summary["output_max"] == 1000


def test_azure_seven_digit_timestamps_keep_sub_second_gaps(azure):
    requests = list(azure.requests())[:3]
    # 18:15:46.6805900, 18:15:50.9951690, 18:15:51.2224670
    assert [r.arrival_s for r in requests] == pytest.approx([0.0, 4.314579, 4.541877], abs=1e-6)
    assert [(r.prompt_tokens, r.output_tokens) for r in requests[:2]] == [(374, 44), (396, 109)]
    assert len({r.id for r in azure.requests()}) == 19366


def test_rate_scale_halves_the_span(azure):
    fast = AzureTrace(seed=0, rate_scale=2.0)
    np.testing.assert_allclose(arrivals(fast), arrivals(azure) / 2.0)


def test_trace_limits_and_start_offset(azure):
    assert len(list(AzureTrace(seed=0, max_requests=100).requests())) == 100
    window = arrivals(AzureTrace(seed=0, duration_s=60.0))
    assert window.max() < 60.0 and len(window) == int(np.sum(arrivals(azure) < 60.0))
    scaled = arrivals(AzureTrace(seed=0, duration_s=60.0, rate_scale=2.0))
    assert len(scaled) == int(np.sum(arrivals(azure) < 120.0))
    late = arrivals(AzureTrace(seed=0, start_s=1000.0, duration_s=10.0))
    expected = arrivals(azure)
    expected = expected[(expected >= 1000.0) & (expected < 1010.0)] - 1000.0
    np.testing.assert_allclose(late, expected)
    with pytest.raises(ValueError, match="start_s"):
        AzureTrace(seed=0, start_s=1e6)


def test_relative_default_path_works_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert next(AzureTrace(seed=0, path=AZURE_CONV_PATH).requests()).prompt_tokens == 374


def test_mooncake_matches_published_stats_and_hash_invariant(mooncake):
    requests = list(mooncake.requests())
    assert len(requests) == 12031
    assert np.mean([r.prompt_tokens for r in requests]) == pytest.approx(12035, abs=1)
    assert np.mean([r.output_tokens for r in requests]) == pytest.approx(343, abs=1)
    for r in requests:
        assert r.hash_block_tokens == 512
        assert (len(r.prefix_hashes) - 1) * 512 < r.prompt_tokens <= len(r.prefix_hashes) * 512
    assert requests[0].prefix_hashes == tuple(range(14))  # ids kept as the trace's ints
    assert requests[1].prefix_hashes[:2] == (0, 14)
    summary = summarize_workload(mooncake)
    assert summary["prefix_hit_token_fraction"] == pytest.approx(0.374, abs=0.001)
    assert summary["mean_rate_per_s"] == pytest.approx(3.40, abs=0.02)


def test_mooncake_bucket_spreading(mooncake):
    raw = MooncakeTrace(seed=0, spread_buckets=False)
    raw_times, spread_times = arrivals(raw), arrivals(mooncake)
    assert len(np.unique(raw_times)) == 1180  # about 10 requests per 3 s bucket
    assert len(np.unique(spread_times)) == len(spread_times)
    assert np.all(np.diff(spread_times) >= 0)
    # Each request stays inside its bucket: [its timestamp, the next distinct timestamp).
    buckets = np.unique(raw_times)
    upper = np.append(buckets[1:], np.inf)[np.searchsorted(buckets, raw_times)]
    assert np.all((spread_times >= raw_times) & (spread_times < upper))
    assert summarize_workload(raw)["interarrival_cv"] > 3.0  # the artificial bursts
    assert summarize_workload(mooncake)["interarrival_cv"] == pytest.approx(1.0, abs=0.1)
    # Spreading keeps file order: the same rows in the same order.
    assert [r.prompt_tokens for r in mooncake.requests()] == [r.prompt_tokens for r in raw.requests()]


def test_mooncake_spreading_is_seeded(mooncake):
    np.testing.assert_array_equal(arrivals(MooncakeTrace(seed=0)), arrivals(mooncake))
    assert not np.array_equal(arrivals(MooncakeTrace(seed=1)), arrivals(mooncake))


def test_mooncake_rate_scale_and_limits(mooncake):
    np.testing.assert_allclose(arrivals(MooncakeTrace(seed=0, rate_scale=2.0)), arrivals(mooncake) / 2.0)
    limited = list(MooncakeTrace(seed=0, max_requests=50, duration_s=5.0).requests())
    assert 0 < len(limited) <= 50 and limited[-1].arrival_s < 5.0


def test_sharegpt_lengths_file_and_workload():
    lengths = EmpiricalLengths(SHAREGPT_PATH, "num_prefill_tokens", "num_decode_tokens")
    assert len(lengths.prompts) == 30731
    assert lengths.prompts.mean() == pytest.approx(2340, abs=1)
    assert lengths.outputs.mean() == pytest.approx(439, abs=1)
    workload = ShareGPTWorkload(seed=5, rate=8.0, max_requests=20000)
    summary = summarize_workload(workload)
    assert summary["prompt_mean"] == pytest.approx(2340, rel=0.03)
    assert summary["mean_rate_per_s"] == pytest.approx(8.0, rel=0.03)
    assert summary["prompt_max"] <= 8141
    assert list(ShareGPTWorkload(seed=5, rate=8.0, max_requests=50).requests()) == list(workload.requests())[:50]
    assert list(ShareGPTWorkload(seed=6, rate=8.0, max_requests=50).requests()) != list(workload.requests())[:50]


def test_azure_lengths_as_empirical_lengths():
    lengths = EmpiricalLengths(AZURE_CONV_PATH, "ContextTokens", "GeneratedTokens")
    prompts, outputs = lengths.sample(np.random.default_rng(0), 50_000)
    assert prompts.mean() == pytest.approx(1155, rel=0.03)
    assert outputs.mean() == pytest.approx(211, rel=0.03)


def test_mooncake_default_path_constant_points_at_the_shared_trace():
    assert (REPO_ROOT / MOONCAKE_CONV_PATH).is_file()
    assert Path(REPO_ROOT / SHAREGPT_PATH).is_file()
