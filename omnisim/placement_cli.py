"""omnisim-placement: compute an expert placement for a recorded load matrix and report its balance.

    omnisim-placement --load load.npy --ranks 288 --slots 288 --policy omni_placement --out phy2log.npy
    omnisim-placement --load sglang.csv --ranks 32 --slots 288 --nodes 4 --groups 8 --policy deepseek_eplb
    omnisim-placement --load load.npy --ranks 32 --slots 288 --policy migration_aware --set stall_fraction=1.0

--policy NAME is conf/placement/NAME.yaml, with the values that file gives (as ``omnisim placement=NAME`` runs it);
--set KEY=VALUE overrides one of them (a dotted key reaches a nested node, e.g. inner.min_gain=0.05).

--slots is the total number of physical expert slots (experts + redundant), split evenly over the ranks; --out
writes the physical-to-logical map ``[layers, slots]``, rank-major (slot // slots_per_rank = rank). A load file with
windows ``[windows, layers, experts]`` is summed over its windows. The policy starts from the static contiguous
layout (or ``--current FILE.npy``). The last line printed is JSON: max_over_mean (per layer, overall = sum over
layers of the max rank load / sum of the mean, and the same for the starting layout), replicas used (load-bearing
redundant replicas per layer: distinct (expert, rank) pairs beyond one per expert), moved slots, seconds (the
policy's compute time) and config (the policy's resolved settings).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf

from omnisim.app import compose_option, config_options, instantiate_node
from omnisim.core import ExpertLoad, Placement, Topology
from omnisim.moe.load_matrix import read_load_matrix
from omnisim.policies.placement.layout import contiguous_layout, expert_ranks, max_over_mean, step_imbalance


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="omnisim-placement", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="load matrix: .npy [layers, experts] (or [windows, ...]) or .csv")
    p.add_argument("--ranks", type=int, required=True, help="EP ranks")
    p.add_argument("--slots", type=int, required=True, help="physical expert slots in all (experts + redundant)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks are spread over (hierarchical EPLB)")
    p.add_argument("--groups", type=int, default=1, help="expert groups of the model (DeepSeek: 8)")
    p.add_argument("--policy", required=True, choices=config_options("placement"),
                   help="placement policy: conf/placement/POLICY.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the policy's config (repeatable)")
    p.add_argument("--current", help="starting placement .npy [layers, slots] (default: static contiguous)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the physical-to-logical map [layers, slots] here (.npy)")
    return p.parse_args(argv)


def policy_config(name: str, settings: list[str], seed: int) -> dict:
    """conf/placement/<name>.yaml composed, with ``KEY=VALUE`` settings applied (each key must exist) and
    ``${seed}`` resolved."""
    node = OmegaConf.create(compose_option("placement", name))
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {setting!r}")
        absent = OmegaConf.select(node, key, default=KeyError, throw_on_resolution_failure=False) is KeyError
        if key == "_target_" or absent:
            raise ValueError(f"--set {key}: conf/placement/{name}.yaml has no key {key!r}")
        OmegaConf.update(node, key, yaml.safe_load(value), merge=False)
    root = OmegaConf.create({"seed": seed, "node": node})
    return OmegaConf.to_container(root.node, resolve=True)


def run(args: argparse.Namespace) -> dict:
    counts = read_load_matrix(args.load)
    if counts.ndim == 3:
        counts = counts.sum(axis=0)
    layers, experts = counts.shape
    if args.ranks < 1 or args.slots < 1:
        raise ValueError(f"--ranks and --slots must be >= 1, got {args.ranks}, {args.slots}")
    if args.slots % args.ranks:
        raise ValueError(f"--slots {args.slots} is not divisible by --ranks {args.ranks}")
    if args.slots < experts:
        raise ValueError(f"--slots {args.slots} cannot hold the {experts} experts of {args.load}")
    if args.out and not Path(args.out).resolve().parent.is_dir():  # say so before computing, not after
        raise ValueError(f"--out {args.out}: directory {Path(args.out).resolve().parent} does not exist")
    topology = Topology(args.ranks, args.slots // args.ranks, args.nodes, args.groups)
    if args.current:
        try:
            start = Placement(np.load(args.current, allow_pickle=False))
        except (OSError, ValueError) as e:  # missing, not .npy, pickled objects, or not an integer map
            raise ValueError(f"--current {args.current}: not a placement .npy [layers, slots] ({e})") from e
        if start.phy2log.shape != (layers, args.slots):
            raise ValueError(f"--current {args.current} has shape {start.phy2log.shape}, "
                             f"expected {(layers, args.slots)}")
        start.validate(experts, topology)
    else:
        start = Placement(contiguous_layout(layers, experts, topology))
    config = policy_config(args.policy, args.set, args.seed)
    try:
        policy = instantiate_node(config, args.seed)
    except Exception as e:  # hydra wraps the constructor's error; its message names the argument
        raise ValueError(f"--policy {args.policy}: {e}") from e
    load = ExpertLoad(counts)
    began = time.perf_counter()
    placement = policy.rebalance(load, start, topology)
    seconds = time.perf_counter() - began
    placement.validate(experts, topology)
    phy2log = placement.phy2log
    if args.out:
        try:
            np.save(args.out, phy2log)
        except OSError as e:
            raise ValueError(f"--out {args.out}: cannot write ({e.strerror})") from e
    ratio = max_over_mean(phy2log, counts, topology.num_ranks)
    used = (expert_ranks(phy2log, experts, topology) > 0).sum(axis=(1, 2)) - experts
    return {
        "policy": args.policy, "layers": layers, "experts": experts, "ranks": topology.num_ranks,
        "slots": topology.num_slots, "slots_per_rank": topology.slots_per_rank,
        "max_over_mean": {"overall": step_imbalance(phy2log, counts, topology.num_ranks),
                          "max_layer": float(ratio.max()), "per_layer": [round(float(r), 6) for r in ratio],
                          "start_overall": step_imbalance(start.phy2log, counts, topology.num_ranks)},
        "replicas_used": {"total": int(used.sum()), "per_layer": [int(u) for u in used]},
        "moved_slots": int((phy2log != start.phy2log).sum()),
        "seconds": seconds, "out": str(Path(args.out)) if args.out else None, "config": config,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:
        print(f"omnisim-placement: {e}", file=sys.stderr)
        return 2
    print(f"{result['policy']}: {result['layers']} layers x {result['experts']} experts on {result['ranks']} ranks x "
          f"{result['slots_per_rank']} slots: max/mean {result['max_over_mean']['start_overall']:.3f} -> "
          f"{result['max_over_mean']['overall']:.3f}, {result['replicas_used']['total']} replicas, "
          f"{result['moved_slots']} slots moved, {result['seconds'] * 1000:.1f} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
