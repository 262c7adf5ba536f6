"""The MoE side of one engine instance in the simulator: routed load, live placement, rebalancing, weight moves.

The simulator calls ``step(now_s, tokens, steps)`` once per engine step (or once per run of identical decode steps)
and multiplies the step's MoE time by the factor it returns; it adds the stall seconds to the step.

Cost: the factor is the expected ``sum over layers of max rank load / sum over layers of mean rank load`` for a
batch of ``tokens`` tokens, estimated by sampling routed counts (``expert_load_model.route_counts``; about 100
layer draws in all, e.g. 2 samples of 58 layers) and cached per (load-model time key, token bucket); the samples
survive placement changes, only the max over ranks is recomputed. Token counts are bucketed
geometrically (4 buckets per doubling, within 9%). Sampling every step instead (``sampling="sampled"``, single
steps only) costs about a millisecond per call for 58 x 256 experts, which would dominate a simulation of 10^5
steps; the expectation also keeps runs smooth. Cached calls cost a few microseconds; each new load key costs one
sampling per token bucket in use (about 2 ms at 58 x 256), so a drifting load's ``blend_steps`` trades resolution
for speed, and a served placement change (a landed move) costs one max over ranks (about 0.4 ms).
"""
from __future__ import annotations

import copy
import math
from typing import Hashable

import numpy as np
import pandas as pd

from omnisim.core import ExpertLoad, Placement, PlacementPolicy, Topology
from omnisim.moe.expert_load_model import ExpertLoadModel, inclusion, route_counts
from omnisim.moe.migration import Migration
from omnisim.moe.rebalance_config import RebalanceConfig
from omnisim.policies.placement.layout import contiguous_layout, max_over_mean, replica_counts, step_imbalance

SAMPLING = ("expected", "sampled")
BUCKETS_PER_DOUBLING = 4
PROFILE_TOKENS = 1e6  # tokens behind a warm start's profile (an expectation, so only the shape matters)


