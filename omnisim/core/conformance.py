"""Conformance checks any policy can be run through (in the spirit of Gymnasium's check_env).

``check_proxy_policy(factory)``, ``check_placement_policy(factory)`` and ``check_engine_policy(factory)`` take
``factory(seed) -> policy`` and raise ``ConformanceError`` listing every violation: invalid ids or duplicates (an
engine policy: not a permutation of its queue, or a budget that is not an int in 1..max_num_batched_tokens),
non-determinism for a seed, mutated inputs, and forbidden dependencies (simulator or backend internals, wall clock,
global randomness).
"""
from __future__ import annotations

import ast
import inspect
import random
import sys
from typing import Callable, Sequence

import numpy as np

from omnisim.core.dispatch import Phase, ProxyPolicy, Waiting, check_assignments
from omnisim.core.engine_policy import PrefillPolicy, QueuedPrompt
from omnisim.core.instance import BatchSample, InstanceState, Role
from omnisim.core.placement import ExpertLoad, Placement, PlacementPolicy, Topology
from omnisim.core.request import Request
from omnisim.core.view import ClusterView

FORBIDDEN_IMPORTS = ("simpy", "omnisim.sim", "backends", "vllm", "torch", "torch_npu", "hydra", "aiohttp",
                     "time", "datetime", "socket", "requests", "urllib", "subprocess", "os")
_WALL_CLOCK = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"), ("datetime", "now"),
               ("datetime", "utcnow"), ("date", "today")}
_SEEDED_RNG = {"Random", "default_rng", "Generator", "PCG64", "SeedSequence", "Philox", "SFC64", "MT19937"}


class ConformanceError(AssertionError):
    pass


class _DictPrefix:
    def __init__(self, cached: dict[tuple[str, str], int]):
        self._cached = cached

    def cached_tokens(self, request: Request, instance_id: str) -> int:
        return self._cached.get((request.id, instance_id), 0)


def _dotted(node: ast.AST) -> list[str]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def _module_tree(name: str) -> ast.AST | None:
    module = sys.modules.get(name)
    try:
        return ast.parse(inspect.getsource(module))
    except (TypeError, OSError):
        return None


def _local_imports(tree: ast.AST, name: str, package: str) -> set[str]:
    """Modules of ``package`` that module ``name`` imports (absolute or relative)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.rsplit(".", node.level)[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith(package + ".") and c in sys.modules)
    return found


def source_violations(obj: object) -> list[str]:
    """Forbidden imports, wall-clock reads and global-RNG calls in the module that defines ``obj``'s class and in
    every module of the same package that it imports, directly or not (helpers count as much as the policy)."""
    first = type(obj).__module__
    package = first.split(".")[0]
    todo, seen, found = [first], set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = _module_tree(name)
        if tree is None:
            continue
        todo.extend(_local_imports(tree, name, package) - seen - {"omnisim.core", package})
        found += _violations(tree, name)
    return found


def _violations(tree: ast.AST, where: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IMPORTS):
                found.append(f"{where}:{node.lineno} imports {name}")
        if isinstance(node, ast.Call):
            parts = _dotted(node.func)
            if len(parts) >= 2 and (parts[-2], parts[-1]) in _WALL_CLOCK:
                found.append(f"{where}:{node.lineno} reads the wall clock ({'.'.join(parts)})")
            if len(parts) >= 2 and parts[-2] == "random" and parts[-1] not in _SEEDED_RNG:
                found.append(f"{where}:{node.lineno} uses global randomness ({'.'.join(parts)})")
    return found


def random_view(rng: random.Random, queue: Sequence[Waiting], colocated: bool) -> ClusterView:
    roles = [Role.MIXED] * rng.randint(1, 6) if colocated else (
        [Role.PREFILL] * rng.randint(1, 5) + [Role.DECODE] * rng.randint(1, 3))
    states = []
    for i, role in enumerate(roles):
        cap = rng.choice([4096, 65536, 1 << 20])
        states.append(InstanceState(
            id=f"{role.value}-{i}", role=role, healthy=rng.random() > 0.15, num_running=rng.randint(0, 40),
            num_waiting=rng.randint(0, 20), inflight_prompt_tokens=rng.randint(0, 40000),
            decode_tokens=rng.randint(0, cap), kv_usage=rng.random(), kv_capacity_tokens=cap,
            max_num_seqs=rng.choice([0, 32, 256]),
            recent_batches=tuple(BatchSample(rng.uniform(0.005, 0.5), rng.randint(0, 8192), rng.randint(0, 64))
                                 for _ in range(rng.randint(0, 4)))))
    cached = {(w.request.id, s.id): rng.randint(0, w.request.prompt_tokens - 1)
              for w in queue for s in states if rng.random() < 0.3}
    return ClusterView(now_s=rng.uniform(0, 1000), instances=tuple(states), prefix=_DictPrefix(cached))


def random_queue(rng: random.Random, phase: Phase, start: int, now_hint: float = 1000.0) -> list[Waiting]:
    out = []
    for i in range(rng.randint(0, 12)):
        blocks = rng.randint(0, 8)
        req = Request(id=f"r{start + i}", arrival_s=rng.uniform(0, now_hint), prompt_tokens=rng.randint(1, 20000),
                      output_tokens=rng.randint(1, 2000), prefix_hashes=tuple(rng.randint(0, 50) for _ in range(blocks)),
                      hash_block_tokens=512 if blocks else 0, priority=rng.randint(0, 2))
        out.append(Waiting(req, queued_s=req.arrival_s, source_id=None if phase is Phase.PREFILL else "prefill-0"))
    return out


def _check_assignments(out: object, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[str]:
    """The drivers' own rule (omnisim.core.dispatch.check_assignments), every violation listed."""
    return check_assignments(phase, queue, out, view.instances)[1]


