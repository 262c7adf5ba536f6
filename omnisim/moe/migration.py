"""One rebalance's expert moves in flight: which slots receive new weights when, and when they start serving."""
from __future__ import annotations

import math

import numpy as np

from omnisim.core import Topology
from omnisim.policies.placement.layout import replica_counts


class Migration:
    """The slots where ``target`` differs from ``served``, queued per receiving rank (layer order, then slot).

    Each rank receives its moves one after another, ``transfer_s`` each, and at most ``moves_per_rank_per_step``
    per engine step (0: no step limit). Asynchronous (double buffer): the p-th move of a rank (p = 0, 1, ...) has
    landed once ``(p + 1) * transfer_s`` seconds and ``ceil((p + 1) / N)`` engine steps have passed since the
    decision; until then the slot keeps serving its old expert. Synchronous: serving stops while the next N moves
    per rank per step (all, when N is 0) transfer; they serve from the first step after the stall. Either way a
    landed move is applied only if its layer still serves every expert afterwards (when an expert's last copy is
    being replaced, the replacement waits in its buffer until a new copy of that expert has landed elsewhere).
    """

    def __init__(self, served: np.ndarray, target: np.ndarray, topology: Topology, decided_s: float,
                 transfer_s: float, moves_per_rank_per_step: int, asynchronous: bool) -> None:
        layer, slot = np.nonzero(target != served)
        rank = slot // topology.slots_per_rank
        order = np.lexsort((slot, layer, rank))
        self.layer, self.slot, self.rank = layer[order], slot[order], rank[order]
        self.old = served[self.layer, self.slot]
        self.new = target[self.layer, self.slot]
        starts = np.searchsorted(self.rank, np.arange(topology.num_ranks))
        self.position = np.arange(len(self.rank)) - starts[self.rank]
        self.per_rank = np.bincount(self.rank, minlength=topology.num_ranks)
        self.decided_s = decided_s
        self.transfer_s = transfer_s
        self.limit = moves_per_rank_per_step
        self.asynchronous = asynchronous
        self.num_experts = int(max(served.max(), target.max())) + 1
        self.steps = 0                    # engine steps run since the decision
        self.landed = 0                   # moves at positions < landed have arrived
        self.applied_s = np.full(len(self.layer), np.nan)
        self.applied_steps = np.full(len(self.layer), -1, dtype=np.int64)
        self.deferred = np.empty(0, dtype=np.int64)

    @property
    def num_moves(self) -> int:
        return len(self.layer)

    @property
    def queue(self) -> int:
        """Moves of the busiest rank."""
        return int(self.per_rank.max(initial=0))

    @property
    def done(self) -> bool:
        return self.landed >= self.queue and not len(self.deferred)

    def duration_s(self, step_s: float = 0.0) -> float:
        """Seconds until every move has landed, if engine steps take ``step_s``."""
        per_step = math.ceil(self.queue / self.limit) * step_s if self.limit else 0.0
        return max(self.queue * self.transfer_s, per_step)

    def transfer_done_s(self) -> np.ndarray:
        """When each move's weights finish arriving (asynchronous: counted from the decision)."""
        return self.decided_s + (self.position + 1) * self.transfer_s

    def advance(self, now_s: float, served: np.ndarray, steps: int = 1) -> tuple[bool, float]:
        """Land what has arrived by ``now_s``, before the next ``steps`` engine steps run, and apply it to
        ``served`` in place (synchronous: the moves of those steps, after stalling for them). Returns (served
        changed, stall seconds). Call ``ran(steps)`` after those steps."""
        stall = 0.0
        if self.asynchronous:
            by_time = math.floor((now_s - self.decided_s) / self.transfer_s + 1e-9) if self.transfer_s else self.queue
            by_steps = self.limit * self.steps if self.limit else self.queue
            upto = min(by_time, by_steps, self.queue)
        else:
            upto = min(self.landed + (self.limit * steps if self.limit else self.queue), self.queue)
            stall = (upto - self.landed) * self.transfer_s if upto > self.landed else 0.0
        if upto <= self.landed and not len(self.deferred):
            return False, stall
        arrived = np.nonzero((self.position >= self.landed) & (self.position < upto))[0]
        self.landed = max(self.landed, upto)
        changed = self._apply(np.concatenate([self.deferred, arrived]), now_s + stall, served)
        return changed, stall

    def ran(self, steps: int) -> None:
        self.steps += steps

    def _apply(self, moves: np.ndarray, now_s: float, served: np.ndarray) -> bool:
        if not len(moves):
            return False
        layers, row = np.unique(self.layer[moves], return_inverse=True)
        keep = np.ones(len(moves), dtype=bool)
        while True:
            trial = served[layers].copy()
            trial[row[keep], self.slot[moves[keep]]] = self.new[moves[keep]]
            missing = replica_counts(trial, self.num_experts) == 0
            if not missing.any():
                break
            revert = keep & missing[row, self.old[moves]]
            if not revert.any():
                raise RuntimeError("migration: the served placement lost an expert it never held")
            keep &= ~revert
        served[layers] = trial
        done = moves[keep]
        self.applied_s[done] = now_s
        self.applied_steps[done] = self.steps
        self.deferred = moves[~keep]
        return bool(len(done))
