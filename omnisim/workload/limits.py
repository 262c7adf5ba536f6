"""The scaling and limit arguments every workload takes."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """``rate_scale`` divides arrival times (2.0 = twice the rate); ``max_requests`` caps the count;
    ``duration_s`` keeps arrivals strictly before it, measured after scaling."""

    rate_scale: float = 1.0
    max_requests: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if not (self.rate_scale > 0 and math.isfinite(self.rate_scale)):
            raise ValueError(f"workload.rate_scale must be a positive number, got {self.rate_scale}")
        if self.max_requests is not None and self.max_requests < 0:
            raise ValueError(f"workload.max_requests must be >= 0 or null, got {self.max_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"workload.duration_s must be > 0 or null, got {self.duration_s}")

    @property
    def bounded(self) -> bool:
        return self.max_requests is not None or self.duration_s is not None

    def count_allowed(self, index: int) -> bool:
        return self.max_requests is None or index < self.max_requests

    def time_allowed(self, arrival_s: float) -> bool:
        return self.duration_s is None or arrival_s < self.duration_s
