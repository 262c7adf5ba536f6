"""OmniAttn's offline layer-pattern search: which layers to compress (sink + recent window) so that decode runs
fastest while the quality loss stays within a budget.

A pattern is a 0/1 vector over the layers (1 = compressed). Throughput depends on how many layers are compressed
(every layer costs the same in the cost model), quality on which, so the search runs per compressed-layer count k
and keeps the lowest-loss pattern of each k; the quality/throughput Pareto front and the fastest pattern within the
budget follow from those rows.

- ``genetic_search``: msmodelslim's scheme. Sparsity is stepped from high to low (k descending). At each k the
  genome is the per-layer 0/1 vector with exactly k ones; a generation keeps a few elites, breeds most of the rest
  from parents drawn with a bias to the best (rank-weighted) and fills a share with random patterns. Crossover keeps
  the layers both parents compress and draws the rest from either parent, weighted by the layers' per-layer score
  (the mean rank of the patterns that compress them); mutations swap a compressed layer with a full one, so k never
  changes. The next (lower) k starts from this k's population with its worst-scored layers uncompressed.
- ``greedy_search``: the baseline: measure every layer alone and compress the k layers of smallest loss. Optimal
  when losses add up; misled when layers interact.

``loss`` is any ``patterns[n, L] (uint8) -> losses[n]`` (lower is better): a per-layer table combined additively
(``table_loss``), or the quality harness measuring whole patterns. ``PatternLoss`` wraps it with a cache and counts
the distinct patterns evaluated. Randomness comes only from a numpy Generator built from ``seed``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

LossFn = Callable[[np.ndarray], np.ndarray]


class PatternLoss:
    """``loss_fn`` behind a cache keyed by pattern; ``evaluations`` counts distinct patterns measured. Several
    searches can share one ``store`` (a dict) so an expensive measurement is never repeated; each keeps its own
    count."""

    def __init__(self, loss_fn: LossFn, num_layers: int, store: dict | None = None) -> None:
        self.loss_fn, self.num_layers = loss_fn, num_layers
        self.store = {} if store is None else store
        self.seen: set[bytes] = set()

    @property
    def evaluations(self) -> int:
        return len(self.seen)

    def __call__(self, patterns: np.ndarray) -> np.ndarray:
        patterns = np.ascontiguousarray(patterns, dtype=np.uint8).reshape(-1, self.num_layers)
        keys = [row.tobytes() for row in patterns]
        todo = {}
        for key, row in zip(keys, patterns):
            if key not in self.store and key not in todo:
                todo[key] = row
        if todo:
            values = np.asarray(self.loss_fn(np.stack(list(todo.values()))), dtype=float).reshape(-1)
            if values.shape[0] != len(todo):
                raise ValueError(f"quality: the loss function returned {values.shape[0]} values for {len(todo)} "
                                 "patterns")
            self.store.update(zip(todo, values.tolist()))
        self.seen.update(keys)
        return np.array([self.store[key] for key in keys], dtype=float)


def table_loss(scores: np.ndarray) -> LossFn:
    """A per-layer loss table combined additively: a pattern's loss is the sum of its compressed layers' scores
    (``inf`` for a layer that must stay full)."""
    scores = np.asarray(scores, dtype=float)

    def loss(patterns: np.ndarray) -> np.ndarray:
        return np.where(patterns.astype(bool), scores, 0.0).sum(axis=1)  # 0 * inf would be nan

    return loss


@dataclass(frozen=True)
class Candidate:
    """The best pattern a search found with ``compressed`` layers, and its loss."""

    compressed: int
    pattern: tuple[int, ...]
    loss: float

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(i for i, v in enumerate(self.pattern) if v)


def _candidate(pattern: np.ndarray, loss: float) -> Candidate:
    return Candidate(int(pattern.sum()), tuple(int(v) for v in pattern), float(loss))


def _check_counts(num_layers: int, counts: Iterable[int]) -> list[int]:
    counts = sorted({int(k) for k in counts}, reverse=True)
    bad = [k for k in counts if not 0 <= k <= num_layers]
    if bad:
        raise ValueError(f"--counts: {bad[0]} compressed layers is outside 0..{num_layers}")
    if not counts:
        raise ValueError("--counts: no compressed-layer counts to search")
    return counts


def _unique_rows(patterns: np.ndarray) -> np.ndarray:
    """Rows in first-seen order without repeats (a repeat would take a place in the population for nothing)."""
    _, first = np.unique(patterns, axis=0, return_index=True)
    return patterns[np.sort(first)]


def _layer_ranks(pop: np.ndarray) -> np.ndarray:
    """Per layer, the mean rank (0 = best) of the patterns that compress it; the population's mean rank for a layer
    none of them compresses. ``pop`` is sorted best first. Ranks, not losses: robust to scale and to inf."""
    n = pop.shape[0]
    ranks = np.arange(n, dtype=float)
    hits = pop.sum(axis=0)
    total = ranks @ pop
    return np.where(hits > 0, total / np.maximum(hits, 1), (n - 1) / 2.0)


def _random_patterns(rng: np.random.Generator, n: int, num_layers: int, k: int) -> np.ndarray:
    return _take(rng, np.ones((n, num_layers), dtype=bool), np.full(n, k), np.ones(num_layers))


def _take(rng: np.random.Generator, allowed: np.ndarray, n: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row, ``n[row]`` of the ``allowed`` layers drawn without replacement with probability proportional to
    ``weights`` (the Gumbel top-k trick: the same law as successive weighted draws), as a 0/1 mask."""
    keys = np.where(allowed, np.log(weights) + rng.gumbel(size=allowed.shape), -np.inf)
    rank = np.argsort(np.argsort(-keys, axis=1, kind="stable"), axis=1, kind="stable")
    return (rank < n[:, None]).astype(np.uint8)


