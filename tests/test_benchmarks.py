"""Every benchmark the README quotes runs end to end at a tiny size, so its figures cannot rot silently: the script
still composes its configs, runs, and prints figures of the expected form. (The figures themselves are measured by
running the benchmarks at full size; see the README.)"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+|-?\d+", line)]


@pytest.mark.parametrize("case, size", [("a", ["--max-requests", "300"]), ("b", ["--duration-s", "20"])])
def test_sim_speed(case, size):
    figures = last_json(run("benchmarks/sim_speed.py", "--case", case, *size))
    assert figures["case"] == case and figures["requests"] > 0
    assert figures["cpu_s"] > 0 and figures["requests_per_cpu_s"] > 0 and figures["peak_rss_mb"] > 0
    if case == "a":
        assert figures["requests"] == 300


def test_cost_speed():
    out = run("benchmarks/cost_speed.py", "--calls", "2000")
    per_call = [float(m) for m in re.findall(r"(\d+) ns/call$", out, re.M)]
    assert len(per_call) >= 3 and all(ns > 0 for ns in per_call)


def test_placement_speed():
    out = run("benchmarks/placement_speed.py", "--repeats", "1", "--topologies", "EP32", "--steps", "200")
    rows = {ln.split()[0]: float(ln.split()[1]) for ln in out.splitlines()
            if re.match(r"^[a-z_]+\s+\d+\.\d$", ln.strip())}
    assert {"static", "deepseek_eplb", "omni_placement"} <= set(rows) and all(v >= 0 for v in rows.values())
    assert len(re.findall(r"us per call", out)) == 4


@pytest.mark.parametrize("part", ["static", "drifting"])
def test_placement_quality(part):
    args = ["--minutes", "2", "--part", part] + (["--drift", "fast"] if part == "drifting" else [])
    out = run("benchmarks/placement_quality.py", *args)
    assert "omni_placement" in out and "deepseek_eplb" in out
    assert not re.search(r"\bnan\b", out)


def test_placement_sim():
    out = run("benchmarks/placement_sim.py", "--requests", "40", "--rates", "10.3", "--loads", "zipf",
              "--settings", "static")
    row = next(ln for ln in out.splitlines() if ln.strip().startswith("static"))
    tpot_ms, qpm = numbers(row)[0], numbers(row)[-1]
    assert 0 < tpot_ms < 1000 and qpm > 0


def test_proxy_eval(tmp_path):
    out = run("benchmarks/proxy_eval.py", "--quick", "--max-requests", "60", "--replicates", "1", "--jobs", "1",
              "--out", str(tmp_path / "eval.csv"))
    assert (tmp_path / "eval.csv").is_file()
    assert "round_robin" in out and "best within TPOT +5%" in out
    # and the committed results still print (the README's table comes from them)
    assert "proxy_eval_mooncake_7p1d" in run("benchmarks/proxy_eval.py", "--report-only")


def test_proxy_overhead():
    figures = last_json(run("benchmarks/proxy_overhead.py", "--rate", "100", "--seconds", "0.5", "--repeat", "1",
                            "--engines", "2", "--no-spin", "--no-router", "--max-wall-s", "60", timeout=120))
    assert figures["errors"] == 0 and figures["max_rps"] > 0
    assert math.isfinite(figures["p50_added_ms"]) and math.isfinite(figures["p99_added_ms"])


@pytest.mark.vllm
def test_cost_calibration():
    pytest.importorskip("vllm")
    out = run("benchmarks/cost_calibration.py", "--quick", timeout=600)
    assert "relative rms error" in out
    rows = [ln for ln in out.splitlines() if re.match(r"^\s*\d+\s+\d+\s+\d+(\.\d+)?\s+\d+\.\d+", ln)]
    assert len(rows) >= 12 and all(numbers(r)[3] > 0 for r in rows)  # measured ms
    new_shape = [ln for ln in out.splitlines() if ln.startswith("new_shape_s:")]
    assert len(new_shape) == 1 and numbers(new_shape[0])[0] >= 0  # a never-seen token count's first step


def test_serving_costs_reads_new_shape_s_from_the_step_table(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_costs import new_shape_s

    table = tmp_path / "t.csv"
    table.write_text("# model: tiny_llama\n# new_shape_s: 0.0042 (a step of a token count ...)\nprefill_tokens\n")
    assert new_shape_s(table) == 0.0042
    table.write_text("# model: tiny_llama\nprefill_tokens\n")  # a table from before the measurement
    assert new_shape_s(table) == 0.0
    table.write_text("# new_shape_s: fast\n")
    with pytest.raises(ValueError, match="bad new_shape_s line"):
        new_shape_s(table)


def test_serving_costs_reads_the_idle_poll_from_an_engines_cores_after_its_last_step():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_costs import idle_poll

    # the shape measured on 2026-12-03: a core for most of a second, then nothing but noise
    cpu, seconds = idle_poll([0.998, 0.999, 0.998, 0.739, 0.0, 0.04, 0.0, 0.02], 0.25)
    assert cpu == 0.999 and seconds == pytest.approx((0.998 + 0.999 + 0.998 + 0.739) * 0.25 / 0.999)
    assert idle_poll([0.0] * 8, 0.25) == (0.0, 0.0)  # an engine that parks at once
    assert idle_poll([1.0] * 4, 0.25) == (1.0, 1.0)  # still polling when the windows end: a lower bound


def test_serving_costs_takes_the_proxys_cost_per_chunk_from_its_cpu_not_from_the_streams_pace():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_costs import proxy_summary

    rows = []
    for rep in range(3):  # the proxy: 1 ms of CPU per request and 0.05 ms per chunk; the client 0.1 ms per chunk
        for route, extra in (("direct", (0.0, 0.0)), ("proxied", (1e-3, 5e-5))):
            for n in (8, 64):
                rows.append({"route": route, "max_tokens": n, "chunks": n, "ttft": 0.010 + extra[0] + rep * 1e-4,
                             "itl": 0.002 + (0.0004 if route == "proxied" else 0.0),
                             "cpu_s": 0.002 + 1e-4 * n + extra[0] + extra[1] * n})
    out = proxy_summary(rows)
    assert out["token_cpu_s"] == pytest.approx(5e-5) and out["request_cpu_s"] == pytest.approx(1e-3)
    assert out["proxied_ttft"] - out["direct_ttft"] == pytest.approx(1e-3)
    assert out["proxied_itl"] == pytest.approx(0.0024)
    assert "token_cpu_s" not in proxy_summary([r for r in rows if r["max_tokens"] == 8])  # one length: no slope


def test_serving_costs_takes_the_hypervisors_steal_out_of_every_parts_wall_times():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_costs import without_steal

    m = {"loads": {"prefill": {"steal_fraction": 0.25}, "proxy": {"steal_fraction": 0.5}, "batch": {}},
         "prefill": [{"prompt": 16, "ttft": 0.04, "e2e": 0.05, "engine_prefill": 0.02, "engine_queue": 0.001}],
         "batch": [{"batch": 4, "engine_itl": 0.01, "client_itl": 0.012, "wall_s": 1.0}],
         "proxy": {"direct_ttft": 0.02, "proxied_ttft": 0.03, "direct_itl": 0.01, "proxied_itl": 0.012},
         "contention": {"one_client_itl": 0.01, "one_engine_itl": 0.01, "one_itls": [0.01], "one_engine_itls": [0.01],
                        "two_client_itl": 0.02, "two_engine_itl": 0.02, "two_itls": [0.02], "two_engine_itls": [0.02],
                        "engine_cores_alone": 0.9, "idle_cores": [0.6, 0.0], "one_steal": 0.4, "two_steal": 0.0},
         "api_groups": [{"api_cpu_s": 1.0}]}
    out = without_steal(m)
    assert out["prefill"][0] == pytest.approx({"prompt": 16, "ttft": 0.03, "e2e": 0.0375, "engine_prefill": 0.015,
                                               "engine_queue": 0.00075})
    assert out["batch"] == m["batch"] and out["api_groups"] == m["api_groups"]  # no steal; CPU seconds stay
    assert out["proxy"]["proxied_ttft"] == 0.015
    c = out["contention"]
    assert c["one_engine_itl"] == pytest.approx(0.006) and c["two_engine_itl"] == 0.02
    assert c["engine_cores_alone"] == pytest.approx(1.5) and c["idle_cores"] == pytest.approx([1.0, 0.0])
    assert m["prefill"][0]["ttft"] == 0.04  # the raw measurements are left as they were


def test_omniinfer_repro():
    figures = last_json(run("benchmarks/omniinfer_repro.py", "--quick", "--stages", "baseline,unified,all",
                            timeout=900))
    assert set(figures["stages"]) == {"baseline", "unified", "all"}
    for stage in figures["stages"].values():
        assert stage["tpot_mean_s"] > 0 and stage["ttft_mean_s"] > 0 and stage["capacity_runs"] >= 2
    assert figures["published"] == {"qpm_at_sla": 616.0, "tpot_delta_pct": -36.0, "ttft_delta_pct": -38.0}
    assert math.isfinite(figures["tpot_delta_pct"]) and math.isfinite(figures["ttft_delta_pct"])


def test_fidelity_published():
    figures = last_json(run("benchmarks/fidelity_published.py", "--quick", timeout=600))
    assert {c["name"] for c in figures["cases"]} == {
        "omniinfer_r1_7p1d_qpm", "cm384_decode_50ms", "cm384_decode_15ms", "cm384_prefill", "dsv3_h800_decode",
        "dsv3_h800_prefill", "cm384_tpot_ms_b128_1024_1024", "cm384_tpot_ms_b112_2048_256",
        "cm384_tpot_ms_b96_4096_256", "cm384_tpot_ms_b24_4096_256", "cm384_tpot_ms_b8_4096_256"}
    for c in figures["cases"]:
        assert c["published"] > 0 and c["predicted"] > 0
        assert c["error_pct"] == pytest.approx((c["predicted"] / c["published"] - 1) * 100, abs=0.1)


def test_operator_profile(tmp_path):
    pytest.importorskip("torch")
    figures = last_json(run("benchmarks/operator_profile.py", "--model", "tiny_qwen3_moe", "--hardware", "cpu",
                            "--quick", "--repeats", "2", "--out", str(tmp_path)))
    assert set(figures["ops"]) == {"gemm", "prefill_attention", "decode_attention", "moe"}
    assert all(math.isfinite(v["median_error_pct"]) and v["rows"] >= 2 for v in figures["ops"].values())
    table = (tmp_path / "operators_tiny_qwen3_moe_cpu.csv").read_text().splitlines()
    assert {line.split(":")[0] for line in table if line.startswith("#")} >= {
        "# engine", "# model", "# hardware", "# parallel", "# date", "# command"}  # what it was measured on
    assert len([line for line in table if not line.startswith("#")]) == figures["rows"] + 1


@pytest.mark.vllm
def test_fidelity_cpu_quick():
    pytest.importorskip("vllm")
    pytest.importorskip("transformers")
    out = run("benchmarks/fidelity.py", "--case", "cpu", "--quick", timeout=900)
    figures = last_json(out)
    assert figures["cases"] == ["colocated"] and figures["policy_ranking_agrees"] is None  # one policy at --quick
    assert math.isfinite(figures["max_abs_error_pct"]) and math.isfinite(figures["real_spread_pct"])
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("colocated ")]
    metrics = {r[3] for r in rows}
    assert {"ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "e2e_p50", "e2e_p90", "output_tokens_per_s"} <= metrics
    assert all(float(r[4]) > 0 and float(r[6]) > 0 for r in rows)  # real and simulated figures
    assert "load average" in out


@pytest.mark.vllm
def test_poll_profile_times_a_stream_beside_a_parked_and_a_polling_neighbour(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("transformers")
    out = run("benchmarks/poll_profile.py", "--rounds", "1", "--delays", "0.3", timeout=900)
    figures = last_json(out)
    assert set(figures) == {"parked", "stream+0.3s", "short+0s", "short+0.3s", "prefill+0s", "prefill+0.3s",
                            "own+0s", "own+0.1s", "own+0.3s", "own+0.6s", "own+0.9s", "own64+0s", "own64+0.3s"}
    assert all(f["ttft_ms"] > 0 for f in figures.values())
    assert figures["parked"]["x_parked"] == 1.0 and figures["parked"]["b_cores"] < 0.1  # b idle and parked
    assert all(f["itl_ms"] > 0 and f["b_cores"] >= 0 for f in figures.values())  # how much b's spinner gets of
    # the cores beside a's stream is the measurement (0.08-0.8 cores in single rounds here), not a property to test
    proc = subprocess.run([sys.executable, "benchmarks/poll_profile.py", "--delays", "-1"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--delays: every value must be >= 0" in proc.stderr


@pytest.mark.vllm
def test_ttft_gap_times_a_request_by_how_long_its_engine_idled():
    pytest.importorskip("vllm")
    pytest.importorskip("transformers")
    figures = last_json(run("benchmarks/ttft_gap.py", "--rounds", "1", "--gaps", "0", "0.3", timeout=900))
    assert set(figures) == {"gap 0s", "gap 0.3s", "busy 0.3s", "parked"}
    assert all(v > 0 for v in figures.values())
    proc = subprocess.run([sys.executable, "benchmarks/ttft_gap.py", "--rounds", "0"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--rounds must be >= 1" in proc.stderr


def test_fidelity_rescore_of_the_readmes_run_gives_its_figures_with_the_committed_coefficients():
    # The README's table is the newest run kept in benchmarks/fidelity_runs/, simulated with conf/serving/vllm_cpu.yaml
    # as committed: rescoring it (no servers) gives the same simulated figures. If this fails, the simulator's served
    # behaviour or the coefficients changed since: run fidelity.py --out again and keep it, and update the README.
    newest = sorted((ROOT / "benchmarks/fidelity_runs").glob("*.json"))[-1]
    saved = json.loads(newest.read_text())
    out = run("benchmarks/fidelity.py", "--case", "cpu", "--rescore", str(newest), timeout=600)
    figures = last_json(out)
    assert figures["max_abs_error_pct"] == pytest.approx(saved["max_abs_error_pct"], abs=0.01)
    assert figures["policy_ranking_agrees"] == saved["policy_ranking_agrees"]
    printed = {(r[0], r[1], r[2], r[3]): float(r[6]) for r in (ln.split() for ln in out.splitlines())
               if len(r) == 10 and r[3].endswith(("p50", "p90"))}
    kept = {(res["case"], res["workload"], res["proxy"], row["metric"]): row["sim"] * 1e3
            for res in saved["results"] for row in res["rows"] if row["reported"]}
    assert printed.keys() == kept.keys()
    assert all(printed[k] == pytest.approx(kept[k], abs=0.006) for k in kept)  # ms, as printed


def test_sweep_speed():
    figures = last_json(run("benchmarks/sweep_speed.py", "--tiny", "--no-overhead", timeout=900))
    for launcher in ("joblib", "ray"):  # every point of the sweep ran and completed under both launchers
        f = figures[launcher]
        assert f["jobs"] == f["complete"] == 4 and f["requests"] == 4 * 30
        assert f["wall_s"] > 0 and f["wall_s_per_job"] == pytest.approx(f["wall_s"] / 4, abs=0.01)
    assert figures["ray_head_start_s"] > 0 and math.isfinite(figures["ray_minus_joblib_s_per_job"])
    cap = figures["capacity"]
    assert 2 <= cap["runs"] <= 4 and cap["rate_per_s"] > 0 and cap["attainment"] >= 0.9
    assert figures["load_before"] and figures["load_after"]  # the load the wall times were taken under


def _vidur_mlp(path: Path, n_embd: int = 8192, tp: int = 2) -> None:
    """A Vidur-format mlp.csv for Llama-2-70B's shapes: the columns Vidur writes, the times a layer-sized roofline
    would give (ms), with a repeated shape, a non-power-of-two row and another tp's rows that must be left out."""
    ops = ["emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add"]
    header = [f"time_stats.{op}.{s}" for op in ops for s in ("min", "max", "mean", "median", "std")] + [
        "n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp", "num_tokens",
        "num_tensor_parallel_workers"]
    lines = [",".join(header)]
    for t, workers, scale in ((1, tp, 1.0), (1, tp, 1.2), (3, tp, 1.0), (64, tp, 1.0), (64, 4, 9.0)):
        ms = {op: 0.01 * scale for op in ops}
        ms.update(attn_pre_proj=0.06 * scale, attn_post_proj=0.05 * scale, mlp_up_proj=0.3 * scale,
                  mlp_down_proj=0.15 * scale)
        lines.append(",".join([f"{ms[op]}" for op in ops for _ in range(5)]
                              + ["64", "8", str(n_embd), "28672", "32000", "True", str(t), str(workers)]))
    path.write_text("\n".join(lines) + "\n")


def test_operator_profile_against_vidur_profile(tmp_path):
    _vidur_mlp(tmp_path / "mlp.csv")
    figures = last_json(run("benchmarks/operator_profile.py", "--model", "llama2_70b", "--tp", "2", "--hardware",
                            "a100", "--vidur", str(tmp_path), "--out", str(tmp_path / "out")))
    # two power-of-two token counts at tp 2 (the repeated shape is one row): 4 GEMMs and one layer each
    assert figures["ops"]["gemm"]["rows"] == 8 and figures["ops"]["layer_dense"]["rows"] == 2
    table = (tmp_path / "out" / "operators_llama2_70b_a100.csv").read_text().splitlines()
    rows = [line.split(",") for line in table if not line.startswith("#")]
    col = rows[0].index
    layer = [r for r in rows[1:] if r[col("op")] == "layer_dense" and r[col("m")] == "1"][0]
    # the median of the repeated runs, summed over the layer's nine operators (not the embedding), in seconds
    assert float(layer[col("seconds")]) == pytest.approx(1.1 * (0.06 + 0.05 + 0.3 + 0.15 + 5 * 0.01) * 1e-3)
    assert -50 < float(layer[col("error_pct")]) < 50  # priced by the cost model at the layer's own shapes


def test_operator_profile_reads_vidurs_attention_profile_when_present(tmp_path):
    _vidur_mlp(tmp_path / "mlp.csv")
    header = ["time_stats.attn_prefill.median", "time_stats.attn_decode.median", "time_stats.attn_kv_cache_save.median",
              "n_embd", "n_q_head", "n_kv_head", "block_size", "num_tensor_parallel_workers", "max_model_len",
              "batch_size", "prefill_chunk_size", "kv_cache_size", "is_prefill", "attention_backend"]
    rows = [  # prefill: one sequence, chunk after a cached prefix; decode: batch x context; one row of another tp
        ("0.05", "", "0.01", 8192, 64, 8, 16, 2, 4096, 1, 512, 0, True, "FLASHINFER"),
        ("0.09", "", "0.01", 8192, 64, 8, 16, 2, 4096, 1, 512, 1024, True, "FLASHINFER"),
        ("0.07", "", "0.01", 8192, 64, 8, 16, 2, 4096, 1, 500, 0, True, "FLASHINFER"),  # not a power of two
        ("", "0.02", "0.01", 8192, 64, 8, 16, 2, 4096, 8, 0, 2048, False, "FLASHINFER"),
        ("", "0.03", "0.01", 8192, 64, 8, 16, 4, 4096, 8, 0, 2048, False, "FLASHINFER"),
    ]
    (tmp_path / "attention.csv").write_text("\n".join([",".join(header)]
                                                      + [",".join(map(str, r)) for r in rows]) + "\n")
    figures = last_json(run("benchmarks/operator_profile.py", "--model", "llama2_70b", "--tp", "2", "--hardware",
                            "a100", "--vidur", str(tmp_path)))
    assert figures["ops"]["prefill_attention"]["rows"] == 2 and figures["ops"]["decode_attention"]["rows"] == 1
    assert all(math.isfinite(v["median_error_pct"]) for v in figures["ops"].values())


def test_operator_profile_vidur_refuses_another_models_profile(tmp_path):
    _vidur_mlp(tmp_path / "mlp.csv", n_embd=4096)
    proc = subprocess.run([sys.executable, "benchmarks/operator_profile.py", "--model", "llama2_70b", "--tp", "2",
                           "--hardware", "a100", "--vidur", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "n_embd is [4096], model 'llama2_70b' has 8192" in proc.stderr
    (tmp_path / "mlp.csv").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 10\n")
    proc = subprocess.run([sys.executable, "benchmarks/operator_profile.py", "--model", "llama2_70b", "--tp", "2",
                           "--hardware", "a100", "--vidur", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "a Git LFS pointer" in proc.stderr


def _vidur_gemms(path: Path, heads: int, kv_heads: int, hidden: int, ffn: int, ec: float, em: float, t0: float,
                 gated: bool = True, small: float | None = None) -> None:
    """A Vidur-format mlp.csv whose four GEMMs take what the smooth roofline (n = 2) gives on an A100 at compute
    fraction ``ec``, HBM fraction ``em`` and kernel latency ``t0``, at TP 1 and 2 and 1..4,096 tokens; its five small
    kernels 3 us each, or with ``small`` t0 each plus their traffic (norms on the whole hidden vector, rope and the
    activation on a TP rank's heads and width) at that fraction of the A100's 2 TB/s."""
    ops = ["input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add"]
    d = hidden // heads
    lines = [",".join([f"time_stats.{op}.median" for op in ops] + [
        "n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp", "num_tokens",
        "num_tensor_parallel_workers"])]
    for tp in (1, 2):
        shapes = {"attn_pre_proj": (hidden, (heads + 2 * kv_heads) * d // tp), "attn_post_proj": (hidden // tp, hidden),
                  "mlp_up_proj": (hidden, 2 * ffn // tp), "mlp_down_proj": (ffn // tp, hidden)}
        for t in (2 ** i for i in range(13)):
            ms = dict.fromkeys(ops, 0.003)
            if small:
                traffic = t * 2 * (2 * 4 * hidden + 2 * (heads / tp + kv_heads / min(tp, kv_heads)) * d + 3 * ffn / tp)
                ms.update({op: t0 * 1e3 for op in ops})
                ms["add"] += traffic / (2e12 * small) * 1e3
            for op, (k, n) in shapes.items():
                c, m = 2 * t * k * n / (312e12 * ec), 2 * (k * n + t * k + t * n) / (2e12 * em)
                ms[op] = (t0 + math.hypot(c, m)) * 1e3
            lines.append(",".join([str(ms[op]) for op in ops] + [str(heads), str(kv_heads), str(hidden), str(ffn),
                                                                 "32000", str(gated), str(t), str(tp)]))
    path.mkdir(parents=True, exist_ok=True)
    (path / "mlp.csv").write_text("\n".join(lines) + "\n")


def test_vidur_fit_recovers_the_coefficients_the_kernel_times_were_made_with(tmp_path):
    # two "fit" models and a held-out one, all timed by one A100 at known fractions: the fit finds them, and the
    # held-out model's GEMMs are then priced within rounding, where the profile as committed is not
    truth = dict(ec=0.62, em=0.75, t0=7e-6, small=0.55)
    _vidur_gemms(tmp_path / "a", 32, 8, 4096, 14336, **truth)
    _vidur_gemms(tmp_path / "b", 40, 40, 5120, 13824, **truth)
    _vidur_gemms(tmp_path / "held", 64, 8, 8192, 28672, **truth)
    figures = last_json(run("benchmarks/vidur_fit.py", "--hardware", "a100", "--fit", str(tmp_path / "a"),
                            str(tmp_path / "b"), "--hold-out", str(tmp_path / "held")))
    fitted = figures["fitted"]
    assert fitted["gemm_efficiency"] == pytest.approx(0.62, abs=0.005)
    assert fitted["memory_efficiency"] == pytest.approx(0.75, abs=0.005)
    assert fitted["kernel_latency_s"] == pytest.approx(7e-6, abs=2e-7)
    assert fitted["elementwise_efficiency"] == pytest.approx(0.55, abs=0.01)  # from the traffic-bound token counts
    assert figures["gemms_fitted"] == 2 * 2 * 13 * 4  # models x degrees x token counts x GEMMs
    held = [m for m in figures["models"] if m["set"] == "held_out"]
    assert [(m["model"], m["tp"]) for m in held] == [("held", 1), ("held", 2)]  # shapes read from the table
    assert all(abs(m["fitted"]["gemm_worst_pct"]) < 1.0 for m in held)
    assert all(abs(m["profile"]["gemm_median_pct"]) > 5.0 for m in held)


def test_vidur_fit_refuses_a_held_out_model_it_fits_and_an_ungated_ffn(tmp_path):
    _vidur_gemms(tmp_path / "a", 32, 8, 4096, 14336, 0.7, 0.8, 5e-6)
    proc = subprocess.run([sys.executable, "benchmarks/vidur_fit.py", "--hardware", "a100", "--fit",
                           str(tmp_path / "a"), "--hold-out", str(tmp_path / "a")], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "--hold-out repeats a --fit folder" in proc.stderr
    _vidur_gemms(tmp_path / "phi", 32, 32, 2560, 10240, 0.7, 0.8, 5e-6, gated=False)
    proc = subprocess.run([sys.executable, "benchmarks/vidur_fit.py", "--hardware", "a100", "--fit",
                           str(tmp_path / "phi")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "use_gated_mlp is not True" in proc.stderr


def _vidur_all_reduce(path: Path, base: float, alpha: float, eff: float) -> None:
    """A Vidur-format all_reduce.csv (ms medians): one-node groups of 2, 4 and 8 on a 300 GB/s link whose messages
    from 8 MiB take base + 2(g-1) alpha + 2(g-1)/g bytes / (300 GB/s x eff), smaller ones a launch-bound 50 us; and
    a group of 2 across two nodes."""
    lines = [",time_stats.all_reduce.median,rank,num_workers,size,collective,devices_per_node,max_devices_per_node"]
    for g, per_node in ((2, 2), (4, 4), (8, 8), (2, 1)):
        for size in (2 ** i for i in range(11, 27)):
            steps = 2 * (g - 1)
            t = base + steps * alpha + steps / g * size / (300e9 * eff) if size >= 2 ** 23 else 50e-6
            lines.append(f"{len(lines) - 1},{t * 1e3},0,{g},{size},all_reduce,{per_node},8")
    path.mkdir(parents=True, exist_ok=True)
    (path / "all_reduce.csv").write_text("\n".join(lines) + "\n")


def test_vidur_collectives_recovers_the_bandwidth_path_the_times_were_made_with(tmp_path):
    _vidur_all_reduce(tmp_path, 90e-6, 1e-6, 0.4)  # far from the committed a100 profile's bulk path
    figures = last_json(run("benchmarks/vidur_collectives.py", "--hardware", "a100", "--network", str(tmp_path),
                            "--fit-groups", "2", "8", "--hold-out-groups", "4", "--bulk-bytes", str(2 ** 23)))
    fitted = figures["fitted"]
    assert fitted["bulk_collective_base_s"] == pytest.approx(90e-6, rel=1e-3)
    assert fitted["bulk_link_latency_s"] == pytest.approx(1e-6, rel=1e-3)
    assert fitted["bulk_bus_efficiency"] == pytest.approx(0.4, abs=1e-3)
    rows = {(r["workers"], r["per_node"], r["band"]): r for r in figures["rows"]}
    held = rows[(4, 4, ">=8MiB")]
    assert held["role"] == "held out" and abs(held["fitted_worst_pct"]) < 0.5 and held["profile_median_pct"] < -20
    # below the bulk size the fitted profile is the profile (vLLM's own all-reduce there, not NCCL)
    assert rows[(8, 8, "<1MiB")]["fitted_median_pct"] == rows[(8, 8, "<1MiB")]["profile_median_pct"]
    assert rows[(2, 1, ">=8MiB")]["role"] == "across nodes"


def test_vidur_collectives_refuses_bad_tables_and_groups(tmp_path):
    def refused(*args):
        proc = subprocess.run([sys.executable, "benchmarks/vidur_collectives.py", "--hardware", "a100", *args],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        return proc.stderr
    _vidur_all_reduce(tmp_path / "ok", 40e-6, 3e-6, 0.55)
    assert "also in --fit-groups" in refused("--network", str(tmp_path / "ok"), "--fit-groups", "2", "4",
                                             "--hold-out-groups", "4")
    assert "no one-node rows of 16 GPUs" in refused("--network", str(tmp_path / "ok"), "--fit-groups", "16")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "all_reduce.csv").write_text("num_workers,size\n2,1024\n")
    assert "missing column(s) devices_per_node, time_stats.all_reduce.median" in refused(
        "--network", str(tmp_path / "bad"), "--fit-groups", "2")
    (tmp_path / "lfs").mkdir()
    (tmp_path / "lfs" / "all_reduce.csv").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    assert "a Git LFS pointer" in refused("--network", str(tmp_path / "lfs"), "--fit-groups", "2")
    (tmp_path / "neg").mkdir()
    (tmp_path / "neg" / "all_reduce.csv").write_text(
        "num_workers,devices_per_node,size,time_stats.all_reduce.median\n2,2,1024,0.01\n2,2,2048,-0.01\n")
    assert "row 3 has" in refused("--network", str(tmp_path / "neg"), "--fit-groups", "2")


def test_serving_costs_fit_recovers_what_engines_and_pollers_take_from_each_other_and_when_a_poll_holds():
    # two streams at once, and a stream beside a poller, simulated with known engine_cpu and idle_poll_cpu
    import dataclasses

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_costs import STEP_TABLE, compose, fit_contention, sim_polled_tpot, sim_tpot

    from omnisim.sim.serving import ServingCosts

    two, _ = compose("cpu_tiny_colocated2", "serving=none", "proxy=round_robin", f"cost.path={STEP_TABLE}",
                     backend="sim")
    base = ServingCosts(token_s=4e-5, api_step_s=3e-4, step_factor=1.5, host_cores=2, engine_cpu=1.7,
                        idle_poll_s=0.9, idle_poll_cpu=1.0)
    true = dataclasses.replace(base, engine_cpu=1.45, idle_poll_cpu=0.6)
    measured_two = sim_tpot(true, two, 2, 0.02)
    measured_polled = sim_polled_tpot(true, two, 0.01)
    assert measured_polled > sim_polled_tpot(dataclasses.replace(true, idle_poll_cpu=0.0), two, 0.01)  # it matters
    engine_cpu, idle_poll_cpu, delay = fit_contention(base, two, (measured_two, 0.02), (measured_polled, 0.01))
    assert engine_cpu == pytest.approx(1.45, rel=1e-3) and idle_poll_cpu == pytest.approx(0.6, rel=1e-2)
    assert delay == 0.0  # no later streams measured: the poll takes hold at once, as base has it
    assert fit_contention(base, two, (measured_two, 0.02), (None, 0.0))[1] == 1.0  # not measured: kept
    # streams sent at once and 0.3 / 0.6 s after the other engine's last request, simulated with a known plateau and
    # delay: the stream sent at once hardly sees the poll, the later ones do, and fit_contention finds both
    base = dataclasses.replace(base, idle_poll_s=0.95, idle_poll_cpu=0.2)
    true = dataclasses.replace(base, engine_cpu=1.5, idle_poll_cpu=0.8, idle_poll_delay_s=0.15)
    at_once = sim_polled_tpot(true, two, 0.0)
    late = {d: sim_polled_tpot(true, two, 0.0, float(d)) for d in ("0.3", "0.6")}
    assert at_once < min(late.values())  # the delay shows
    fitted = fit_contention(base, two, (sim_tpot(true, two, 2, 0.0), 0.0), (at_once, 0.0), (late, 0.0))
    assert fitted == pytest.approx((1.5, 0.8, 0.15), rel=2e-2)


def test_serving_costs_fit_recovers_what_engines_take_from_api_work_and_a_pd_instances_steps():
    # short requests beside a stream, and a PD request's decode, simulated with known own_engine_cpu and
    # connector_step_s (and engine_cpu, idle_poll_cpu): fit_host and the connector's solve find them
    import dataclasses

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_costs import (STEP_TABLE, compose, fit_host, sim_pd_tpot, sim_polled_tpot, sim_short_ttft, sim_tpot,
                               solve_increasing)

    from omnisim.sim.serving import ServingCosts

    table = f"cost.path={STEP_TABLE}"
    exps = {"one": compose("cpu_tiny_colocated", "serving=none", table, backend="sim")[0],
            "two": compose("cpu_tiny_colocated2", "serving=none", "proxy=round_robin", table, backend="sim")[0],
            "pd": compose("cpu_tiny_1p1d", "serving=none", "proxy=round_robin", table, backend="sim")[0]}
    base = ServingCosts(frontend_s=3e-3, token_s=4e-5, api_step_s=3e-4, step_factor=1.5, host_cores=2,
                        engine_cpu=1.7, idle_poll_s=0.9, idle_poll_cpu=1.0)
    true = dataclasses.replace(base, engine_cpu=1.45, idle_poll_cpu=0.6, own_engine_cpu=1.3)
    bg = {"alone": 0.0, "own": 0.01, "other": 0.0}
    short = {k: [sim_short_ttft(true, exps, k, bg[k])] for k in bg}
    assert short["own"][0] > sim_short_ttft(dataclasses.replace(true, own_engine_cpu=0.5), exps, "own", 0.01)
    fitted = fit_host(base, exps, (sim_tpot(true, exps["two"], 2, 0.02), 0.02),
                      (sim_polled_tpot(true, exps["two"], 0.01), 0.01), short, bg)
    assert fitted == pytest.approx({"engine_cpu": 1.45, "idle_poll_cpu": 0.6, "idle_poll_delay_s": 0.0,
                                    "own_engine_cpu": 1.3}, rel=1e-2)
    fitted = fit_host(base, exps, (sim_tpot(true, exps["two"], 2, 0.02), 0.02), (None, 0.0), None, {})
    assert fitted["own_engine_cpu"] == fitted["engine_cpu"]  # no short requests measured: an API server sees its
    # own engine as any other, as before
    pd_costs = dataclasses.replace(true, kv_rule="example_connector")
    measured = sim_pd_tpot(dataclasses.replace(pd_costs, connector_step_s=4e-4), exps["pd"], 0.0)
    assert measured > sim_pd_tpot(pd_costs, exps["pd"], 0.0)
    found = solve_increasing(lambda x: sim_pd_tpot(dataclasses.replace(pd_costs, connector_step_s=x), exps["pd"], 0.0),
                             measured, 0.0, 0.02, iters=30)
    assert found == pytest.approx(4e-4, rel=1e-3)


def test_serving_costs_pools_sessions_after_taking_each_ones_steal_out():
    import copy
    import statistics

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_costs import pooled, without_steal

    raws = sorted((ROOT / "benchmarks/serving_costs_raw").glob("*.json"))
    assert len(raws) >= 2, "the committed sessions the shipped serving=vllm_cpu was derived from"
    a, b = (json.loads(p.read_text())["measurements"] for p in raws[-2:])
    both = pooled([a, b])
    for part in ("prefill", "decode", "batch", "pd", "api_groups"):
        assert len(both[part]) == len(a[part]) + len(b[part])
    c = both["contention"]
    a_, b_ = without_steal(a)["contention"], without_steal(b)["contention"]
    assert c["two_engine_itls"] == a_["two_engine_itls"] + b_["two_engine_itls"]
    assert c["two_engine_itl"] == statistics.median(c["two_engine_itls"])
    assert set(c["short_ttfts"]) == {"alone", "own", "other"}
    # the streams sent later beside a poller come from the sessions that measured them
    assert "polled_late" not in a["contention"] and c["polled_late"] == b_["polled_late"]
    # a session whose decode part lost half its time to the hypervisor counts for half its wall times
    stolen = copy.deepcopy(b)
    stolen["loads"]["decode"]["steal_fraction"] = 0.5
    halved = pooled([a, stolen])["decode"][len(a["decode"]):]
    assert [r["e2e"] for r in halved] == pytest.approx([r["e2e"] * 0.5 for r in b["decode"]], rel=1e-9)
    assert all(load["steal_fraction"] == 0.0 for load in pooled([a, stolen])["loads"].values())


def test_serving_costs_lone_itl_pools_every_long_lone_stream_of_the_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_costs import lone_itl

    m = {"decode": [{"stream": True, "max_tokens": 16, "engine_itl": 9.0},  # too short: its first steps weigh
                    {"stream": True, "max_tokens": 64, "engine_itl": 1.0},
                    {"stream": False, "max_tokens": 128, "engine_itl": 9.0},  # not streamed
                    {"stream": True, "max_tokens": 128, "engine_itl": 2.0}],
         "contention": {"one_engine_itls": [3.0, 4.0, 5.0]}}
    assert lone_itl(m) == 3.0  # the median of 1, 2, 3, 4, 5


def test_serving_costs_fit_recovers_the_served_step_that_made_its_measurements():
    # measurements made by the simulator itself with known step_factor, step_s, admit_s and prefill_token_s: the fit
    # finds them
    import dataclasses

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_costs import STEP_TABLE, compose, fit_engine_step, sim_tpot

    from omnisim.cost import Parallelism
    from omnisim.sim.serving import ServingCosts

    one, _ = compose("cpu_tiny_colocated", "serving=none", f"cost.path={STEP_TABLE}", backend="sim")
    cost = one.cost(model=one.model, hardware=one.hardware, parallel=Parallelism())
    base = ServingCosts(token_s=4e-5, api_step_s=8e-4, host_cores=2, engine_cpu=1.7)
    true = dataclasses.replace(base, step_factor=1.8, step_s=4e-4, admit_s=2.5e-3, prefill_token_s=2e-6)
    model = {L: cost.step_time(L, L * (L + 1) / 2, L, 0, 0) for L in (16, 128, 512)}
    prefill = {L: 1.8 * t + 4e-4 + 2.5e-3 + 2e-6 * L for L, t in model.items()}
    lone = (sim_tpot(true, one, 1, 0.05), 0.05)
    batches = ({4: sim_tpot(true, one, 4, 0.0, 64), 12: sim_tpot(true, one, 12, 0.0, 64)}, 0.0)
    fits = fit_engine_step(base, one, lone, prefill, model, batches)
    best = min(fits, key=lambda f: fits[f][0])
    sse, costs, _ = fits[best]
    assert best == 1.8 and sse < 1e-10
    assert costs.step_s == pytest.approx(4e-4, rel=1e-4) and costs.admit_s == pytest.approx(2.5e-3, rel=1e-4)
    assert costs.prefill_token_s == pytest.approx(2e-6, rel=1e-3)
    assert min(fits[1.7][0], fits[1.9][0]) > 1e-5  # the neighbours do not fit
