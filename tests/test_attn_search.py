"""omnisim-attn-search: the genetic and greedy pattern searches, the Pareto front, decode throughput from the cost
model, quality tables, the CLI end to end and its errors, and the quality harness's masks on a tiny local model."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from omnisim.app import CONF_DIR, build_experiment
from omnisim.attention import OmniAttn
from omnisim.attention.decode_throughput import DecodeThroughput
from omnisim.attention.pattern_search import (FrontRow, PatternLoss, choose, format_layers, genetic_search,
                                              greedy_search, pareto_front, table_loss)
from omnisim.attention.quality_table import read_quality_table, table_scores, write_quality_table
from omnisim.attention.search_cli import main

R1 = ["experiment=omniinfer_r1_7p1d", "attention=omni_attn"]


def brute_force(loss, num_layers: int, k: int) -> float:
    patterns = np.zeros((math.comb(num_layers, k), num_layers), dtype=np.uint8)
    for row, chosen in enumerate(itertools.combinations(range(num_layers), k)):
        patterns[row, list(chosen)] = 1
    return float(loss(patterns).min())


# Layers 0-3 hurt alone (1.0 each) but together cost little (their pairs give 0.6 back); layers 4-7 look best alone
# (0.3) but clash in pairs (+0.5 each); the rest cost 0.5. Optimum at k=4: {0, 1, 2, 3} = 0.4; greedy picks 4-7 = 4.2.
SINGLES = np.array([1.0] * 4 + [0.3] * 4 + [0.5] * 8)


def interacting(patterns: np.ndarray) -> np.ndarray:
    p = patterns.astype(float)
    coupled, clashing = p[:, :4].sum(axis=1), p[:, 4:8].sum(axis=1)
    return p @ SINGLES - 0.6 * coupled * (coupled - 1) / 2 + 0.5 * clashing * (clashing - 1) / 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_genetic_finds_the_optimum_where_greedy_is_misled_by_interacting_layers(seed):
    optimum = brute_force(interacting, 16, 4)
    assert optimum == pytest.approx(0.4)
    greedy = greedy_search(PatternLoss(interacting, 16), 16, [4])[4]
    assert greedy.layers == (4, 5, 6, 7) and greedy.loss > optimum + 1  # misled by the layers alone
    found = genetic_search(PatternLoss(interacting, 16), 16, [4], population=30, generations=40, seed=seed)[4]
    assert found.layers == (0, 1, 2, 3) and found.loss == pytest.approx(optimum)


def test_on_an_additive_table_greedy_is_optimal_and_genetic_finds_the_optimum_too():
    scores = np.random.default_rng(7).exponential(1.0, 10)
    loss = table_loss(scores)
    greedy = greedy_search(PatternLoss(loss, 10), 10, range(11))
    genetic = genetic_search(PatternLoss(loss, 10), 10, range(11), population=20, generations=30, seed=0)
    for k in range(11):
        optimum = brute_force(loss, 10, k)
        assert greedy[k].loss == pytest.approx(optimum) and genetic[k].loss == pytest.approx(optimum), k
        assert greedy[k].compressed == genetic[k].compressed == k
        assert greedy[k].loss == pytest.approx(scores[list(greedy[k].layers)].sum())


def test_genetic_steps_sparsity_down_and_its_swaps_keep_the_compressed_count():
    calls = []

    def recording(patterns):
        calls.append(set(patterns.sum(axis=1).tolist()))
        return table_loss(SINGLES)(patterns)

    genetic_search(PatternLoss(recording, 16), 16, [2, 9, 5], population=12, generations=5, seed=0)
    assert all(len(c) == 1 for c in calls)  # every batch holds one count
    counts = [c.pop() for c in calls]
    assert counts[0] == 9 and counts[-1] == 2 and counts == sorted(counts, reverse=True)


def test_search_is_deterministic_for_a_seed_and_uses_no_global_rng():
    loss = interacting
    a = PatternLoss(loss, 16)
    np.random.seed(1)
    first = genetic_search(a, 16, range(0, 17, 3), population=16, generations=8, seed=5)
    b = PatternLoss(loss, 16)
    np.random.seed(2)  # the global RNG must not matter
    second = genetic_search(b, 16, range(0, 17, 3), population=16, generations=8, seed=5)
    assert first == second and a.evaluations == b.evaluations
    other = genetic_search(PatternLoss(loss, 16), 16, range(0, 17, 3), population=16, generations=8, seed=6)
    assert set(other) == set(first)


def test_pattern_loss_caches_and_counts_distinct_patterns():
    seen = []

    def loss(patterns):
        seen.append(len(patterns))
        return patterns.sum(axis=1).astype(float)

    store: dict = {}
    a, b = PatternLoss(loss, 3, store), PatternLoss(loss, 3, store)
    assert a(np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1]])).tolist() == [1.0, 1.0, 2.0]
    assert b(np.array([[0, 1, 1], [1, 1, 1]])).tolist() == [2.0, 3.0]
    assert seen == [2, 1] and a.evaluations == 2 and b.evaluations == 2 and len(store) == 3


def test_pareto_front_drops_dominated_rows_and_is_monotone():
    rows = [FrontRow(0, (), 0.0, 100.0, 1.0), FrontRow(1, (1,), 0.5, 110.0, 1.1),
            FrontRow(2, (1, 2), 0.4, 120.0, 1.2),  # beats k=1 on both: k=1 is dominated
            FrontRow(3, (0, 1, 2), 0.9, 120.0, 1.2),  # same speed as k=2, more loss: dominated
            FrontRow(4, (0, 1, 2, 3), math.inf, 130.0, 1.3)]  # infeasible
    front = pareto_front(rows)
    assert [r.compressed for r in front] == [0, 2]
    assert choose(front, 0.45).compressed == 2 and choose(front, 0.1).compressed == 0
    assert choose(front, -1.0) is None
    assert format_layers([0, 3, 4, 5, 9, 11, 12]) == "0,3-5,9,11-12" and format_layers([]) == "-"


class LinearCost:
    """A step time that grows with batch and attention context, for checking DecodeThroughput's batch rules."""

    def step_time(self, prefill_tokens, prefill_attention, prefill_context, decode_seqs, decode_context,
                  moe_imbalance=1.0):
        return 0.01 + 1e-5 * decode_seqs + 1e-8 * decode_context