def genetic_search(loss: PatternLoss | LossFn, num_layers: int, counts: Iterable[int], *, population: int = 50,
                   generations: int = 30, seed: int = 0, elite: int = 2, random_share: float = 0.2,
                   mutation: float = 0.5, patience: int = 10) -> dict[int, Candidate]:
    """The best pattern found for each compressed-layer count in ``counts`` (stepped from high to low). A count
    with no more distinct patterns than ``population`` is enumerated. A count stops early after ``patience``
    generations without a better best."""
    if population < 4:
        raise ValueError(f"--population: expected at least 4, got {population}")
    if generations < 1:
        raise ValueError(f"--generations: expected at least 1, got {generations}")
    if not 0.0 <= random_share < 1.0:
        raise ValueError(f"genetic search: random_share must be in [0, 1), got {random_share}")
    rng = np.random.default_rng(seed)
    L = num_layers
    best: dict[int, Candidate] = {}
    carried: np.ndarray | None = None  # the previous (higher) count's final population, best first
    n_random = int(round(population * random_share))
    n_elite = min(elite, population - n_random)
    n_children = population - n_elite - n_random
    for k in _check_counts(L, counts):
        if math.comb(L, k) <= population:
            pop = np.zeros((math.comb(L, k), L), dtype=np.uint8)
            for row, chosen in enumerate(itertools.combinations(range(L), k)):
                pop[row, list(chosen)] = 1
            f = loss(pop)
            order = np.argsort(f, kind="stable")
            carried = pop[order][:population]
            best[k] = _candidate(carried[0], f[order[0]])
            continue
        pop = _start_population(rng, carried, population, L, k, n_random)
        f = loss(pop)
        order = np.argsort(f, kind="stable")
        pop, f = pop[order], f[order]
        stale = 0
        for _ in range(generations):
            new = np.concatenate([pop[:n_elite], _children(rng, pop, n_children, k, mutation),
                                  _random_patterns(rng, n_random, L, k)])
            new = _unique_rows(new)
            fn = loss(new)
            order = np.argsort(fn, kind="stable")
            improved = fn[order[0]] < f[0]
            pop, f = new[order], fn[order]
            stale = 0 if improved else stale + 1
            if stale >= patience:
                break
        best[k] = _candidate(pop[0], f[0])
        carried = pop
    return best


