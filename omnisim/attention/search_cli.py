"""omnisim-attn-search: search OmniAttn layer patterns that maximise decode throughput under a quality budget.

    omnisim-attn-search experiment=omniinfer_r1_7p1d attention=omni_attn --quality-table table.csv --budget 0.05
    omnisim-attn-search experiment=cpu_tiny_1p1d --harness-model DIR --harness-mode pattern --budget 0.01
    omnisim-attn-search experiment=omniinfer_r1_7p1d attention=omni_attn --harness-model DIR --save-table t.csv ...

Positional KEY=VALUE arguments are Hydra overrides, composed as ``omnisim`` composes them. The decode group of the
composed (disaggregated) cluster and the cost model give each pattern's steady-state decode tokens/s at
``--context`` tokens per sequence (default: the workload's mean prompt + half its mean output). The window
(sink, recent, beta) and the number of pattern entries come from ``attention=`` (OmniInfer's R1 file has 62: 61
layers + the MTP layer), or OmniAttn's defaults with one entry per model layer when none is given.

Quality (a loss, lower is better; ``--budget`` is in its units):
- ``--quality-table FILE``: CSV ``layer,score`` (omnisim.attention.quality_table), losses added over the compressed
  layers;
- ``--harness-model DIR``: measured on a local Hugging Face causal LM with as many layers as the pattern has
  entries (omnisim.attention.quality_harness), either per layer and added (``--harness-mode table``) or on whole
  patterns (``--harness-mode pattern``: layers interact, every evaluation is a measurement); the loss is the KL
  divergence from full attention (``--harness-metric kl``) or the drop in passkey accuracy (``passkey``); the
  window in tokens is the attention's sink and recent blocks times ``--harness-block-size``.

Prints one row per compressed-layer count on the Pareto front (best pattern, loss, tokens/s, speedup over full
attention) for each method, the fastest pattern within the budget, and as the last line JSON (front, chosen,
evaluations, seed, ...). ``--out FILE.yaml`` writes the chosen pattern as a conf/attention file: save it as
conf/attention/NAME.yaml and run ``omnisim attention=NAME``, or keep it as DIR/attention/NAME.yaml and run
``omnisim --config-dir DIR attention=NAME``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from omnisim.attention.decode_throughput import DecodeThroughput
from omnisim.attention.omni_attn import OmniAttn
from omnisim.attention.pattern_search import (PatternLoss, choose, format_layers, front_rows, genetic_search,
                                              greedy_search, pareto_front, table_loss)
from omnisim.attention.quality_table import read_quality_table, table_scores, write_quality_table

PROG = "omnisim-attn-search"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every user error of this command
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides, as for omnisim")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--quality-table", metavar="FILE", help="per-layer loss table: CSV layer,score")
    q.add_argument("--harness-model", metavar="DIR", help="measure quality on this local Hugging Face causal LM")
    p.add_argument("--budget", type=float, required=True, help="the most loss a pattern may have")
    p.add_argument("--method", choices=("genetic", "greedy", "both"), default="both")
    p.add_argument("--seed", type=int, help="search (and harness) seed (default: the config's seed)")
    p.add_argument("--generations", type=int, default=30, help="genetic: generations per compressed-layer count")
    p.add_argument("--population", type=int, default=50, help="genetic: patterns per generation")
    p.add_argument("--patience", type=int, default=10, help="genetic: stop a count after this many generations "
                   "without a better pattern")
    p.add_argument("--counts", default="all", help="compressed-layer counts to search: all, A:B[:STEP] or a "
                   "comma list (0, full attention, is always added)")
    p.add_argument("--context", type=int, help="tokens per decode sequence (default: workload's mean prompt + half "
                   "its mean output)")
    p.add_argument("--out", metavar="FILE.yaml", help="write the chosen pattern as a conf/attention file")
    h = p.add_argument_group("harness (with --harness-model)")
    h.add_argument("--harness-mode", choices=("table", "pattern"), default="table",
                   help="table: measure each layer alone, add them up; pattern: measure whole patterns")
    h.add_argument("--harness-metric", choices=("kl", "passkey"), default="kl")
    h.add_argument("--harness-block-size", type=int, default=16, help="tokens per block of the window")
    h.add_argument("--harness-context", type=int, default=256, help="tokens per calibration sequence / passkey "
                   "prompt")
    h.add_argument("--harness-prompt", type=int, help="prompt (prefilled) tokens of a calibration sequence "
                   "(default: half of --harness-context)")
    h.add_argument("--harness-prompts", type=int, default=4, help="calibration sequences")
    h.add_argument("--harness-passkeys", type=int, default=4, help="passkey trials (0: none)")
    h.add_argument("--harness-answer-tokens", type=int, default=6, help="greedy tokens decoded per passkey trial")
    h.add_argument("--harness-text", metavar="FILE", help="calibration text (default: seeded random words)")
    h.add_argument("--harness-device", default="cpu")
    h.add_argument("--harness-dtype", default="float32")
    h.add_argument("--save-table", metavar="FILE", help="write the harness's per-layer table (layer,score,kl,"
                   "passkey_accuracy) here")
    args = p.parse_intermixed_args(argv)
    if not math.isfinite(args.budget):
        raise _UsageError(f"argument --budget: expected a finite number, got {args.budget}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise _UsageError(f"unexpected argument {bad[0]!r} (Hydra overrides are KEY=VALUE)")
    return args


def parse_counts(spec: str, num_layers: int) -> list[int]:
    spec = spec.strip()
    try:
        if spec == "all":
            counts = list(range(num_layers + 1))
        elif ":" in spec:
            parts = [int(x) for x in spec.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            step = parts[2] if len(parts) == 3 else 1
            counts = list(range(parts[0], parts[1] + 1, step))
        else:
            counts = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--counts {spec!r}: expected all, A:B[:STEP] or a comma list of integers") from None
    bad = [k for k in counts if not 0 <= k <= num_layers]
    if bad:
        raise ValueError(f"--counts {spec!r}: {bad[0]} is outside 0..{num_layers} (the pattern's entries)")
    return sorted(set(counts) | {0})


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from omnisim.app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def _workload_context(workload) -> int:
    prompts, outputs = [], []
    for request in workload.requests():
        prompts.append(request.prompt_tokens)
        outputs.append(request.output_tokens)
    if not prompts:
        raise ValueError("the workload produced no requests: give --context")
    return int(round(np.mean(prompts) + np.mean(outputs) / 2))


def _search_space(cfg, context: int | None) -> dict:
    from omnisim.app import build_experiment

    experiment, _ = build_experiment(cfg)
    model, hardware, cluster = experiment.model, experiment.hardware, experiment.cluster
    if not cluster.disaggregated:  # OmniInfer runs OmniAttn on decode instances only (prefill stays full)
        raise ValueError(f"cluster {cluster.name or '(colocated)'}: OmniAttn runs on the decode instances of a "
                         "disaggregated (prefill + decode) cluster; pick a PD cluster")
    role, group = "decode", cluster.decode
    attention = experiment.attention
    if attention is not None:
        attention.check_model(model.layers)
        entries, window = len(attention.pattern), attention
    else:
        entries, window = model.layers, OmniAttn((0,) * model.layers)
    if context is None:
        context = _workload_context(experiment.workload)
    cost = experiment.cost(model=model, hardware=hardware, parallel=group.parallelism)
    blocks = group.kv_capacity(model, hardware) // group.block_size
    throughput = DecodeThroughput(cost, model_layers=model.layers, block_size=group.block_size,
                                  max_num_seqs=group.max_num_seqs, uncompressed_blocks=blocks, context=context,
                                  sink=window.sink, recent=window.recent, beta=window.beta)
    return {"experiment": experiment, "role": role, "group": group, "entries": entries, "window": window,
            "configured": attention, "throughput": throughput, "blocks": blocks, "context": context}


def _harness(args, window: OmniAttn, seed: int):
    from omnisim.attention.quality_harness import QualityHarness

    for name in ("harness_block_size", "harness_context", "harness_prompts", "harness_passkeys"):
        if getattr(args, name) < (0 if name == "harness_passkeys" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    text = None
    if args.harness_text:
        path = Path(args.harness_text)
        if not path.is_file():
            raise ValueError(f"--harness-text {path}: does not exist")
        text = path.read_text()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar per run is noise on this command's output
    except ImportError:
        pass  # QualityHarness says what is missing
    return QualityHarness(args.harness_model, sink_tokens=window.sink * args.harness_block_size,
                          recent_tokens=window.recent * args.harness_block_size,
                          context_tokens=args.harness_context, prompt_tokens=args.harness_prompt,
                          prompts=args.harness_prompts, passkeys=args.harness_passkeys,
                          answer_tokens=args.harness_answer_tokens, seed=seed, text=text,
                          device=args.harness_device, dtype=args.harness_dtype)


def run(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    table = read_quality_table(args.quality_table) if args.quality_table else None  # bad files fail fast
    if args.harness_model and not Path(args.harness_model).is_dir():
        raise ValueError(f"--harness-model {args.harness_model}: not a model directory")
    if args.save_table and not args.harness_model:
        raise ValueError("--save-table needs --harness-model (it writes the harness's per-layer table)")
    if args.context is not None and args.context < 1:
        raise ValueError(f"--context: expected a positive number of tokens, got {args.context}")
    cfg = compose(args.overrides)
    seed = int(cfg.seed) if args.seed is None else args.seed
    space = _search_space(cfg, args.context)
    L, window, throughput = space["entries"], space["window"], space["throughput"]
    counts = parse_counts(args.counts, L)

    quality: dict = {}
    if table is not None:
        table = read_quality_table(args.quality_table, L)  # again, now that the entries are known: FILE:LINE
        loss_fn = table_loss(table_scores(table, L, args.quality_table))
        quality = {"source": "table", "path": str(args.quality_table), "combine": "additive"}
    else:
        harness = _harness(args, window, seed)
        if harness.num_layers != L:
            model = space["experiment"].model
            raise ValueError(f"--harness-model {args.harness_model}: {harness.num_layers} layers, but the pattern "
                             f"has {L} entries (model {model.name}: {model.layers} layers; attention= sets the "
                             "entries)")
        measured = None
        if args.harness_mode == "table" or args.save_table:
            measured = harness.layer_table()
            if args.save_table:
                write_quality_table(args.save_table, [harness.loss_of(m, args.harness_metric) for m in measured],
                                    {"kl": [m.kl for m in measured],
                                     "passkey_accuracy": [math.nan if m.passkey_accuracy is None
                                                          else m.passkey_accuracy for m in measured]},
                                    comment=f"{PROG}: per-layer loss ({args.harness_metric}) of "
                                            f"{args.harness_model}, {json.dumps(harness.describe())}")
        if args.harness_mode == "table":
            loss_fn = table_loss([harness.loss_of(m, args.harness_metric) for m in measured])
        else:
            loss_fn = harness.loss(args.harness_metric)
        quality = {"source": "harness", "model": str(args.harness_model), "mode": args.harness_mode,
                   "combine": "additive" if args.harness_mode == "table" else "measured whole patterns",
                   "metric": args.harness_metric, "block_size": args.harness_block_size, **harness.describe(),
                   "table_measurements": L if measured is not None else 0, "saved_table": args.save_table}

    store: dict = {}  # one cache of measured losses for all methods
    methods = ["genetic", "greedy"] if args.method == "both" else [args.method]
    results, best = {}, {}
    for name in methods:
        loss = PatternLoss(loss_fn, L, store)
        t0 = time.perf_counter()
        if name == "genetic":
            found = genetic_search(loss, L, counts, population=args.population, generations=args.generations,
                                   seed=seed, patience=args.patience)
        else:
            found = greedy_search(loss, L, counts)
        seconds = time.perf_counter() - t0
        rows = front_rows(found, throughput.tokens_per_s, L)
        front = pareto_front(rows)
        chosen = choose(front, args.budget)
        results[name] = {"front": [r.as_dict() for r in front], "chosen": chosen.as_dict() if chosen else None,
                         "evaluations": loss.evaluations, "seconds": seconds,
                         "dominated": [r.compressed for r in rows if r not in front]}
        for k, c in found.items():
            if k not in best or c.loss < best[k].loss:
                best[k] = c
    front = pareto_front(front_rows(best, throughput.tokens_per_s, L))
    chosen = choose(front, args.budget)

    full = throughput.point((0,) * L)
    configured = None
    if space["configured"] is not None:
        pattern = space["configured"].pattern
        loss = float(PatternLoss(loss_fn, L, store)(np.array([pattern]))[0])
        point = throughput.point(pattern)
        configured = {"compressed": sum(pattern), "layers": [i for i, v in enumerate(pattern) if v],
                      "loss": loss if math.isfinite(loss) else None,  # inf: it compresses a must-stay-full layer
                      "tokens_per_s": point.tokens_per_s, "speedup": point.tokens_per_s / full.tokens_per_s,
                      "batch": point.batch, "bound": point.bound}
    group, exp = space["group"], space["experiment"]
    result = {
        "experiment": str(cfg.name), "overrides": list(args.overrides), "model": exp.model.name,
        "hardware": exp.hardware.name,
        "decode": {"role": space["role"], "tp": group.tp, "dp": group.dp, "ep": group.ep,
                   "max_num_seqs": group.max_num_seqs, "block_size": group.block_size,
                   "uncompressed_blocks": space["blocks"]},
        "context": space["context"], "entries": L, "model_layers": exp.model.layers,
        "window": {"sink": window.sink, "recent": window.recent, "beta": window.beta,
                   "tokens": window.window_tokens(group.block_size)},
        "quality": quality, "budget": args.budget, "seed": seed, "counts": counts,
        "full_attention": dataclasses.asdict(full), "methods": results,
        "front": [r.as_dict() for r in front], "chosen": chosen.as_dict() if chosen else None,
        "chosen_point": dataclasses.asdict(throughput.point(_pattern(chosen.layers, L))) if chosen else None,
        "configured": configured, "evaluations": {name: results[name]["evaluations"] for name in methods},
        "measured": len(store), "out": None,
    }
    if args.out:
        if chosen is None:
            raise ValueError(f"--out: no pattern within --budget {args.budget}; nothing to write")
        result["out"] = str(write_pattern(args.out, _pattern(chosen.layers, L), window, result))
    result["seconds"] = time.perf_counter() - began
    return result


def _pattern(layers, entries: int) -> tuple[int, ...]:
    chosen = set(layers)
    return tuple(int(i in chosen) for i in range(entries))


def write_pattern(path: str | Path, pattern: tuple[int, ...], window: OmniAttn, result: dict) -> Path:
    """A conf/attention-style file (one _target_, exactly OmniAttn's arguments) with how it was found."""
    spec = OmniAttn(pattern, window.sink, window.recent, window.beta)  # validates before anything is written
    chosen = result["chosen"]
    q = result["quality"]
    source = q.get("path") or f"harness {q.get('model')} ({q.get('metric')}, {q.get('mode')})"
    lines = [
        f"# {PROG} {' '.join(result['overrides'])}: {spec.compressed} of {len(pattern)} layers compressed "
        f"({format_layers(chosen['layers'])})",
        f"# loss {chosen['loss']:.6g} within budget {result['budget']:g} ({source}); cost model: "
        f"{chosen['tokens_per_s']:.1f} decode tok/s, {chosen['speedup']:.3f}x full attention at context "
        f"{result['context']} (seed {result['seed']})",
        "_target_: omnisim.attention.OmniAttn",
        f"pattern: [{', '.join(map(str, spec.pattern))}]",
        f"sink: {spec.sink}",
        f"recent: {spec.recent}",
        f"beta: {spec.beta}",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _print_front(title: str, front: list[dict]) -> None:
    print(title)
    print(f"  {'compressed':>10} {'loss':>12} {'tok/s':>10} {'speedup':>8}  layers")
    for r in front:
        print(f"  {r['compressed']:>10} {r['loss']:>12.6g} {r['tokens_per_s']:>10.1f} {r['speedup']:>7.3f}x  "
              f"{format_layers(r['layers'])}")


def report(result: dict) -> None:
    d, w, q = result["decode"], result["window"], result["quality"]
    full = result["full_attention"]
    print(f"{result['model']} on {result['hardware']}, {d['role']} tp{d['tp']} dp{d['dp']} ep{d['ep']} "
          f"(max_num_seqs {d['max_num_seqs']}), context {result['context']} tokens, window sink {w['sink']} + "
          f"recent {w['recent']} blocks of {d['block_size']}, beta {w['beta']}; full attention {full['batch']} seqs "
          f"({full['bound']}-bound), {full['tokens_per_s']:.1f} tok/s")
    print(f"quality: {q.get('path') or q.get('model')} ({q['combine']}"
          + (f", {q['metric']}" if 'metric' in q else "") + ")")
    for name, m in result["methods"].items():
        _print_front(f"{name}: Pareto front ({m['evaluations']} evaluations, {m['seconds']:.2f} s, seed "
                     f"{result['seed']}; dominated counts: {len(m['dominated'])})", m["front"])
    c = result["chosen"]
    if c:
        print(f"chosen (budget {result['budget']:g}): {c['compressed']} compressed, loss {c['loss']:.6g}, "
              f"{c['tokens_per_s']:.1f} tok/s, {c['speedup']:.3f}x: {format_layers(c['layers'])}")
    else:
        print(f"chosen (budget {result['budget']:g}): none within the budget")
    cf = result["configured"]
    if cf:
        print(f"configured attention pattern: {cf['compressed']} compressed, loss {cf['loss']:.6g}, "
              f"{cf['tokens_per_s']:.1f} tok/s, {cf['speedup']:.3f}x ({cf['batch']} seqs, {cf['bound']}-bound)")
    if result["out"]:
        print(f"wrote {result['out']}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = run(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - a user's error is one line, as omnisim's
        if not _user_error(e):
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    report(result)
    print(json.dumps(result))
    return 0


def _user_error(e: Exception) -> bool:
    if isinstance(e, (_UsageError, ValueError, FileNotFoundError)):
        return True
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(e, (HydraException, OmegaConfBaseException))


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
