"""Steady-state decode throughput of one decode instance under an OmniAttn pattern, from the cost model.

Every sequence sits at the same ``context``; the batch is what the instance can hold at once:
``min(max_num_seqs, seats of the compressed pool, full-pool blocks // blocks per sequence)``, and one decode step of
that batch takes ``step_time(0, 0, 0, batch, batch * attention_context)`` (attention context averaged over the
layers: all of it on full layers, at most the sink + recent window on compressed ones). In this cost model every
layer costs the same, so throughput depends on how many layers are compressed (and the window), not on which.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from omnisim.attention.omni_attn import OmniAttn


@dataclass(frozen=True)
class DecodePoint:
    """One steady decode state: batch, step seconds, output tokens per second, and what bounds the batch."""

    batch: int
    step_s: float
    tokens_per_s: float
    bound: str  # "max_num_seqs", "seats" (compressed pool), "kv" (full pool) or "none" (context does not fit)


class DecodeThroughput:
    """``cost``: a StepTimeModel for the decode instance; ``model_layers``: the model's attention layers (a pattern
    may carry one more entry, the MTP layer); ``uncompressed_blocks``: KV blocks per layer without OmniAttn."""

    def __init__(self, cost, *, model_layers: int, block_size: int, max_num_seqs: int, uncompressed_blocks: int,
                 context: int, sink: int = 1, recent: int = 3, beta: float = 0.2) -> None:
        if context < 1:
            raise ValueError(f"--context: expected a positive number of tokens, got {context}")
        self.cost, self.model_layers, self.block_size = cost, model_layers, block_size
        self.max_num_seqs, self.uncompressed_blocks, self.context = max_num_seqs, uncompressed_blocks, context
        self.sink, self.recent, self.beta = sink, recent, beta
        self._cache: dict[tuple[int, int], DecodePoint] = {}

    def spec(self, pattern) -> OmniAttn:
        return OmniAttn(tuple(int(v) for v in pattern), self.sink, self.recent, self.beta)

    def point(self, pattern) -> DecodePoint:
        # Only the compressed counts matter (in the model's layers, and in all entries for the pool split).
        key = (int(sum(pattern[:self.model_layers])), int(sum(pattern)))
        if key not in self._cache:
            self._cache[key] = self._point(self.spec(pattern))
        return self._cache[key]

    def tokens_per_s(self, pattern) -> float:
        return self.point(pattern).tokens_per_s

    def _point(self, attn: OmniAttn) -> DecodePoint:
        blocks, seats = attn.decode_capacity(self.uncompressed_blocks)
        by_kv = blocks // math.ceil(self.context / self.block_size)
        limits = {"max_num_seqs": self.max_num_seqs, "seats": seats, "kv": by_kv}
        bound = min(limits, key=limits.get)
        batch = limits[bound]
        if batch < 1:
            return DecodePoint(0, 0.0, 0.0, "none")
        ctx = attn.attention_context(self.context, self.block_size, self.model_layers)
        step = self.cost.step_time(0, 0.0, 0, batch, batch * ctx)
        return DecodePoint(batch, step, batch / step, bound)