def _children(rng: np.random.Generator, pop: np.ndarray, n: int, k: int, mutation: float) -> np.ndarray:
    """Best-biased parents (the better half, rank-weighted), crossover weighted by the layers' scores, then one
    swap (guided by the scores or uniform, half and half) on a ``mutation`` share of the children."""
    size, L = pop.shape
    ranks = _layer_ranks(pop)
    goodness, badness = size - ranks, ranks + 1.0  # both > 0
    half = max(2, (size + 1) // 2)
    w = np.arange(half, 0, -1, dtype=float)
    a = pop[rng.choice(half, size=n, p=w / w.sum())]
    b = pop[rng.choice(half, size=n, p=w / w.sum())]
    both = a & b
    children = both | _take(rng, (a ^ b).astype(bool), k - both.sum(axis=1), goodness)
    swap = rng.random(n) < mutation
    guided = rng.random(n) < 0.5
    flat = np.ones(L)
    if swap.any():
        m = children[swap]
        g = guided[swap][:, None]
        out = np.where(g, _take(rng, m.astype(bool), np.ones(len(m)), badness),
                       _take(rng, m.astype(bool), np.ones(len(m)), flat))
        into = np.where(g, _take(rng, m == 0, np.ones(len(m)), goodness), _take(rng, m == 0, np.ones(len(m)), flat))
        children[swap] = m - out + into
    return children


def _start_population(rng: np.random.Generator, carried: np.ndarray | None, population: int, L: int, k: int,
                      n_random: int) -> np.ndarray:
    """The previous count's patterns with their extra layers uncompressed (drawn weighted to the worst-scored),
    topped up with random patterns."""
    seeded = np.zeros((0, L), dtype=np.uint8)
    if carried is not None and carried.shape[0]:
        parents = carried[:population - n_random]
        extra = parents.sum(axis=1) - k
        seeded = _unique_rows(parents - _take(rng, parents.astype(bool), extra, _layer_ranks(carried) + 1.0))
    fresh = _random_patterns(rng, population - seeded.shape[0], L, k)
    return _unique_rows(np.concatenate([seeded, fresh]))


def greedy_search(loss: PatternLoss | LossFn, num_layers: int, counts: Iterable[int]) -> dict[int, Candidate]:
    """Compress the k layers whose loss alone is smallest (ties: lower layer first), for each k in ``counts``."""
    counts = _check_counts(num_layers, counts)
    singles = loss(np.eye(num_layers, dtype=np.uint8))
    order = np.argsort(singles, kind="stable")
    patterns = np.zeros((len(counts), num_layers), dtype=np.uint8)
    for row, k in enumerate(counts):
        patterns[row, order[:k]] = 1
    f = loss(patterns)
    return {k: _candidate(patterns[row], f[row]) for row, k in enumerate(counts)}


@dataclass(frozen=True)
class FrontRow:
    """One compressed-layer count: its best pattern, loss, decode tokens/s and speedup over full attention."""

    compressed: int
    layers: tuple[int, ...]
    loss: float
    tokens_per_s: float
    speedup: float

    def as_dict(self) -> dict:
        return {"compressed": self.compressed, "layers": list(self.layers), "loss": self.loss,
                "tokens_per_s": self.tokens_per_s, "speedup": self.speedup}


def front_rows(candidates: dict[int, Candidate], tokens_per_s: Callable, num_layers: int) -> list[FrontRow]:
    """One row per searched count (ascending), throughput from ``tokens_per_s(pattern)``, speedup over the
    all-full pattern."""
    full = tokens_per_s((0,) * num_layers)
    rows = []
    for k in sorted(candidates):
        c = candidates[k]
        tps = tokens_per_s(c.pattern)
        rows.append(FrontRow(k, c.layers, c.loss, tps, tps / full if full else math.nan))
    return rows


def pareto_front(rows: Iterable[FrontRow]) -> list[FrontRow]:
    """The rows no other row beats on both throughput and loss (finite losses only), by compressed count
    ascending: along it throughput rises and loss rises."""
    ranked = sorted((r for r in rows if math.isfinite(r.loss)), key=lambda r: (-r.tokens_per_s, r.loss))
    front, lowest = [], math.inf
    for r in ranked:
        if r.loss < lowest:
            front.append(r)
            lowest = r.loss
    return sorted(front, key=lambda r: (r.tokens_per_s, r.compressed))


def choose(front: list[FrontRow], budget: float) -> FrontRow | None:
    """The fastest front row whose loss is within ``budget``."""
    within = [r for r in front if r.loss <= budget]
    return max(within, key=lambda r: r.tokens_per_s) if within else None


def format_layers(layers: Iterable[int]) -> str:
    """0,3-7,9 style."""
    layers = sorted(layers)
    if not layers:
        return "-"
    parts, start, prev = [], layers[0], layers[0]
    for layer in layers[1:] + [None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if layer is not None:
            start = prev = layer
    return ",".join(parts)
