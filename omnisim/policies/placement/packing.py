"""Packing weighted items onto ranks: DeepSeek EPLB's balanced packing, OmniPlacement's distinct-rank greedy, the
fill of slots a greedy leaves free, and a local search that lowers the most loaded rank. All vectorised over rows
(layers): one Python iteration per item, never per layer."""
from __future__ import annotations

import numpy as np

from omnisim.core import Topology
from omnisim.policies.placement.layout import expert_ranks, replica_counts


def descending_order(weight: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Per row, item indices by weight descending; ties by ``tiebreak`` ascending, then by index (stable)."""
    if tiebreak is None:
        return np.argsort(-weight, axis=1, kind="stable")
    return np.lexsort((tiebreak, -weight), axis=-1)


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek EPLB ``balanced_packing``: items by weight descending, each into the lightest pack that still has
    room; every pack ends with exactly ``items / num_packs`` items. Returns ``pack_index`` and ``rank_in_pack``
    (``[rows, items]``). Ties: the lowest pack index (Python's ``min``), items of equal weight by index."""
    rows, items = weight.shape
    if items % num_packs:
        raise ValueError(f"{items} items cannot be split evenly into {num_packs} packs")
    per_pack = items // num_packs
    if per_pack == 1:
        index = np.tile(np.arange(items, dtype=np.int64), (rows, 1))
        return index, np.zeros_like(index)
    order = descending_order(weight)
    pack_index = np.full((rows, items), -1, dtype=np.int64)
    rank_in_pack = np.full((rows, items), -1, dtype=np.int64)
    pack_weight = np.zeros((rows, num_packs))
    pack_items = np.zeros((rows, num_packs), dtype=np.int64)
    every = np.arange(rows)
    for j in range(items):
        item = order[:, j]
        pack = np.argmin(np.where(pack_items < per_pack, pack_weight, np.inf), axis=1)
        pack_index[every, item] = pack
        rank_in_pack[every, item] = pack_items[every, pack]
        pack_weight[every, pack] += weight[every, item]
        pack_items[every, pack] += 1
    return pack_index, rank_in_pack


def pack_distinct(expert: np.ndarray, weight: np.ndarray, num_experts: int, num_ranks: int, slots_per_rank: int,
                  capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """OmniPlacement's ``distribute_experts_to_ranks``: replicas by weight descending (ties: lower expert id), each
    onto the least loaded rank (ties: lower rank) that does not hold that expert yet and has fewer than
    ``capacity`` replicas, into its first free slot.

    expert, weight: ``[rows, items]`` the replica list of each row. Returns ``slots [rows, ranks, slots_per_rank]``
    (-1 where free) and ``rank_weight [rows, ranks]``. Where no rank qualifies (a corner case the published code
    gives up on), the replica goes to the least loaded rank with any free slot.
    """
    rows, items = expert.shape
    if capacity * num_ranks < items or capacity > slots_per_rank:
        raise ValueError(f"capacity {capacity} per rank cannot hold {items} replicas on {num_ranks} ranks "
                         f"of {slots_per_rank} slots")
    order = descending_order(weight, expert)
    every = np.arange(rows)
    slots = np.full((rows, num_ranks, slots_per_rank), -1, dtype=np.int64)
    holds = np.zeros((rows, num_experts, num_ranks), dtype=bool)
    count = np.zeros((rows, num_ranks), dtype=np.int64)
    rank_weight = np.zeros((rows, num_ranks))
    for j in range(items):
        e = expert[every, order[:, j]]
        w = weight[every, order[:, j]]
        allowed = ~holds[every, e] & (count < capacity)
        rank = np.argmin(np.where(allowed, rank_weight, np.inf), axis=1)
        stuck = ~allowed[every, rank]
        if stuck.any():
            loose = np.where(count < slots_per_rank, rank_weight, np.inf)
            rank[stuck] = np.argmin(loose[stuck], axis=1)
        slots[every, rank, count[every, rank]] = e
        holds[every, e, rank] = True
        count[every, rank] += 1
        rank_weight[every, rank] += w
    return slots, rank_weight


def fill_free_slots(slots: np.ndarray, load: np.ndarray, max_copies: int) -> np.ndarray:
    """Fill the slots a greedy left free (-1) without moving load where possible.

    A free slot repeats an expert whose every copy sits on that rank (neutral: that rank computes the expert's
    tokens either way); this is how a fixed-slot layout expresses OmniPlacement's empty slots. A rank with no such
    expert gets a real replica: the expert with the highest load per copy that it lacks. Returns ``phy2log``.
    """
    rows, ranks, per_rank = slots.shape
    experts = load.shape[1]
    out = slots.copy()
    free = out < 0
    if not free.any():
        return out.reshape(rows, ranks * per_rank)
    # neutral fill, vectorised: the first slot of the rank whose expert lives only on that rank
    filled = np.where(free, 0, out)
    every = np.arange(rows)[:, None, None]
    copies = np.zeros((rows, experts), dtype=np.int64)
    np.add.at(copies, (every[:, :, 0], filled.reshape(rows, -1)), (~free).reshape(rows, -1).astype(np.int64))
    held = np.zeros((rows, experts, ranks), dtype=np.int64)
    rank_ix = np.broadcast_to(np.arange(ranks)[None, :, None], out.shape)
    np.add.at(held, (np.broadcast_to(every, out.shape), filled, rank_ix), (~free).astype(np.int64))
    neutral = ~free & (held[every, filled, rank_ix] == copies[every[:, :, 0][:, :, None], filled])
    first = np.argmax(neutral, axis=2)
    has_neutral = neutral.any(axis=2)
    pick = np.take_along_axis(out, first[:, :, None], axis=2)
    fill_here = free & has_neutral[:, :, None]
    out = np.where(fill_here, pick, out)
    # the rest (a rank holding only shared experts, or nothing): real replicas, one Python step each (rare)
    for layer, rank in zip(*np.nonzero((out < 0).any(axis=2))):
        row = out[layer]
        copies_l = np.bincount(row[row >= 0], minlength=experts)
        on_rank = np.bincount(row[rank][row[rank] >= 0], minlength=experts)
        flat, rank_of = row.reshape(-1), np.repeat(np.arange(ranks), per_rank)
        placed = flat >= 0
        per_pair = np.bincount(flat[placed] * ranks + rank_of[placed], minlength=experts * ranks)
        stacked = (per_pair.reshape(experts, ranks) > 1).any(axis=1)  # a copy elsewhere would skew its split
        for s in np.nonzero(row[rank] < 0)[0]:
            score = np.where((on_rank == 0) & ~stacked & (copies_l < max_copies),
                             load[layer] / np.maximum(copies_l, 1), -np.inf)
            if not np.isfinite(score).any():
                score = np.where(on_rank == 0, load[layer] / np.maximum(copies_l, 1), -np.inf)
            if not np.isfinite(score).any():
                score = load[layer] / np.maximum(copies_l, 1)
            e = int(np.argmax(score))
            row[rank, s] = e
            copies_l[e] += 1
            on_rank[e] += 1
    return out.reshape(rows, ranks * per_rank)


def refine_peak(phy2log: np.ndarray, load: np.ndarray, topology: Topology, max_rounds: int = 0,
                partners: int = 8) -> np.ndarray:
    """Local search: swap one slot of the most loaded rank with one slot of a light rank when that lowers the peak.

    Replica counts never change, so each slot keeps carrying ``load[expert] / copies``. A swap must not put an
    expert on a rank that already serves it. Partners are the slots of the ``partners`` least loaded ranks. Each
    round applies the best swap in every layer at once; stops when no layer improves or after ``max_rounds``
    rounds (0: 4 x ranks).
    """
    rows, num_slots = phy2log.shape
    num_ranks, per_rank = topology.num_ranks, topology.slots_per_rank
    out = phy2log.copy()
    every = np.arange(rows)
    unit = load / np.maximum(replica_counts(out, load.shape[1]), 1)
    rank_of_slot = np.arange(num_slots) // per_rank
    held = expert_ranks(out, load.shape[1], topology)
    slot_w = np.take_along_axis(unit, out, axis=1)
    rank_w = slot_w.reshape(rows, num_ranks, per_rank).sum(axis=2)
    k_light = max(1, min(partners, num_ranks - 1))
    within = np.arange(per_rank)
    active = every
    for _ in range(max_rounds or 4 * num_ranks):
        n = len(active)
        if num_ranks < 2 or n == 0:
            break
        sub_rank_w = rank_w[active]
        order = np.argsort(sub_rank_w, axis=1, kind="stable")
        top = order[:, -1]
        light = order[:, :k_light]                                                   # [n, k] lightest ranks
        peak = sub_rank_w[np.arange(n), top]
        top_slots = top[:, None] * per_rank + within                                 # [n, per_rank]
        part_slots = (light[:, :, None] * per_rank + within).reshape(n, -1)          # [n, k * per_rank]
        sub_out, sub_w = out[active], slot_w[active]
        a, wa = np.take_along_axis(sub_out, top_slots, 1), np.take_along_axis(sub_w, top_slots, 1)
        b, wb = np.take_along_axis(sub_out, part_slots, 1), np.take_along_axis(sub_w, part_slots, 1)
        part_rank_w = np.repeat(np.take_along_axis(sub_rank_w, light, 1), per_rank, axis=1)
        new_peak = np.maximum(peak[:, None, None] - wa[:, :, None] + wb[:, None, :],
                              part_rank_w[:, None, :] + wa[:, :, None] - wb[:, None, :])
        # a must not already be on the partner's rank, b must not already be on the top rank
        part_rank = np.repeat(light, per_rank, axis=1)
        a_there = np.take_along_axis(held[active[:, None], a], np.broadcast_to(part_rank[:, None, :],
                                     (n, per_rank, part_rank.shape[1])), axis=2) > 0
        b_on_top = np.take_along_axis(held[active, :, top], b, axis=1) > 0
        valid = ~a_there & ~b_on_top[:, None, :] & (wa[:, :, None] > wb[:, None, :])
        new_peak = np.where(valid, new_peak, np.inf).reshape(n, -1)
        best = np.argmin(new_peak, axis=1)
        gain = peak - new_peak[np.arange(n), best]
        improve = gain > 1e-9 * np.maximum(peak, 1.0)
        if not improve.any():
            break
        i, k = np.divmod(best, part_slots.shape[1])
        for j in np.nonzero(improve)[0]:
            row = active[j]
            sa, sb = int(top_slots[j, i[j]]), int(part_slots[j, k[j]])
            ea, eb = out[row, sa], out[row, sb]
            ra, rb = rank_of_slot[sa], rank_of_slot[sb]
            out[row, sa], out[row, sb] = eb, ea
            slot_w[row, sa], slot_w[row, sb] = slot_w[row, sb], slot_w[row, sa]
            held[row, ea, ra] -= 1
            held[row, eb, rb] -= 1
            held[row, ea, rb] += 1
            held[row, eb, ra] += 1
            delta = unit[row, ea] - unit[row, eb]
            rank_w[row, ra] -= delta
            rank_w[row, rb] += delta
        active = active[improve]
    return out