def _run_proxy(policy: ProxyPolicy, calls) -> tuple[list, list[str]]:
    outputs, problems = [], []
    for phase, queue, view in calls:
        before = list(queue)
        out = policy.schedule(phase, queue, view)
        if list(queue) != before:
            problems.append(f"{phase.value}: schedule mutated its queue")
        problems += _check_assignments(out, phase, queue, view)
        outputs.append(list(out) if isinstance(out, (list, tuple)) else out)
    return outputs, problems


def check_proxy_policy(factory: Callable[[int], ProxyPolicy], *, calls: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    script = []
    for k in range(calls):
        phase = rng.choice([Phase.PREFILL, Phase.DECODE])
        colocated = phase is Phase.PREFILL and rng.random() < 0.3
        queue = random_queue(rng, phase, start=k * 100)
        script.append((phase, queue, random_view(rng, queue, colocated)))
    first = factory(seed)
    problems = source_violations(first)
    out_a, p = _run_proxy(first, script)
    problems += p
    out_b, _ = _run_proxy(factory(seed), script)
    if out_a != out_b:
        problems.append("two policies built with the same seed made different decisions on the same calls")
    if problems:
        raise ConformanceError(f"{type(first).__name__}: " + "; ".join(dict.fromkeys(problems)))


def random_placement_case(rng: np.random.Generator) -> tuple[ExpertLoad, Placement, Topology, int]:
    experts = int(rng.choice([8, 16, 64, 256]))
    nodes = int(rng.choice([1, 2, 4]))
    ranks = nodes * int(rng.choice([1, 2, 4]))
    while ranks > experts:
        ranks //= 2
    nodes = min(nodes, ranks)
    groups = int(rng.choice([g for g in (1, 2, 4, 8) if experts % g == 0 and g % nodes == 0] or [1]))
    base = -(-experts // ranks)
    topo = Topology(num_ranks=ranks, slots_per_rank=base + int(rng.integers(0, 3)), num_nodes=nodes, num_groups=groups)
    layers = int(rng.integers(1, 5))
    counts = rng.zipf(1.5, size=(layers, experts)).astype(float) * rng.integers(1, 100)
    counts[rng.random(counts.shape) < 0.1] = 0.0
    return ExpertLoad(counts), Placement.contiguous(layers, experts, topo), topo, experts


def check_placement_policy(factory: Callable[[int], PlacementPolicy], *, cases: int = 30, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    script = [random_placement_case(rng) for _ in range(cases)]
    first, second = factory(seed), factory(seed)
    problems = source_violations(first)
    for load, current, topo, experts in script:
        snapshot = (load.counts.copy(), current.phy2log.copy())
        try:
            new = first.rebalance(load, current, topo)
            again = second.rebalance(load, current, topo)
        except Exception as e:  # a policy may reject a topology it cannot serve, but must say so clearly
            if not isinstance(e, ValueError):
                problems.append(f"raised {type(e).__name__}: {e} for {topo}")
            continue
        if not isinstance(new, Placement):
            problems.append(f"rebalance returned {type(new).__name__}, not a Placement")
            continue
        try:
            new.validate(experts, topo)
        except ValueError as e:
            problems.append(f"invalid placement for {topo}: {e}")
        if new.num_layers != load.num_layers:
            problems.append(f"placement has {new.num_layers} layers, load has {load.num_layers}")
        if not np.array_equal(new.phy2log, again.phy2log):
            problems.append("two policies built with the same seed placed differently")
        if not (np.array_equal(snapshot[0], load.counts) and np.array_equal(snapshot[1], current.phy2log)):
            problems.append("rebalance mutated its inputs")
    if problems:
        raise ConformanceError(f"{type(first).__name__}: " + "; ".join(dict.fromkeys(problems)))


def random_engine_queue(rng: random.Random, start: int, now_s: float) -> list[QueuedPrompt]:
    """A waiting queue as an engine scheduler hands it over: some requests queued long ago (past any timeout), some
    preempted, equal lengths and equal queue times included (ties must still decide the same)."""
    lengths = [rng.randint(1, 20000) for _ in range(4)]
    out = []
    for i in range(rng.choice([0, 1, 2, 5, 12, 40])):
        tokens = rng.choice(lengths) if rng.random() < 0.3 else rng.randint(1, 40000)
        queued = rng.choice([now_s, now_s - 1e-3, rng.uniform(max(0.0, now_s - 600.0), now_s)])
        out.append(QueuedPrompt(f"r{start + i}", tokens, queued, rng.choice([0, 0, 0, 1, 3])))
    return out


def _check_plan(out: object, n: int, max_tokens: int) -> list[str]:
    """The engine scheduler's own rule (omnisim.engine.Scheduler), plus vLLM's cap: a step never schedules more than
    max_num_batched_tokens (its input buffers are that size), so a larger budget would decide differently there."""
    if not (isinstance(out, tuple) and len(out) == 2):
        return [f"plan returned {type(out).__name__}, not (order, budget)"]
    order, budget = out
    problems = []
    try:
        order = list(order)
    except TypeError:
        return [f"plan returned an order of type {type(order).__name__}, not a sequence of indices"]
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in order) or sorted(order) != list(range(n)):
        problems.append(f"order {order[:8]} is not a permutation of the {n} waiting requests")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        problems.append(f"budget {budget!r} is not an int >= 1")
    elif budget > max_tokens:
        problems.append(f"budget {budget} exceeds max_num_batched_tokens={max_tokens} (vLLM caps a step there)")
    return problems


def _plain(out: object) -> object:
    return (list(out[0]), out[1]) if isinstance(out, tuple) and len(out) == 2 else out


def check_engine_policy(factory: Callable[[int], PrefillPolicy], *, calls: int = 300, seed: int = 0) -> None:
    """Also: a decision depends on its inputs only. One policy object serves every prefilling instance of a
    simulated cluster (and each vLLM engine process has its own copy), so state carried between calls would leak
    between instances in simulation and not in production."""
    rng = random.Random(seed)
    script = []
    for k in range(calls):
        now = rng.choice([0.0, rng.uniform(0, 5), rng.uniform(0, 5000)])
        script.append((random_engine_queue(rng, k * 100, now), rng.choice([1, 16, 2048, 8192, 32768, 1 << 20]), now))
    first, second = factory(seed), factory(seed)
    problems = source_violations(first)
    outputs = []
    for queue, max_tokens, now in script:
        before = list(queue)
        out = first.plan(queue, max_tokens, now)
        if list(queue) != before:
            problems.append("plan mutated its waiting queue")
        problems += _check_plan(out, len(queue), max_tokens)
        outputs.append(_plain(out))
        if _plain(second.plan(list(queue), max_tokens, now)) != outputs[-1]:
            problems.append("two policies built with the same seed decided differently on the same queue")
    if [_plain(first.plan(q, m, t)) for q, m, t in reversed(script)] != outputs[::-1]:
        problems.append("the same policy decided differently when the same calls were replayed in another order")
    if problems:
        raise ConformanceError(f"{type(first).__name__}: " + "; ".join(dict.fromkeys(problems)))
