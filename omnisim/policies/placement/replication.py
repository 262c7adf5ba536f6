"""How many replicas each logical expert gets: DeepSeek EPLB's and OmniPlacement's rules, vectorised over rows."""
from __future__ import annotations

import numpy as np


def replicate_max_load_per_replica(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB ``replicate_experts``: each extra physical slot goes to ``argmax(weight / replicas)``.

    weight: ``[rows, num_log]``. Returns ``phy2log [rows, num_phy]`` (slot i < num_log serves expert i, later slots
    the chosen replicas in order), ``replica_rank [rows, num_phy]`` (0 for the first copy, 1 for the second ...) and
    ``logcnt [rows, num_log]``. Ties go to the lowest expert id, as torch's ``max`` picks the first maximum.
    """
    rows, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"{num_phy} physical slots cannot hold {num_log} logical experts")
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (rows, 1))
    replica_rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    every = np.arange(rows)
    for i in range(num_log, num_phy):
        chosen = np.argmax(weight / logcnt, axis=1)
        phy2log[:, i] = chosen
        replica_rank[:, i] = logcnt[every, chosen]
        logcnt[every, chosen] += 1
    return phy2log, replica_rank, logcnt


def allocate_replicas(load: np.ndarray, budget: np.ndarray, max_copies: int) -> np.ndarray:
    """OmniPlacement's heap allocation: ``budget[row]`` extra copies, each to the expert with the highest
    load / copies that still has fewer than ``max_copies`` copies (ties: lowest expert id). Returns copies
    ``[rows, experts]`` (at least 1 each)."""
    rows, experts = load.shape
    copies = np.ones((rows, experts), dtype=np.int64)
    budget = np.broadcast_to(np.asarray(budget, dtype=np.int64), (rows,))
    every = np.arange(rows)
    for k in range(int(budget.max(initial=0))):
        active = budget > k
        score = np.where(copies < max_copies, load / copies, -np.inf)
        chosen = np.argmax(score, axis=1)
        can = active & np.isfinite(score[every, chosen])
        copies[every[can], chosen[can]] += 1
    return copies