class MoeRuntime:
    """Expert load, placement and rebalancing of one EP group (an engine instance's MoE layers).

    num_layers, num_experts, top_k: the model's MoE layers, routed experts and experts per token.
    topology: the EP layout (ranks x slots per rank; see ``for_ep``).
    load_model: an ``ExpertLoadModel`` (conf/expert_load/); policy: a ``PlacementPolicy`` (conf/placement/);
    rebalance: a ``RebalanceConfig`` (conf/rebalance/); expert_bytes: weight bytes of one expert in one layer
    (3 * hidden * expert_intermediate * dtype bytes). record_every_s: how often (simulated seconds) the per-layer
    balancedness is recorded.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, topology: Topology,
                 load_model: ExpertLoadModel, policy: PlacementPolicy, rebalance: RebalanceConfig,
                 expert_bytes: float, seed: int = 0, sampling: str = "expected", record_every_s: float = 1.0) -> None:
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"moe: need num_layers >= 1, num_experts >= 1 and 1 <= top_k <= num_experts, got "
                             f"{num_layers}, {num_experts}, {top_k}")
        if topology.num_slots < num_experts:
            raise ValueError(f"moe: {topology.num_slots} slots cannot hold {num_experts} experts")
        if expert_bytes <= 0:
            raise ValueError(f"moe: expert_bytes must be > 0, got {expert_bytes}")
        if sampling not in SAMPLING:
            raise ValueError(f"moe: sampling must be one of {SAMPLING}, got {sampling!r}")
        if record_every_s <= 0:
            raise ValueError(f"moe: record_every_s must be > 0, got {record_every_s}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.topology = topology
        # a policy may keep state (the predictive one does): every EP group gets its own copy
        self.load_model, self.policy, self.rebalance = load_model, copy.deepcopy(policy), rebalance
        self.expert_bytes = float(expert_bytes)
        self.sampling = sampling
        self.record_every_s = record_every_s
        self.transfer_s = self.expert_bytes / (rebalance.link_GBps * 1e9) if rebalance.link_GBps else 0.0
        self._rng = np.random.default_rng(seed)
        self._picks: dict[Hashable, np.ndarray] = {}
        self._samples: dict[tuple[Hashable, int], np.ndarray] = {}
        self._version = 0
        self._recorded: tuple | None = None
        self._factors: dict[tuple[Hashable, int], float] = {}
        self._bucket_of = [0] + [self._bucket(t) for t in range(1, 4096)]
        self._window: list[list] = []
        window_s = rebalance.window_seconds
        self._bin_s = window_s / 64 if window_s else 0.05
        self._migration: Migration | None = None
        self._moves: list[pd.DataFrame] = []
        self._rebalances: list[dict] = []
        self._balance: list[np.ndarray] = []
        self._steps = 0
        self._weighted_factor = 0.0
        self._stall_s = 0.0
        self._next_rebalance_s = rebalance.period_s if rebalance.period_s else math.inf
        self._next_rebalance_step = rebalance.period_steps if rebalance.period_steps else math.inf
        self._next_record_s = 0.0
        self._next_event_s = 0.0
        self._served = self._initial_placement()
        self._served_changed()

    @classmethod
    def for_ep(cls, num_layers: int, num_experts: int, top_k: int, ep_size: int, load_model: ExpertLoadModel,
               policy: PlacementPolicy, rebalance: RebalanceConfig, expert_bytes: float, seed: int = 0,
               num_nodes: int = 1, num_groups: int = 1, **options) -> "MoeRuntime":
        """EP over ``ep_size`` ranks with ``num_experts + rebalance.num_redundant_experts`` slots in all."""
        slots = num_experts + rebalance.num_redundant_experts
        if slots % ep_size:
            raise ValueError(f"moe: {num_experts} experts + {rebalance.num_redundant_experts} redundant = {slots} "
                             f"slots do not divide over ep={ep_size} ranks")
        topology = Topology(ep_size, slots // ep_size, num_nodes, num_groups)
        return cls(num_layers, num_experts, top_k, topology, load_model, policy, rebalance, expert_bytes, seed,
                   **options)

    # ---- the simulator's calls -------------------------------------------------------------------------------

    def step(self, now_s: float, tokens: int, steps: int = 1) -> tuple[float, float]:
        """(MoE imbalance factor for these ``steps`` steps of ``tokens`` tokens, stall seconds to add)."""
        if now_s >= self._next_event_s or self._steps >= self._next_rebalance_step:
            self._events(now_s)
        stall = 0.0
        if self._migration is not None:
            changed, stall = self._migration.advance(now_s, self._served, steps)
            if changed:
                self._served_changed()
            self._migration.ran(steps)
            if self._migration.done:
                self._finish_migration(now_s)
        if tokens > 0:
            key = self.load_model.time_key(now_s)
            if self.sampling == "sampled" and steps == 1:
                factor = self._sampled_factor(key, now_s, tokens)
            else:
                bucket = self._bucket_of[tokens] if tokens < 4096 else self._bucket(tokens)
                factor = self._factors.get((key, bucket))
                if factor is None:
                    factor = self._factors[(key, bucket)] = self._expected_factor(key, now_s, bucket)
            if self.rebalance.enabled:
                self._account(now_s, key, tokens * steps, steps)
        else:
            factor = 1.0
        self._steps += steps
        self._weighted_factor += factor * steps
        self._stall_s += stall
        return factor, stall

    def tables(self) -> dict[str, pd.DataFrame]:
        """``moe_balancedness`` (per layer over time; layer -1 is the step aggregate), ``moe_moves`` (every slot
        move) and ``moe_rebalances`` (every policy call) as DataFrames."""
        balance = (np.concatenate(self._balance) if self._balance else np.empty((0, 3)))
        balancedness = pd.DataFrame({"time_s": balance[:, 0], "layer": balance[:, 1].astype(np.int64),
                                     "max_over_mean": balance[:, 2]})
        balancedness["balancedness"] = 1.0 / balancedness["max_over_mean"]
        moves = self._moves + ([self._move_rows(self._migration)] if self._migration is not None else [])
        moves_df = pd.concat(moves, ignore_index=True) if moves else self._move_rows(None)
        return {"moe_balancedness": balancedness, "moe_moves": moves_df,
                "moe_rebalances": pd.DataFrame(self._rebalances, columns=[
                    "time_s", "status", "moves", "bytes", "max_moves_per_rank", "transfer_s", "window_tokens",
                    "ratio_before", "ratio_after"])}

    def summary(self) -> dict[str, float]:
        """Totals for a run summary."""
        moves = sum(len(m) for m in self._moves) + (self._migration.num_moves if self._migration else 0)
        return {"moe_imbalance_mean": self._weighted_factor / self._steps if self._steps else 1.0,
                "moe_stall_s": self._stall_s, "moe_moves": float(moves),
                "moe_rebalances": float(sum(r["status"] == "applied" for r in self._rebalances))}

    @property
    def placement(self) -> Placement:
        """The placement serving now (only slots whose weights have arrived)."""
        return Placement(self._served)

    @property
    def migrating(self) -> bool:
        return self._migration is not None

    # ---- placement -----------------------------------------------------------------------------------------

    def _initial_placement(self) -> np.ndarray:
        static = contiguous_layout(self.num_layers, self.num_experts, self.topology)
        if not self.rebalance.warm_start:
            return static
        profile = self._picks_for(self.load_model.time_key(0.0), 0.0) * PROFILE_TOKENS
        placed = self.policy.rebalance(ExpertLoad(profile), Placement(static), self.topology)
        placed.validate(self.num_experts, self.topology)
        return np.array(placed.phy2log)

    def _served_changed(self) -> None:
        reps = replica_counts(self._served, self.num_experts)
        self._slot_div = np.take_along_axis(reps, self._served, axis=1).astype(np.float32)
        self._factors.clear()
        self._version += 1

    def _events(self, now_s: float) -> None:
        if now_s >= self._next_record_s:
            self._record(now_s)
            self._next_record_s = (math.floor(now_s / self.record_every_s) + 1) * self.record_every_s
        if now_s >= self._next_rebalance_s or self._steps >= self._next_rebalance_step:
            self._rebalance_now(now_s)
            if self.rebalance.period_s:
                while self._next_rebalance_s <= now_s:
                    self._next_rebalance_s += self.rebalance.period_s
            else:
                self._next_rebalance_step = self._steps + self.rebalance.period_steps
        self._next_event_s = min(self._next_record_s, self._next_rebalance_s)

    def _rebalance_now(self, now_s: float) -> None:
        row = {"time_s": now_s, "status": "", "moves": 0, "bytes": 0.0, "max_moves_per_rank": 0,
               "transfer_s": 0.0, "window_tokens": 0.0, "ratio_before": np.nan, "ratio_after": np.nan}
        if self._migration is not None:
            self._rebalances.append({**row, "status": "busy"})  # the previous moves have not all landed
            return
        counts, tokens = self._window_counts(now_s)
        row["window_tokens"] = tokens
        if counts is None:
            self._rebalances.append({**row, "status": "no_load"})
            return
        new = self.policy.rebalance(ExpertLoad(counts), Placement(self._served), self.topology)
        new.validate(self.num_experts, self.topology)
        ranks = self.topology.num_ranks
        row["ratio_before"] = step_imbalance(self._served, counts, ranks)
        row["ratio_after"] = step_imbalance(new.phy2log, counts, ranks)
        migration = Migration(self._served, np.asarray(new.phy2log), self.topology, now_s, self.transfer_s,
                              self.rebalance.moves_per_rank_per_step, self.rebalance.asynchronous)
        if not migration.num_moves:
            self._rebalances.append({**row, "status": "no_change"})
            return
        self._migration = migration
        self._rebalances.append({**row, "status": "applied", "moves": migration.num_moves,
                                 "bytes": migration.num_moves * self.expert_bytes,
                                 "max_moves_per_rank": migration.queue, "transfer_s": migration.duration_s()})

    def _finish_migration(self, now_s: float) -> None:
        self._moves.append(self._move_rows(self._migration))
        self._migration = None
        self._record(now_s)

    def _move_rows(self, m: Migration | None) -> pd.DataFrame:
        if m is None:
            empty_i, empty_f = np.empty(0, dtype=np.int64), np.empty(0)
            return pd.DataFrame({"decided_s": empty_f, "transfer_done_s": empty_f, "applied_s": empty_f,
                                 "steps_since_decision": empty_i, "layer": empty_i, "slot": empty_i,
                                 "rank": empty_i, "queue_position": empty_i, "old_expert": empty_i,
                                 "new_expert": empty_i, "bytes": empty_f})
        return pd.DataFrame({
            "decided_s": np.full(m.num_moves, m.decided_s), "transfer_done_s": m.transfer_done_s(),
            "applied_s": m.applied_s.copy(), "steps_since_decision": m.applied_steps.copy(), "layer": m.layer,
            "slot": m.slot, "rank": m.rank, "queue_position": m.position, "old_expert": m.old,
            "new_expert": m.new, "bytes": np.full(m.num_moves, self.expert_bytes)})

    # ---- load ------------------------------------------------------------------------------------------------

    def _picks_for(self, key: Hashable, now_s: float) -> np.ndarray:
        picks = self._picks.get(key)
        if picks is None:
            shares = np.asarray(self.load_model.shares(now_s, self.num_layers, self.num_experts), dtype=np.float64)
            if shares.shape != (self.num_layers, self.num_experts):
                raise ValueError(f"load model gave shares of shape {shares.shape}, expected "
                                 f"{(self.num_layers, self.num_experts)}")
            if len(self._picks) >= 32:
                self._picks.pop(next(iter(self._picks)))
            picks = self._picks[key] = inclusion(shares, self.top_k)
        return picks

    @staticmethod
    def _bucket(tokens: int) -> int:
        return int(round(BUCKETS_PER_DOUBLING * math.log2(tokens)))

    def _rank_peaks(self, counts: np.ndarray) -> np.ndarray:
        """Sum over layers of the max rank load, for ``counts [..., layers, experts]``."""
        index = np.broadcast_to(self._served, counts.shape[:-1] + self._served.shape[-1:])
        per_slot = np.take_along_axis(counts, index, axis=-1)
        per_slot /= self._slot_div
        ranks = per_slot.reshape(counts.shape[:-1] + (self.topology.num_ranks, self.topology.slots_per_rank))
        return ranks.sum(axis=-1).max(axis=-1).sum(axis=-1)

    def _mean_load(self, tokens: float) -> float:
        """Sum over layers of the mean rank load: every token makes top_k picks per layer."""
        return self.num_layers * tokens * self.top_k / self.topology.num_ranks

    def _expected_factor(self, key: Hashable, now_s: float, bucket: int) -> float:
        # routed-count samples depend on the load only, so they survive placement changes (the costly part)
        tokens = max(1, int(round(2 ** (bucket / BUCKETS_PER_DOUBLING))))
        counts = self._samples.get((key, bucket))
        if counts is None:
            # the factor sums over layers, which already averages out most sampling noise: ~100 layer draws
            samples = max(1, min(8, round(96 / self.num_layers)))
            counts = route_counts(self._rng, self._picks_for(key, now_s), tokens, samples).astype(np.float32)
            if len(self._samples) >= 48:
                self._samples.pop(next(iter(self._samples)))
            self._samples[(key, bucket)] = counts
        return float(self._rank_peaks(counts).mean() / self._mean_load(tokens))

    def _sampled_factor(self, key: Hashable, now_s: float, tokens: int) -> float:
        counts = route_counts(self._rng, self._picks_for(key, now_s), tokens).astype(np.float32)
        return float(self._rank_peaks(counts) / self._mean_load(tokens))

    def _account(self, now_s: float, key: Hashable, tokens: int, steps: int) -> None:
        """Remember the routed tokens for the rebalance window (merged per time bin and load key)."""
        b = int(now_s // self._bin_s)
        window = self._window
        if window and window[-1][0] == b and window[-1][1] == key:
            window[-1][3] += tokens
            window[-1][4] += steps
        else:
            window.append([b, key, now_s, tokens, steps])
            if len(window) > 8192:
                self._trim(now_s)

    def _trim(self, now_s: float) -> None:
        window, cfg = self._window, self.rebalance
        if cfg.window_steps:
            kept, steps = len(window), 0
            while kept > 0 and steps < cfg.window_steps:
                kept -= 1
                steps += window[kept][4]
            del window[:kept]
        else:
            oldest = now_s - cfg.window_seconds
            while window and (window[0][0] + 1) * self._bin_s <= oldest:
                window.pop(0)

    def _window_counts(self, now_s: float) -> tuple[np.ndarray | None, float]:
        """Tokens per expert routed during the window, as a counter would have recorded them."""
        self._trim(now_s)
        parts: dict[Hashable, list] = {}
        cfg, need = self.rebalance, self.rebalance.window_steps
        for b, key, t, tokens, steps in reversed(self._window):
            if need:
                share = min(1.0, need / steps) if steps else 1.0
                need -= min(steps, need)
            else:
                share = 1.0 if t >= now_s - cfg.window_seconds else 0.0
            if share > 0:
                entry = parts.setdefault(key, [t, 0.0])
                entry[1] += tokens * share
            if cfg.window_steps and need <= 0:
                break
        total = sum(v[1] for v in parts.values())
        if total <= 0:
            return None, 0.0
        expected = sum(tokens * self._picks_for(key, t) for key, (t, tokens) in parts.items())
        if not cfg.observe_noise:
            return expected, total
        return self._rng.binomial(int(round(total)), np.clip(expected / total, 0.0, 1.0)).astype(np.float64), total

    def _record(self, now_s: float) -> None:
        """Per-layer max/mean rank load of the served placement under the expected load (large batches)."""
        key = self.load_model.time_key(now_s)
        if self._recorded is None or self._recorded[:2] != (self._version, key):
            picks = self._picks_for(key, now_s)
            ratios = np.concatenate([[step_imbalance(self._served, picks, self.topology.num_ranks)],
                                     max_over_mean(self._served, picks, self.topology.num_ranks)])
            self._recorded = (self._version, key, ratios)
        rows = np.column_stack([np.full(self.num_layers + 1, now_s), np.arange(-1, self.num_layers),
                                self._recorded[2]])
        self._balance.append(rows)
