"""Skip disaggregation for short prompts, around any policy: llm-d's PD decider (``pd-profile-handler``: a request
whose non-cached prompt is below ``threshold`` tokens is served by the decode pod alone).

In the prefill phase the queue is split: a request is short when its prompt not cached on the decode instances is
below ``threshold_tokens`` on every healthy decode instance (so it is short wherever the inner policy puts it).
Short requests are offered to the inner policy as DECODE-phase work (it picks the decode instance, its own decode
rule and limits apply); a PREFILL-phase assignment to a decode instance means "prefill and decode there, no KV
transfer". The others are offered to the inner policy's prefill phase. The decode phase and colocated clusters (no
decode-role instance) go to the inner policy unchanged. ``threshold_tokens`` 0 never skips.
"""
from __future__ import annotations

from typing import Sequence

from omnisim.core import Assignment, ClusterView, Phase, ProxyPolicy, Role, Waiting


class PDDecider:
    def __init__(self, inner: ProxyPolicy, threshold_tokens: int = 512) -> None:
        if not callable(getattr(inner, "schedule", None)):
            raise ValueError(f"pd_decider: inner must be a proxy policy (with schedule()), got {inner!r}")
        if threshold_tokens < 0:
            raise ValueError(f"pd_decider: threshold_tokens must be >= 0, got {threshold_tokens}")
        self.inner = inner
        self.threshold_tokens = threshold_tokens

    def is_short(self, waiting: Waiting, view: ClusterView, decode_ids: Sequence[str]) -> bool:
        r = waiting.request
        return all(r.prompt_tokens - view.cached_tokens(r, i) < self.threshold_tokens for i in decode_ids)

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: ClusterView) -> list[Assignment]:
        decode_ids = [s.id for s in view.candidates(Phase.DECODE) if s.role is Role.DECODE]
        if phase is Phase.DECODE or not decode_ids or self.threshold_tokens == 0:
            return list(self.inner.schedule(phase, queue, view))
        short, long = [], []
        for w in queue:
            (short if self.is_short(w, view, decode_ids) else long).append(w)
        out = list(self.inner.schedule(Phase.PREFILL, long, view)) if long else []
        if short:
            out += self.inner.schedule(Phase.DECODE, short, view)
        return out
