"""How busy an instance is, measured from its InstanceState the same way by every policy here.

Each policy copies these numbers into a list (one entry per candidate) at the start of a call and adds what it
dispatches itself, so several requests assigned in one call see each other (the view only changes between calls).
"""
from __future__ import annotations

from omnisim.core import InstanceState, Phase, Request, Role


def requests(state: InstanceState) -> int:
    """Requests the instance holds (running or queued in the engine): what a proxy counts as 'in flight'."""
    return state.num_running + state.num_waiting


def inflight_tokens(state: InstanceState, phase: Phase) -> int:
    """Prefill: prompt tokens still to prefill (plus resident context on a MIXED instance, whose decode steps share
    the engine). Decode: context tokens resident or assigned for decoding."""
    if phase is Phase.PREFILL:
        return state.inflight_prompt_tokens + (state.decode_tokens if state.role is Role.MIXED else 0)
    return state.decode_tokens


def added_tokens(request: Request, phase: Phase, cached_tokens: int = 0) -> int:
    """What dispatching ``request`` adds to ``inflight_tokens``: its uncached prompt for prefill, its prompt (the
    context it arrives with) for decode."""
    if phase is Phase.PREFILL:
        return request.prompt_tokens - cached_tokens
    return request.prompt_tokens
