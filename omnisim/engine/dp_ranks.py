"""DP ranks of one instance as separate engine cores (``cluster.<role>.dp_mode=ranks``), the parts the simulator
(``omnisim.sim.dp_instance``) and the engine emulator (``backends.emulator``) share: the step time of a synchronised
step of every busy rank, vLLM's DP load balancer, and the instance's prefix cache as the union of its ranks'."""
from __future__ import annotations

from omnisim.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored


def least_loaded_rank(ranks):
    """The scheduler with the least 4 * waiting + running (the first of equals), as vLLM's DPLBAsyncMPClient picks
    the engine core for a new request."""
    best, best_score = None, None
    for r in ranks:
        score = 4 * (len(r.waiting) + len(r.remote) + r.transferring + len(r.ready)) + len(r.running) \
            + len(r.prefilling)
        if best_score is None or score < best_score:
            best, best_score = r, score
    return best


def rank_step_times(cost, dp: int, ranks: list[tuple], moe_imbalance: float) -> list[float]:
    """Each busy DP rank's time in a synchronised step of their own batches: the cost model's ``rank_step_times``
    where it has one, else each rank's batch as if every rank had it."""
    exact = getattr(cost, "rank_step_times", None)
    if exact is not None:
        return exact(ranks, moe_imbalance)
    return [cost.step_time(dp * pt, dp * pa, dp * pc, dp * n, dp * ctx, moe_imbalance)
            for pt, pa, pc, n, ctx in ranks]


class CacheUnion:
    """The instance's KV events for the proxy's prefix index: a block is cached on the instance while any of its
    ranks holds it (each rank's prefix cache is its own)."""

    def __init__(self, listener, ranks: int) -> None:
        self.listener = listener
        self.held: list[set[int]] = [set() for _ in range(ranks)]
        self.count: dict[int, int] = {}

    def rank(self, r: int):
        return lambda events: self.apply(r, events)

    def apply(self, r: int, events) -> None:
        held, count = self.held[r], self.count
        out = []
        for event in events:
            if isinstance(event, BlockStored):
                first = []
                for h in event.block_hashes:
                    if h not in held:
                        held.add(h)
                        count[h] = count.get(h, 0) + 1
                        if count[h] == 1:
                            first.append(h)
                if first:
                    out.append(BlockStored(tuple(first), event.parent_block_hash, event.block_size))
                continue
            gone = tuple(held) if isinstance(event, AllBlocksCleared) else event.block_hashes
            last = []
            for h in gone:
                if h in held:
                    held.discard(h)
                    count[h] -= 1
                    if not count[h]:
                        del count[h]
                        last.append(h)
            if last:
                out.append(BlockRemoved(tuple(last)))
        if out:
            self.listener(out)
