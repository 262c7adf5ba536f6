"""Align a new placement to the current one so that only experts that must move, move.

Ranks are interchangeable for balance: relabelling the new placement's ranks (a permutation) and reordering slots
inside a rank change no rank's load, but they decide how many slots must receive new weights. Greedy matching:
new ranks, most-overlapping first, each take the free current rank sharing most of their experts; inside a rank an
expert that is already in some slot stays in that slot.
"""
from __future__ import annotations

import numpy as np

from omnisim.core import Topology
from omnisim.policies.placement.layout import expert_ranks, permute_ranks


def match_ranks(target: np.ndarray, current: np.ndarray, num_experts: int, topology: Topology) -> np.ndarray:
    """``[layers, ranks]``: the current rank each target rank should become (a permutation per layer)."""
    layers = target.shape[0]
    ranks, per_rank = topology.num_ranks, topology.slots_per_rank
    present = expert_ranks(current, num_experts, topology) > 0                    # [layers, experts, ranks]
    tgt = target.reshape(layers, ranks, per_rank)
    shared = present[np.arange(layers)[:, None, None], tgt]                       # [layers, target r, slot, current r]
    overlap = shared[:, :, 0].astype(np.int16) if per_rank == 1 else shared.sum(axis=2, dtype=np.int16)
    order = np.argsort(-overlap.max(axis=2), axis=1, kind="stable")
    taken = np.zeros((layers, ranks), dtype=bool)
    to_current = np.empty((layers, ranks), dtype=np.int64)
    every = np.arange(layers)
    for k in range(ranks):
        t = order[:, k]
        score = np.where(taken, np.int16(-1), overlap[every, t])
        c = np.argmax(score, axis=1)
        to_current[every, t] = c
        taken[every, c] = True
    return to_current


def keep_slots(target: np.ndarray, current: np.ndarray, topology: Topology) -> np.ndarray:
    """Reorder each rank's target experts so that those already in a slot of that rank stay in that slot."""
    layers = target.shape[0]
    shape = (layers, topology.num_ranks, topology.slots_per_rank)
    tgt, cur = target.reshape(shape), current.reshape(shape)
    result = np.full(shape, -1, dtype=np.int64)
    used = np.zeros(shape, dtype=bool)
    for j in range(topology.slots_per_rank):
        same = (tgt == cur[:, :, j:j + 1]) & ~used
        hit = same.any(axis=2)
        first = np.argmax(same, axis=2)
        result[:, :, j] = np.where(hit, cur[:, :, j], -1)
        np.put_along_axis(used, first[:, :, None], np.take_along_axis(used, first[:, :, None], 2) | hit[:, :, None],
                          axis=2)
    # the remaining target experts fill the remaining slots, both in slot order
    values = np.take_along_axis(tgt, np.argsort(used, axis=2, kind="stable"), axis=2)
    free_first = np.argsort(result >= 0, axis=2, kind="stable")
    left = (~used).sum(axis=2)
    fill = np.arange(topology.slots_per_rank)[None, None, :] < left[:, :, None]
    placed = np.where(fill, values, np.take_along_axis(result, free_first, axis=2))
    np.put_along_axis(result, free_first, placed, axis=2)
    return result.reshape(layers, -1)


def align_to_current(target: np.ndarray, current: np.ndarray, num_experts: int, topology: Topology) -> np.ndarray:
    """The target placement relabelled and reordered to keep as many current slots as possible; rank loads are
    those of ``target`` up to a permutation of ranks."""
    moved = permute_ranks(target, match_ranks(target, current, num_experts, topology), topology)
    return keep_slots(moved, current, topology)


def moves_per_rank(new: np.ndarray, old: np.ndarray, topology: Topology) -> np.ndarray:
    """``[layers, ranks]`` slots whose expert changes (each one expert's weights to receive)."""
    changed = new != old
    return changed.reshape(changed.shape[0], topology.num_ranks, topology.slots_per_rank).sum(axis=2)
