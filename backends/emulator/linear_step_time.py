"""A StepTimeModel with a handful of linear coefficients, for emulated engines in tests and benchmarks (and for
fitting to a measured engine). omnisim.cost's roofline model plugs in the same way."""
from __future__ import annotations


class LinearStepTime:
    """step = overhead_s + prefill_token_s * prefill_tokens + attention_pair_s * prefill_attention
    + decode_seq_s * decode_seqs + context_token_s * (prefill_context + decode_context), and 0 for an empty step."""

    def __init__(self, overhead_s: float = 0.005, prefill_token_s: float = 5e-5, attention_pair_s: float = 0.0,
                 decode_seq_s: float = 2e-4, context_token_s: float = 1e-7) -> None:
        for name, v in (("overhead_s", overhead_s), ("prefill_token_s", prefill_token_s),
                        ("attention_pair_s", attention_pair_s), ("decode_seq_s", decode_seq_s),
                        ("context_token_s", context_token_s)):
            if v < 0:
                raise ValueError(f"{name}: must be >= 0, got {v}")
        self.overhead_s = overhead_s
        self.prefill_token_s = prefill_token_s
        self.attention_pair_s = attention_pair_s
        self.decode_seq_s = decode_seq_s
        self.context_token_s = context_token_s

    def step_time(self, prefill_tokens: int, prefill_attention: float, prefill_context: int,
                  decode_seqs: int, decode_context: int, moe_imbalance: float = 1.0) -> float:
        if prefill_tokens == 0 and decode_seqs == 0:
            return 0.0
        return (self.overhead_s + self.prefill_token_s * prefill_tokens + self.attention_pair_s * prefill_attention
                + self.decode_seq_s * decode_seqs + self.context_token_s * (prefill_context + decode_context))
