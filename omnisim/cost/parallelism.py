"""How one engine instance spreads a model over its devices."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Parallelism:
    """tp: tensor parallel degree; dp: attention data parallel degree (each DP rank holds its own sequences and a
    replica of the non-expert weights); ep: expert parallel degree of the MoE layers (1 = experts tensor-sharded over
    tp and replicated over dp; > 1 = the routed experts are spread over all tp * dp devices, ep groups of them).
    An instance uses tp * dp devices, as in omnisim.cluster.InstanceGroup."""

    tp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for field in ("tp", "dp", "ep"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel: {field} must be an integer >= 1, got {value!r}")
        if (self.tp * self.dp) % self.ep:
            raise ValueError(f"parallel: ep={self.ep} must divide the instance's devices tp*dp={self.devices}")

    @property
    def devices(self) -> int:
        return self.tp * self.dp
