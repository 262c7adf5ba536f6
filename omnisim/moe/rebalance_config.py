"""When and how the runtime rebalances expert placement, and what moving weights costs."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RebalanceConfig:
    """Settings of the rebalance loop (conf/rebalance/).

    period_s / period_steps: ask the policy every so many seconds / engine steps (0: never; one of them at most).
    window_s / window_steps: the load the policy sees: tokens routed in the last window (window_s 0 with a
        period_s: the period; window_steps counts engine steps and wins when > 0).
    moves_per_rank_per_step: at most this many expert slots per rank receive new weights per engine step
        (0: no step limit, only the link).
    asynchronous: True: double buffer, the old expert serves the slot until the new weights land (no stall);
        False: serving stops while the step's moves transfer (stall seconds returned by ``step``).
    link_GBps: bandwidth into each rank for expert weights (GB/s); each move ships one expert's weights.
    num_redundant_experts: physical slots beyond the logical experts (the topology has experts + this).
    warm_start: start from the policy's placement for the load model's profile at t=0 (an offline pattern, as
        deployments do); False: from the static contiguous layout.
    observe_noise: the policy sees sampled token counts (what a counter records) rather than expectations.
    """

    period_s: float = 0.0
    period_steps: int = 0
    window_s: float = 0.0
    window_steps: int = 0
    moves_per_rank_per_step: int = 1
    asynchronous: bool = True
    link_GBps: float = 50.0
    num_redundant_experts: int = 32
    warm_start: bool = True
    observe_noise: bool = True

    def __post_init__(self) -> None:
        for name in ("period_s", "window_s", "link_GBps", "period_steps", "window_steps", "moves_per_rank_per_step",
                     "num_redundant_experts"):
            if getattr(self, name) < 0:
                raise ValueError(f"rebalance.{name} must be >= 0, got {getattr(self, name)}")
        if self.period_s and self.period_steps:
            raise ValueError("rebalance: give period_s or period_steps, not both")
        if self.link_GBps == 0 and self.enabled:
            raise ValueError("rebalance.link_GBps must be > 0 when rebalancing is on")
        if self.period_steps and not self.window_steps and not self.window_s:
            raise ValueError("rebalance: period_steps needs window_steps or window_s")

    @property
    def enabled(self) -> bool:
        return bool(self.period_s or self.period_steps)

    @property
    def window_seconds(self) -> float:
        return self.window_s or self.period_s
