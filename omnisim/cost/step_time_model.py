"""The one interface the simulator (and the engine emulator) asks for engine step times."""
from __future__ import annotations

from typing import Protocol


class StepTimeModel(Protocol):
    """Seconds one engine step of a whole instance takes.

    prefill_tokens: new prompt tokens computed in the step, over all chunks.
    prefill_attention: sum over chunks of ``new * (cached_before + (new + 1) / 2)``: query-key pairs (causal).
    prefill_context: sum over chunks of ``cached_before + new``: KV tokens the chunks' attention reads.
    decode_seqs, decode_context: decode sequences in the step (one token each) and the sum of their context lengths.
    moe_imbalance: max over mean tokens per EP rank in the MoE layers (1.0 = perfectly balanced).
    """

    def step_time(self, prefill_tokens: int, prefill_attention: float, prefill_context: int,
                  decode_seqs: int, decode_context: int, moe_imbalance: float = 1.0) -> float: ...
