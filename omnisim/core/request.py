"""A client request as every policy, workload and driver sees it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Request:
    """One generation request.

    ``output_tokens`` is the requested maximum; the simulator generates exactly this many.
    ``prefix_hashes`` name consecutive prompt blocks of ``hash_block_tokens`` tokens each (Mooncake ``hash_ids``
    use 512): equal hashes at the same position mean the same KV content, so a cache holding the first k hashes of a
    request can skip ``k * hash_block_tokens`` prompt tokens.
    """

    id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_hashes: tuple[int, ...] = ()
    hash_block_tokens: int = 0
    priority: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"request {self.id}: prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"request {self.id}: output_tokens must be >= 1, got {self.output_tokens}")
        if not self.arrival_s >= 0.0:
            raise ValueError(f"request {self.id}: arrival_s must be >= 0, got {self.arrival_s}")
        if self.prefix_hashes and self.hash_block_tokens < 1:
            raise ValueError(f"request {self.id}: prefix_hashes given without hash_block_tokens")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens
