"""When one request reached each step of its way through the proxy, and where it went: the x-omnisim-* headers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestTiming:
    """Event-loop times (seconds); the headers give them relative to ``received``."""

    received: float
    prefill_instance: str = ""
    decode_instance: str = ""
    prefill_dispatch: float | None = None
    prefill_end: float | None = None
    decode_dispatch: float | None = None
    prefill_cached_tokens: int | None = None
    predicted_cached_tokens: int | None = None
    output_tokens: int | None = None  # generated tokens of a completed answer (counted while recording a trace)

    def headers(self) -> dict[str, str]:
        h = {"x-omnisim-prefill-instance": self.prefill_instance, "x-omnisim-decode-instance": self.decode_instance}
        for name, t in (("prefill-dispatch", self.prefill_dispatch), ("prefill-end", self.prefill_end),
                        ("decode-dispatch", self.decode_dispatch)):
            if t is not None:
                h[f"x-omnisim-{name}-s"] = f"{t - self.received:.6f}"
        if self.prefill_cached_tokens is not None:
            h["x-omnisim-prefill-cached-tokens"] = str(self.prefill_cached_tokens)
        if self.predicted_cached_tokens is not None:
            h["x-omnisim-predicted-cached-tokens"] = str(self.predicted_cached_tokens)
        return h
