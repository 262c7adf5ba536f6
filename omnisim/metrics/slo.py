"""Service-level objective a completed request must meet to count towards goodput."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SLO:
    """Latency thresholds, inclusive: a request meets the SLO when TTFT <= ttft_s and TPOT <= tpot_s.

    The defaults are OmniInfer's SLA for DeepSeek-R1 serving: TTFT < 2 s and TPOT < 50 ms.
    """

    ttft_s: float = 2.0
    tpot_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"SLO.{name} must be a positive number of seconds, got {value!r}")
            object.__setattr__(self, name, float(value))
