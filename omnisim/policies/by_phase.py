"""One policy for the prefill phase, another for the decode phase (e.g. kv_aware prefill, least_load decode)."""
from __future__ import annotations

from typing import Sequence

from omnisim.core import Assignment, ClusterView, Phase, ProxyPolicy, Waiting


class ByPhase:
    def __init__(self, prefill: ProxyPolicy, decode: ProxyPolicy) -> None:
        for name, policy in (("prefill", prefill), ("decode", decode)):
            if not callable(getattr(policy, "schedule", None)):
                raise ValueError(f"by_phase: {name} must be a proxy policy (with schedule()), got {policy!r}")
        self.prefill = prefill
        self.decode = decode

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> Sequence[Assignment]:
        return (self.prefill if phase is Phase.PREFILL else self.decode).schedule(phase, queue, view)
