"""Run an emulated fleet as a process: ``python -m backends.emulator --prefill 2 --decode 1`` prints one JSON line
{"upstreams": [...]} (the proxy's upstream entries) once every engine listens, then serves until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys

from backends.emulator.fleet import EngineGroup, Fleet
from backends.emulator.linear_step_time import LinearStepTime


def _seconds(text: str) -> float:
    """A finite number >= 0 (argparse names the flag when this raises)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def _count(text: str) -> int:
    return _integer(text, 0)


def _positive(text: str) -> int:
    return _integer(text, 1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backends.emulator", description=__doc__)
    p.add_argument("--prefill", type=_count, default=0)
    p.add_argument("--decode", type=_count, default=0)
    p.add_argument("--mixed", type=_count, default=0)
    p.add_argument("--time-scale", type=_seconds, default=1.0, help="wall seconds per emulated second (0 = no sleep)")
    p.add_argument("--overhead-s", type=_seconds, default=0.005, help="LinearStepTime: fixed cost of a step")
    p.add_argument("--prefill-token-s", type=_seconds, default=5e-5)
    p.add_argument("--decode-seq-s", type=_seconds, default=2e-4)
    p.add_argument("--max-num-seqs", type=_positive, default=256)
    p.add_argument("--max-num-batched-tokens", type=_positive, default=8192)
    p.add_argument("--block-size", type=_positive, default=16)
    p.add_argument("--kv-capacity-tokens", type=_positive, default=1 << 20)
    p.add_argument("--ranks", type=_positive, default=1,
                   help="DP ranks per engine as separate engine cores (dp_mode=ranks): each its own scheduler with "
                        "--max-num-seqs seats and an equal share of --kv-capacity-tokens; a step lasts as long as "
                        "the slowest rank's")
    p.add_argument("--kv-events", action="store_true", help="publish KV events over ZMQ")
    p.add_argument("--shared-storage", action="store_true", help="PD by shared storage instead of kv_transfer_params")
    args = p.parse_args(argv)
    if args.prefill + args.decode + args.mixed < 1:
        p.error("no engines: give --prefill/--decode and/or --mixed")
    return args


async def serve(args: argparse.Namespace) -> None:
    model = LinearStepTime(overhead_s=args.overhead_s, prefill_token_s=args.prefill_token_s,
                           decode_seq_s=args.decode_seq_s)
    limits = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  block_size=args.block_size, kv_capacity_tokens=args.kv_capacity_tokens)
    groups = [EngineGroup(role, n, model, **limits, ranks=args.ranks) for role, n in
              (("prefill", args.prefill), ("decode", args.decode), ("mixed", args.mixed)) if n]
    fleet = Fleet(groups, time_scale=args.time_scale, kv_events=args.kv_events, shared_storage=args.shared_storage)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with fleet:
        print(json.dumps({"upstreams": fleet.upstreams()}), flush=True)
        await stop.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(serve(args))
    except (ValueError, OSError) as e:  # a setting the engines refuse, no free port: one line, no traceback
        print(f"python -m backends.emulator: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
