"""Run an emulated fleet as a process: ``python -m backends.emulator --prefill 2 --decode 1`` prints one JSON line
{"upstreams": [...]} (the proxy's upstream entries) once every engine listens, then serves until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from backends.emulator.fleet import EngineGroup, Fleet
from backends.emulator.linear_step_time import LinearStepTime


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backends.emulator", description=__doc__)
    p.add_argument("--prefill", type=int, default=0)
    p.add_argument("--decode", type=int, default=0)
    p.add_argument("--mixed", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per emulated second (0 = no sleep)")
    p.add_argument("--overhead-s", type=float, default=0.005, help="LinearStepTime: fixed cost of a step")
    p.add_argument("--prefill-token-s", type=float, default=5e-5)
    p.add_argument("--decode-seq-s", type=float, default=2e-4)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-capacity-tokens", type=int, default=1 << 20)
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
    groups = [EngineGroup(role, n, model, **limits) for role, n in
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
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