def test_decode_throughput_batch_is_bounded_by_seats_kv_and_max_num_seqs():
    def tp(max_num_seqs, blocks, context, pattern):
        t = DecodeThroughput(LinearCost(), model_layers=4, block_size=16, max_num_seqs=max_num_seqs,
                             uncompressed_blocks=blocks, context=context, sink=1, recent=3)
        return t.point(pattern)

    full = tp(10_000, 1000, 160, (0, 0, 0, 0))
    assert (full.batch, full.bound) == (100, "kv")  # 1000 blocks / 10 per sequence
    assert full.tokens_per_s == pytest.approx(100 / (0.01 + 1e-5 * 100 + 1e-8 * 100 * 160))
    half = tp(10_000, 1000, 160, (1, 1, 0, 0))
    pools = OmniAttn((1, 1, 0, 0)).pool_blocks(1000)
    assert half.batch == min(pools[0] // 10, pools[1] // 4) and half.bound == "seats"
    ctx = OmniAttn((1, 1, 0, 0)).attention_context(160, 16, 4)
    assert ctx == pytest.approx(0.5 * 160 + 0.5 * 64)
    assert half.step_s == pytest.approx(0.01 + 1e-5 * half.batch + 1e-8 * half.batch * ctx)
    assert tp(8, 1000, 160, (0, 0, 0, 0)).bound == "max_num_seqs"
    assert tp(8, 5, 160, (0, 0, 0, 0)).tokens_per_s == 0.0  # a sequence does not fit


def test_quality_table_reads_comments_and_extra_columns(tmp_path):
    path = tmp_path / "t.csv"
    write_quality_table(path, [0.5, -0.1, math.inf], {"kl": [1, 2, 3]}, comment="two\nlines")
    assert read_quality_table(path) == {0: 0.5, 1: -0.1, 2: math.inf}
    assert table_scores(read_quality_table(path), 3).tolist() == [0.5, -0.1, math.inf]
    assert table_loss(np.array([0.5, -0.1, math.inf]))(np.array([[1, 1, 0], [0, 0, 1]])).tolist() == \
        [pytest.approx(0.4), math.inf]


@pytest.mark.parametrize("text,message", [
    ("layer,score\n0,0.1\nx,0.2\n", "t.csv:3: layer 'x' is not an integer"),
    ("# c\nlayer,score\n0,abc\n", "t.csv:3: score 'abc' is not a number"),
    ("layer,score\n0,0.1\n0,0.2\n", "t.csv:3: layer 0 appears twice"),
    ("layer,score\n0,0.1,9\n", "t.csv:2: expected 2 fields"),
    ("layer,loss\n0,0.1\n", "t.csv:1: header 'layer,loss' lacks 'layer' and 'score' columns"),
    ("layer,score\n0,nan\n", "t.csv:2: score 'nan' must be a number or inf"),
    ("layer,score\n-1,0.1\n", "t.csv:2: layer -1 is negative"),
    ("\n# nothing\n", "empty quality table"),
])
def test_quality_table_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_quality_table(tmp_path / "t.csv")


def test_quality_table_must_cover_the_pattern():
    with pytest.raises(ValueError, match="layer 5 outside 0..3"):
        table_scores({0: 0.1, 5: 0.2}, 4, "t.csv")
    with pytest.raises(ValueError, match=r"no score for layer\(s\) 1, 2, 3 \(the pattern has 4 entries\)"):
        table_scores({0: 0.1}, 4, "t.csv")


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_searches_r1_on_a_table_and_writes_a_loadable_attention_file(tmp_path, capsys):
    table = tmp_path / "table.csv"
    write_quality_table(table, np.random.default_rng(3).exponential(0.01, 62))
    out = tmp_path / "conf" / "attention" / "found.yaml"
    args = [*R1, "--quality-table", str(table), "--budget", "0.1", "--generations", "6", "--counts", "20:40:5",
            "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    result = json.loads(text.strip().splitlines()[-1])
    assert "genetic: Pareto front" in text and "greedy: Pareto front" in text
    assert result["entries"] == 62 and result["model_layers"] == 61 and result["counts"] == [0, 20, 25, 30, 35, 40]
    assert result["evaluations"]["genetic"] > 0 and result["evaluations"]["greedy"] == 62 + 6
    front, chosen = result["front"], result["chosen"]
    speeds, losses = [r["tokens_per_s"] for r in front], [r["loss"] for r in front]
    assert speeds == sorted(speeds) and len(set(speeds)) == len(speeds)
    assert losses == sorted(losses) and len(set(losses)) == len(losses)
    assert chosen["loss"] <= 0.1 and chosen == max((r for r in front if r["loss"] <= 0.1),
                                                   key=lambda r: r["tokens_per_s"])
    assert front[0]["compressed"] == 0 and front[0]["speedup"] == 1.0 and chosen["speedup"] > 1.0
    # the additive table makes greedy optimal: the combined front is greedy's
    assert [r["loss"] for r in result["methods"]["greedy"]["front"]] == pytest.approx(losses)
    # OmniInfer's shipped 30-layer pattern, priced by the same cost model
    configured = result["configured"]
    assert configured["compressed"] == 30 and configured["speedup"] > 1.0 and configured["bound"] == "max_num_seqs"
    # the file is a conf/attention option: composed through Hydra's search path, it is the chosen pattern
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=omniinfer_r1_7p1d", "attention=found",
                                           f"hydra.searchpath=[file://{tmp_path / 'conf'}]"])
    experiment, _ = build_experiment(cfg)
    assert experiment.attention.pattern == tuple(int(i in chosen["layers"]) for i in range(62))
    assert (experiment.attention.sink, experiment.attention.recent, experiment.attention.beta) == (1, 3, 0.2)


@pytest.mark.parametrize("extra,message", [
    (["--quality-table", "{tmp}/missing.csv", "--budget", "0.1"], "missing.csv: quality table does not exist"),
    (["--quality-table", "{tmp}/bad.csv", "--budget", "0.1"], "bad.csv:3: score 'oops' is not a number"),
    (["--quality-table", "{tmp}/wide.csv", "--budget", "0.1"], "wide.csv:64: layer 62 outside 0..61"),
    (["--quality-table", "{tmp}/good.csv", "--budget", "lots"], "argument --budget: invalid float value: 'lots'"),
    (["--quality-table", "{tmp}/good.csv", "--budget", "nan"], "argument --budget: expected a finite number"),
    (["--quality-table", "{tmp}/good.csv"], "the following arguments are required: --budget"),
    (["--budget", "0.1"], "one of the arguments --quality-table --harness-model is required"),
    (["--quality-table", "{tmp}/good.csv", "--budget", "0.1", "--counts", "5:x"], "--counts '5:x': expected"),
    (["--quality-table", "{tmp}/good.csv", "--budget", "0.1", "--counts", "70"], "70 is outside 0..62"),
    (["--quality-table", "{tmp}/good.csv", "--budget", "-1", "--out", "{tmp}/p.yaml"], "no pattern within"),
    (["--harness-model", "{tmp}/nomodel", "--budget", "0.1"], "nomodel: not a model directory"),
    (["--quality-table", "{tmp}/good.csv", "--budget", "0.1", "experiment=nope"], "experiment"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    (tmp_path / "bad.csv").write_text("layer,score\n0,0.1\n1,oops\n")
    write_quality_table(tmp_path / "wide.csv", [0.01] * 63)
    write_quality_table(tmp_path / "good.csv", [0.01] * 62)
    args = [a.format(tmp=tmp_path) for a in extra]
    needs_r1 = [] if any(a.startswith("experiment=") for a in args) else R1
    assert main([*needs_r1, *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omnisim-attn-search: error: ") and message in lines[0], \
        captured.err
    assert captured.out == ""


# ---- the quality harness on a tiny random-weight Llama (2 layers), built locally in seconds -------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from backends.vllm.tiny_models import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models"), "llama")


def harness(path, **kw):
    from omnisim.attention.quality_harness import QualityHarness

    return QualityHarness(path, **{"sink_tokens": 4, "recent_tokens": 12, "context_tokens": 64, "prompts": 2,
                                   "passkeys": 1, "answer_tokens": 3, **kw})


def test_harness_masks_decode_on_compressed_layers_only(tiny_model):
    h = harness(tiny_model)
    assert h.num_layers == 2 and h.describe()["prompt_tokens"] == 32
    full = h.measure((0, 0))
    assert full.kl == 0.0 and full.passkey_accuracy == h.reference_passkey_accuracy
    one, both = h.measure((1, 0)), h.measure((1, 1))
    assert one.kl > 1e-6 and both.kl > 1e-6  # a 16-token window under a 64-token context changes the output
    assert 0.0 <= both.passkey_accuracy <= 1.0
    assert [q.kl for q in h.layer_table()] == [one.kl, h.measure((0, 1)).kl]
    # a window covering the whole context is full attention again: exactly no divergence
    wide = harness(tiny_model, sink_tokens=0, recent_tokens=64, passkeys=0)
    assert wide.measure((1, 1)).kl == 0.0
    # ... and one token short of it is not (the oldest, non-sink token falls out for the last query)
    assert harness(tiny_model, sink_tokens=0, recent_tokens=63, passkeys=0).measure((1, 1)).kl > 0.0


def test_harness_mask_in_one_pass_equals_prefill_then_cached_decode(tiny_model):
    import torch

    h = harness(tiny_model, passkeys=0)
    ids = h._calibration[:1]
    h.state.compressed, h.state.prompt_len = frozenset({0}), 32
    with torch.inference_mode():
        one_pass = h.model(input_ids=ids, use_cache=False).logits[0, 32:]
        out = h.model(input_ids=ids[:, :32], use_cache=True)
        stepped = []
        for i in range(32, 64):
            out = h.model(input_ids=ids[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
            stepped.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(stepped), one_pass, atol=1e-4, rtol=1e-4)
    h.state.compressed = frozenset()
    with torch.inference_mode():
        assert not torch.allclose(h.model(input_ids=ids, use_cache=False).logits[0, 32:], one_pass, atol=1e-4)


def test_cli_measures_whole_patterns_with_the_harness(tiny_model, tmp_path, capsys):
    table = tmp_path / "tiny.csv"
    args = ["experiment=cpu_tiny_1p1d", "--harness-model", str(tiny_model), "--harness-mode", "pattern",
            "--harness-block-size", "4", "--harness-context", "64", "--harness-prompts", "2",
            "--harness-passkeys", "1", "--harness-answer-tokens", "2", "--budget", "1e9", "--save-table", str(table),
            "--context", "1000"]  # past the 128-token window, so compressing pays
    assert main(args) == 0
    result = last_json(capsys)
    q = result["quality"]
    assert (q["source"], q["mode"], q["metric"], q["sink_tokens"], q["recent_tokens"]) == \
        ("harness", "pattern", "kl", 4, 12)
    assert result["entries"] == 2 and result["counts"] == [0, 1, 2] and result["measured"] == 4
    assert result["chosen"]["compressed"] == 2 and result["front"][0]["loss"] == 0.0
    singles = table_scores(read_quality_table(table), 2)
    assert (singles > 0).all()
    ones = {r["compressed"]: r for r in result["methods"]["greedy"]["front"]}
    assert ones[1]["loss"] == pytest.approx(singles.min())


def test_cli_refuses_a_harness_model_with_other_layers(tiny_model, capsys):
    assert main([*R1, "--harness-model", str(tiny_model), "--budget", "0.1", "--harness-passkeys", "0",
                 "--harness-context", "32"]) == 2
    err = capsys.readouterr().err
    assert "2 layers, but the pattern has 62 entries" in err and len(err.strip().splitlines()) == 1
