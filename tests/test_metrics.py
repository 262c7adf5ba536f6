"""Records schema, summariser, confidence intervals, run comparison, run output and plots."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from omnisim.metrics import (
    RECORD_COLUMNS, SLO, compare_runs, compare_summaries, confidence_interval, format_summary, json_ready,
    read_records, records_frame, request_latencies, summarize, validate_records, write_plots, write_run,
)
from omnisim.metrics.plots import _peak_occupancy, _tokens_per_bin

NAN = math.nan
CONF_SLO = Path(__file__).resolve().parents[1] / "conf" / "slo"


def row(rid, arrival, prompt, out, cached=0, first=NAN, finish=NAN, status="ok", error="", prefill="p0",
        decode="d0", preemptions=0):
    """A record tuple; prefill/KV times are placed between arrival and first token so they are plausible."""
    started = arrival + 0.01 if math.isfinite(first) else NAN
    return (rid, arrival, prompt, out, cached, prefill, decode, arrival + 0.001 if started == started else NAN,
            started, started + 0.02, started + 0.021, started + 0.03, first, finish, preemptions, status, error)


def hand_frame() -> pd.DataFrame:
    # TTFT / TPOT / E2E of the completed rows (worked out by hand in the tests below):
    # r0: 0.5 / 0.1  / 1.5     r1: 1.0 / 0.04 / 1.16    r2: 3.0 / -    / 3.0
    # r3: 0.2 / 0.02 / 0.6     r6: 0.5 / -    / 0.5
    return records_frame([
        row("r0", 0.0, 100, 11, cached=50, first=0.5, finish=1.5),
        row("r1", 1.0, 200, 5, first=2.0, finish=2.16, prefill="p1"),
        row("r2", 2.0, 300, 1, cached=100, first=5.0, finish=5.0),
        row("r3", 3.0, 400, 21, cached=200, first=3.2, finish=3.6, preemptions=2),
        row("r4", 4.0, 1000, 0, status="dropped", error="queue full", prefill="", decode=""),
        row("r5", 4.5, 500, 3, cached=500, first=4.6, status="error", error="upstream 500", prefill="p1"),
        row("r6", 5.0, 100, 1, first=5.5, finish=5.5),
    ])


# ---- schema -------------------------------------------------------------------------------------------------


def test_records_frame_has_schema_columns_and_dtypes():
    df = hand_frame()
    assert list(df.columns) == list(RECORD_COLUMNS)
    assert {c: str(t) for c, t in df.dtypes.items()} == dict(RECORD_COLUMNS)
    assert df.loc[4, "prefill_instance"] == "" and math.isnan(df.loc[4, "first_token_s"])


def test_parquet_round_trip_preserves_values_and_dtypes(tmp_path):
    df = hand_frame()
    df.to_parquet(tmp_path / "requests.parquet", index=False)
    back = read_records(tmp_path / "requests.parquet")
    pd.testing.assert_frame_equal(back, df)
    assert {c: str(t) for c, t in back.dtypes.items()} == dict(RECORD_COLUMNS)


def test_empty_records_frame_is_valid():
    df = records_frame([])
    assert len(df) == 0 and list(df.columns) == list(RECORD_COLUMNS)
    validate_records(df)


def test_validate_rejects_missing_column_by_name():
    with pytest.raises(ValueError, match="missing column.*first_token_s"):
        validate_records(hand_frame().drop(columns=["first_token_s"]))


def test_validate_rejects_extra_column_and_bad_dtype():
    df = hand_frame()
    with pytest.raises(ValueError, match="unexpected column.*ttft"):
        validate_records(df.assign(ttft=1.0))
    with pytest.raises(ValueError, match="'prompt_tokens' has dtype float64"):
        validate_records(df.astype({"prompt_tokens": "float64"}))
    with pytest.raises(ValueError, match="'request_id' has dtype"):
        validate_records(df.astype({"request_id": object}))


def test_validate_rejects_bad_values():
    df = hand_frame()
    bad_status = df.copy()
    bad_status.loc[2, "status"] = "finished"
    with pytest.raises(ValueError, match="'status', row 2: 'finished'"):
        validate_records(bad_status)
    duplicate = df.copy()
    duplicate.loc[3, "request_id"] = "r0"
    with pytest.raises(ValueError, match="'request_id', row 3: duplicate id 'r0'"):
        validate_records(duplicate)
    unfinished = df.copy()
    unfinished.loc[1, "finish_s"] = NAN
    with pytest.raises(ValueError, match="'finish_s', row 1: status 'ok' needs a finite finish time"):
        validate_records(unfinished)


def test_records_frame_rejects_malformed_rows():
    good = row("a", 0.0, 10, 2, first=0.1, finish=0.2)
    with pytest.raises(ValueError, match="row 1 has 16 values, expected 17"):
        records_frame([good, good[:-1]])
    with pytest.raises(ValueError, match="'output_tokens', row 0: expected int, got 2.5"):
        records_frame([good[:3] + (2.5,) + good[4:]])
    with pytest.raises(ValueError, match="'request_id', row 0: expected str, got 7"):
        records_frame([(7,) + good[1:]])


# ---- summary ------------------------------------------------------------------------------------------------


def test_summarize_hand_computed_frame():
    s = summarize(hand_frame(), SLO(ttft_s=2.0, tpot_s=0.05))
    assert (s["requests"], s["completed"], s["dropped"], s["errors"]) == (7, 5, 1, 1)
    assert s["duration_s"] == pytest.approx(5.5)  # first arrival 0.0 to last finish 5.5
    assert s["ttft_s"] == pytest.approx({"mean": 1.04, "p50": 0.5, "p90": 2.2, "p99": 2.92})
    assert s["tpot_s"] == pytest.approx({"mean": 0.16 / 3, "p50": 0.04, "p90": 0.088, "p99": 0.0988})
    assert s["e2e_s"] == pytest.approx({"mean": 6.76 / 5, "p50": 1.16, "p90": 2.4, "p99": 2.94})
    assert s["qpm"] == pytest.approx(5 / 5.5 * 60)
    # meeting both: r1 (TTFT 1.0, TPOT 0.04), r3 (0.2, 0.02), r6 (0.5, single token); r0 fails TPOT, r2 TTFT
    assert s["slo_attainment"] == pytest.approx(3 / 5)
    assert s["goodput_qpm"] == pytest.approx(3 / 5.5 * 60)
    assert s["ttft_attainment"] == pytest.approx(4 / 5) and s["tpot_attainment"] == pytest.approx(4 / 5)
    assert s["output_tokens_per_s"] == pytest.approx(39 / 5.5)
    assert s["prefix_hit_rate"] == pytest.approx(350 / 1100)  # the error row's 500 cached tokens do not count
    assert s["preemptions"] == 2
    assert s["slo"] == {"ttft_s": 2.0, "tpot_s": 0.05}
    assert s["queue_s"]["p50"] == pytest.approx(0.01)
    assert s["kv_transfer_s"]["mean"] == pytest.approx(0.01)
    assert s["prefill_instances"] == {"p0": 4, "p1": 2} and s["decode_instances"] == {"d0": 6}
    json.dumps(s, allow_nan=False)


def test_dropped_and_error_rows_do_not_enter_latency_stats():
    df = hand_frame()
    only_ok = df[df["status"] == "ok"].reset_index(drop=True)
    a, b = summarize(df, SLO()), summarize(only_ok, SLO())
    for key in ("ttft_s", "tpot_s", "e2e_s", "slo_attainment", "prefix_hit_rate", "output_tokens_per_s"):
        assert a[key] == b[key], key


def test_slo_thresholds_are_inclusive_and_change_attainment():
    df = hand_frame()
    assert summarize(df, SLO(ttft_s=3.0, tpot_s=0.1))["slo_attainment"] == pytest.approx(1.0)
    assert summarize(df, SLO(ttft_s=0.3, tpot_s=0.1))["slo_attainment"] == pytest.approx(1 / 5)


def test_single_token_outputs_have_no_tpot_and_meet_the_tpot_slo():
    df = records_frame([row("a", 0.0, 10, 1, first=0.4, finish=0.4), row("b", 1.0, 10, 1, first=1.1, finish=1.1)])
    s = summarize(df, SLO(ttft_s=1.0, tpot_s=0.001))
    assert s["tpot_s"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert s["slo_attainment"] == 1.0 and s["ttft_s"]["p50"] == pytest.approx(0.25)


def test_all_dropped_gives_a_valid_summary_with_none_latencies():
    df = records_frame([row(f"r{i}", float(i), 10, 0, status="dropped", prefill="", decode="") for i in range(3)])
    s = summarize(df, SLO())
    assert (s["requests"], s["completed"], s["dropped"]) == (3, 0, 3)
    assert s["ttft_s"]["p99"] is None and s["e2e_s"]["mean"] is None
    assert s["duration_s"] is None and s["slo_attainment"] is None and s["prefix_hit_rate"] is None
    assert s["qpm"] == 0.0 and s["goodput_qpm"] == 0.0
    json.dumps(s, allow_nan=False)
    assert "-" in format_summary(s)


def test_summarize_empty_records():
    s = summarize(records_frame([]), SLO())
    assert s["requests"] == 0 and s["completed"] == 0 and s["ttft_s"]["mean"] is None
    json.dumps(s, allow_nan=False)


def test_summarize_reports_utilisation_per_role():
    instances = pd.DataFrame({"instance_id": ["p0", "p1", "d0"], "role": ["prefill", "prefill", "decode"],
                              "busy_s": [2.0, 4.0, 1.0], "duration_s": [8.0, 8.0, 10.0]})
    s = summarize(hand_frame(), SLO(), instances)
    assert s["utilisation"] == pytest.approx({"prefill": 0.375, "decode": 0.1})
    with pytest.raises(ValueError, match="missing column.*busy_s"):
        summarize(hand_frame(), SLO(), instances.drop(columns=["busy_s"]))


def test_format_summary_shows_milliseconds_and_rates():
    text = format_summary(summarize(hand_frame(), SLO()))
    ttft_line = next(line for line in text.splitlines() if line.startswith("TTFT"))
    assert ttft_line.split()[1:] == ["1040.0", "500.0", "2200.0", "2920.0"]
    assert "60.0 %" in text and "54.5" in text and "31.8 %" in text


def test_request_latencies_match_definitions():
    lat = request_latencies(hand_frame())
    assert lat.loc[1].tolist() == pytest.approx([1.0, 0.04, 1.16])
    assert math.isnan(lat.loc[2, "tpot_s"]) and lat.loc[5].isna().all()


# ---- SLO ------------------------------------------------------------------------------------------------------


def test_slo_defaults_and_validation():
    assert SLO() == SLO(ttft_s=2.0, tpot_s=0.05)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SLO().ttft_s = 1.0
    with pytest.raises(ValueError, match="SLO.tpot_s"):
        SLO(tpot_s=-0.05)
    with pytest.raises(ValueError, match="SLO.ttft_s"):
        SLO(ttft_s=float("nan"))


@pytest.mark.parametrize("path", sorted(CONF_SLO.glob("*.yaml")), ids=lambda p: p.stem)
def test_slo_configs_instantiate_with_exact_constructor_keys(path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    raw = yaml.safe_load(path.read_text())
    assert raw["_target_"] == "omnisim.metrics.SLO"
    assert set(raw) - {"_target_"} == {f.name for f in dataclasses.fields(SLO)}
    slo = instantiate(OmegaConf.load(path))
    assert isinstance(slo, SLO) and slo.ttft_s > 0 and slo.tpot_s > 0


def test_default_slo_config_is_omniinfer_sla():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    assert instantiate(OmegaConf.load(CONF_SLO / "default.yaml")) == SLO(ttft_s=2.0, tpot_s=0.05)


# ---- confidence intervals -------------------------------------------------------------------------------------


def test_confidence_interval_is_seeded_and_brackets_the_estimate():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    a = confidence_interval(values, seed=3)
    assert a == confidence_interval(values, seed=3)
    noisy = np.random.default_rng(0).normal(size=30)
    assert confidence_interval(noisy, seed=3) != confidence_interval(noisy, seed=4)
    assert a.estimate == 3.0 and a.low < 3.0 < a.high and a.level == 0.95
    p = confidence_interval(values, statistic="p90")
    assert p.estimate == pytest.approx(4.6) and p.low <= p.estimate <= p.high <= 5.0


def test_confidence_interval_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(200):
        interval = confidence_interval(rng.normal(10.0, 2.0, size=40), n_resamples=1000, seed=trial)
        hits += interval.low <= 10.0 <= interval.high
    assert 0.88 <= hits / 200 <= 0.99


def test_confidence_interval_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small = confidence_interval(rng.normal(size=20), n_resamples=2000)
    large = confidence_interval(rng.normal(size=2000), n_resamples=2000)
    assert (large.high - large.low) < (small.high - small.low) / 5


def test_confidence_interval_edge_cases():
    single = confidence_interval([7.0])
    assert single.estimate == 7.0 and math.isnan(single.low) and math.isnan(single.high)
    with pytest.raises(ValueError, match="empty"):
        confidence_interval([])
    with pytest.raises(ValueError, match="NaN"):
        confidence_interval([1.0, NAN])
    with pytest.raises(ValueError, match="statistic"):
        confidence_interval([1.0, 2.0], statistic="p101")
    with pytest.raises(ValueError, match="level"):
        confidence_interval([1.0, 2.0], level=95)


# ---- comparison -----------------------------------------------------------------------------------------------


def test_compare_runs_joins_on_request_id_with_deltas():
    sim = hand_frame()
    real = sim.copy()
    real.loc[0, ["first_token_s", "finish_s"]] += 0.25  # r0: TTFT +0.25, E2E +0.25, TPOT unchanged
    real = real.drop(index=3).iloc[::-1].reset_index(drop=True)  # r3 missing, order differs
    joined = compare_runs(sim, real).set_index("request_id")
    assert "r3" not in joined.index and len(joined) == 6
    assert joined.loc["r0", "ttft_s_delta"] == pytest.approx(0.25)
    assert joined.loc["r0", "e2e_s_delta"] == pytest.approx(0.25)
    assert joined.loc["r0", "tpot_s_delta"] == pytest.approx(0.0)
    assert joined.loc["r1", "ttft_s_a"] == pytest.approx(1.0) and joined.loc["r1", "ttft_s_delta"] == 0.0
    assert math.isnan(joined.loc["r4", "ttft_s_delta"]) and joined.loc["r4", "status_b"] == "dropped"
    outer = compare_runs(sim, real, how="outer").set_index("request_id")
    assert math.isnan(outer.loc["r3", "ttft_s_b"])


def test_compare_runs_rejects_unknown_key():
    with pytest.raises(ValueError, match="on='id'"):
        compare_runs(hand_frame(), hand_frame(), on="id")


def test_compare_summaries_side_by_side():
    a = summarize(hand_frame(), SLO())
    b = dict(a, qpm=a["qpm"] * 2, extra_key=1.0)
    table = compare_summaries(a, b, names=("sim", "real"))
    assert list(table.columns) == ["sim", "real", "delta", "ratio"]
    assert table.loc["qpm", "ratio"] == pytest.approx(2.0)
    assert table.loc["ttft_s.p90", "delta"] == 0.0
    assert table.loc["extra_key", "sim"] is None or math.isnan(table.loc["extra_key", "sim"])
    assert math.isnan(table.loc["extra_key", "delta"])


# ---- run output and plots ------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def instances_frame():
    return pd.DataFrame({"instance_id": ["p0", "p1", "d0"], "role": ["prefill", "prefill", "decode"],
                         "busy_s": [2.0, 4.0, 5.0], "duration_s": [5.5, 5.5, 5.5], "steps": [10, 20, 300],
                         "prefill_tokens": [500, 700, 0]})


def test_write_run_writes_every_file_and_a_complete_summary(tmp_path):
    records = hand_frame()
    summary = summarize(records, SLO())
    moves = pd.DataFrame({"t_s": [1.0, 2.0], "layer": [0, 3], "slots_moved": [4, 1]})
    paths = write_run(tmp_path / "run", records, summary, instances_frame(), {"expert_moves": moves})
    out = tmp_path / "run"
    names = {p.relative_to(out).as_posix() for p in paths}
    assert {"requests.parquet", "instances.parquet", "expert_moves.parquet", "summary.json",
            "plots/latency_cdf.png", "plots/throughput.png", "plots/queue.png", "plots/utilisation.png"} <= names
    assert all(p.is_file() for p in paths)
    assert paths[-1] == out / "summary.json"
    assert all(p.stat().st_mtime_ns <= paths[-1].stat().st_mtime_ns for p in paths)
    assert not list(out.glob(".*tmp"))  # the temporary summary was renamed, not left behind
    assert json.loads((out / "summary.json").read_text()) == summary
    pd.testing.assert_frame_equal(read_records(out / "requests.parquet"), records)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "instances.parquet"), instances_frame())
    pd.testing.assert_frame_equal(pd.read_parquet(out / "expert_moves.parquet"), moves)


def test_failed_rewrite_leaves_no_summary_behind(tmp_path):
    records = hand_frame()
    summary = summarize(records, SLO())
    write_run(tmp_path, records, summary)
    assert (tmp_path / "summary.json").exists()
    unwritable = pd.DataFrame({"mixed": [1, "a", 2.5]})  # parquet cannot store a column of mixed types
    with pytest.raises(ValueError, match="table 'bad' cannot be written"):
        write_run(tmp_path, records, summary, tables={"bad": unwritable})
    assert not (tmp_path / "summary.json").exists()


def test_write_run_rejects_bad_input_before_writing(tmp_path):
    records = hand_frame()
    summary = summarize(records, SLO())
    with pytest.raises(ValueError, match="bad table name 'requests'"):
        write_run(tmp_path / "a", records, summary, tables={"requests": pd.DataFrame()})
    with pytest.raises(ValueError, match=r"summary\.note: object cannot be written"):
        write_run(tmp_path / "b", records, dict(summary, note=object()))
    with pytest.raises(ValueError, match="missing column.*first_token_s"):
        write_run(tmp_path / "c", records.drop(columns=["first_token_s"]), summary)
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_json_ready_converts_numpy_and_nan():
    value = {"a": np.float64(1.5), "b": np.int64(3), "c": float("nan"), "d": (np.float32(2.0), None),
             "e": {1: np.bool_(True)}, "f": np.array([1, 2]), "g": np.array(np.nan), "h": np.array([[0.5, np.inf]])}
    assert json_ready(value) == {"a": 1.5, "b": 3, "c": None, "d": [2.0, None], "e": {"1": True}, "f": [1, 2],
                                 "g": None, "h": [[0.5, None]]}


def test_plots_are_png_files(tmp_path):
    paths = write_plots(hand_frame(), tmp_path, instances_frame(), slo=SLO())
    assert sorted(p.name for p in paths) == ["latency_cdf.png", "queue.png", "throughput.png", "utilisation.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000


def test_plots_survive_a_run_where_everything_was_dropped(tmp_path):
    records = records_frame([row(f"r{i}", float(i), 10, 0, status="dropped", prefill="", decode="")
                             for i in range(3)])
    paths = write_plots(records, tmp_path)
    assert len(paths) == 3 and all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_plots_reject_instances_without_required_columns(tmp_path):
    with pytest.raises(ValueError, match="missing column.*duration_s"):
        write_plots(hand_frame(), tmp_path, instances_frame().drop(columns=["duration_s"]))


def test_plots_handle_many_requests_and_instances(tmp_path):
    rng = np.random.default_rng(0)
    n = 5000
    arrival = np.cumsum(rng.exponential(0.01, n))
    rows = [row(f"r{i}", float(a), 100, 20, first=float(a) + 0.3, finish=float(a) + 1.0, prefill=f"p{i % 40}")
            for i, a in enumerate(arrival)]
    paths = write_plots(records_frame(rows), tmp_path)
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_output_tokens_over_time_are_conserved_and_spread():
    # a: first token at 0, 10 more tokens evenly over [0, 10]; b: 1 token at 4.5; c: 4 tokens, all at 7 (instant)
    records = records_frame([
        row("a", 0.0, 10, 11, first=0.0, finish=10.0),
        row("b", 4.0, 10, 1, first=4.5, finish=4.5),
        row("c", 6.0, 10, 4, first=7.0, finish=7.0),
    ])
    edges = np.linspace(0.0, 10.0, 6)  # 2-second bins
    tokens = _tokens_per_bin(records, edges)
    assert tokens.sum() == pytest.approx(16.0)
    assert tokens == pytest.approx([1 + 2, 2, 2 + 1, 2 + 4, 2])  # bins [0,2) [2,4) [4,6) [6,8) [8,10]


def test_queue_length_is_the_exact_peak_within_each_bin():
    # [0, 1) and [0.5, 2) overlap in the first bin; [3, 3) is a zero-length stay; the last row never left
    enter = np.array([0.0, 0.5, 3.0, 1.0])
    leave = np.array([1.0, 2.0, 3.0, NAN])
    peaks = _peak_occupancy(enter, leave, np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert peaks.tolist() == [2.0, 1.0, 0.0, 0.0]


def test_offered_rate_and_steady_throughput_leave_out_warm_up_and_drain():
    frame = records_frame([row(f"r{i}", float(i), 100, 11, first=i + 0.5, finish=i + 1.5) for i in range(20)])
    s = summarize(frame, SLO())
    assert s["offered_rate_per_s"] == pytest.approx(1.0)
    assert s["steady_window_s"] == pytest.approx([1.9, 17.1])  # 10th .. 90th percentile of arrivals
    # finishing inside the window: arrivals 1..15; tokens inside: 14 whole requests + 0.6 s of two others
    assert s["steady_qpm"] == pytest.approx(15 / 15.2 * 60)
    assert s["steady_output_tokens_per_s"] == pytest.approx((14 * 11 + 2 * 6.6) / 15.2)
    few = summarize(records_frame([row("a", 0.0, 10, 2, first=0.1, finish=0.2)]), SLO())
    assert few["offered_rate_per_s"] is None and few["steady_qpm"] is None
