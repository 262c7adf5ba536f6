"""Replay a workload config against an OpenAI-compatible endpoint and write the run like ``omnisim`` does:

    python -m backends.loadgen --url http://127.0.0.1:8000 --workload conf/workload/poisson.yaml \\
        --set max_requests=100 --slo conf/slo/default.yaml --out runs/vllm-1

writes OUT/requests.parquet, plots and OUT/summary.json (omnisim.metrics.write_run), so the summary compares
side by side with a simulated run of the same workload. ``--set KEY=VALUE`` overrides a key of the workload file.
A closed-loop workload (conf/workload/closed_loop.yaml) runs as its closed loop; ``--max-concurrency N`` caps any
workload at N requests in flight (with ``--ignore-arrivals``: a closed loop over its requests).
Exit status: 0 when at least one request was served, 1 (one line on stderr; the run is still written) when none
was, 2 for bad arguments or no server at --url.
The workload and SLO files are conf/ group files (one ``_target_`` each); ``${seed}`` resolves to --seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from backends.loadgen.load_generator import ENDPOINTS, LoadGenerator


_ABSENT = object()


def _instantiate(path: Path, seed: int, overrides: list[str], what: str):
    from omnisim.app import compose_node, instantiate_node

    if not path.is_file():
        raise ValueError(f"--{what}: no such file {path}")
    # Composed first, so --set reaches keys its defaults list brings in (a closed loop's inner.rate, lengths...).
    node = OmegaConf.create(compose_node(OmegaConf.load(path)))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        if OmegaConf.select(node, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            raise ValueError(f"--set: {path} has no key {key!r}")
        OmegaConf.update(node, key, yaml.safe_load(value), merge=False)
    return instantiate_node(node, seed)


def _capped(workload, max_concurrency: int | None, ignore_arrivals: bool):
    """The workload's requests, all of them, sent by ``max_concurrency`` clients."""
    from omnisim.workload import ClosedLoopWorkload

    if max_concurrency is None:
        raise ValueError("--ignore-arrivals: needs --max-concurrency")
    if isinstance(workload, ClosedLoopWorkload):
        raise ValueError("--max-concurrency: the workload is a closed loop already (--set concurrency=N)")
    if max_concurrency < 1:
        raise ValueError(f"--max-concurrency: must be >= 1, got {max_concurrency}")
    count = sum(1 for _ in workload.requests())
    return ClosedLoopWorkload(workload, max_concurrency, keep_arrivals=not ignore_arrivals, max_requests=count)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the endpoint (omnisim-proxy, vLLM, any OpenAI-compatible server)")
    p.add_argument("--workload", type=Path, required=True, help="a conf/workload/*.yaml file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a workload key")
    p.add_argument("--slo", type=Path, help="a conf/slo/*.yaml file (default: omnisim.metrics.SLO())")
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint", choices=ENDPOINTS, default="completions")
    p.add_argument("--model", help="model name (default: the server's first /v1/models entry)")
    p.add_argument("--api-key")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--prompt-format", choices=("text", "token_ids"), default="text")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per workload second")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--max-concurrency", type=int, metavar="N",
                   help="at most N requests in flight: N clients, each sending when its last request has ended, no "
                        "earlier than the request's arrival time (vLLM's --request-rate with --max-concurrency)")
    p.add_argument("--ignore-arrivals", action="store_true",
                   help="with --max-concurrency: send as soon as a client is free (a closed loop, as vLLM's "
                        "--max-concurrency with --request-rate inf)")
    args = p.parse_args(argv)
    from omnisim.metrics import SLO, format_summary, summarize, write_run

    try:
        workload = _instantiate(args.workload, args.seed, args.set, "workload")
        if args.max_concurrency is not None or args.ignore_arrivals:
            workload = _capped(workload, args.max_concurrency, args.ignore_arrivals)
        slo = _instantiate(args.slo, args.seed, [], "slo") if args.slo else SLO()
        gen = LoadGenerator(args.url, endpoint=args.endpoint, model=args.model, api_key=args.api_key,
                            stream=not args.no_stream, prompt_format=args.prompt_format,
                            vocab_size=args.vocab_size, seed=args.seed, time_scale=args.time_scale,
                            request_timeout_s=args.timeout_s)
        records = gen.replay(workload)  # ValueError: no --model and none served at --url
    except ValueError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    summary = summarize(records, slo)
    summary.update(backend="loadgen", url=args.url, seed=args.seed)
    write_run(args.out, records, summary)
    served = int((records["status"] == "ok").sum()) if len(records) else 0
    if not served:
        failed = records[records["status"] != "ok"] if len(records) else records
        first = f"; first error: {str(failed['error'].iloc[0])[:200]}" if len(failed) else ""
        print(f"loadgen: nothing was served at {args.url} ({len(records)} request(s) sent{first}); "
              f"run written to {args.out}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
