"""One request's reservation at the instance a policy assigned it to, from assignment to its end there."""
from __future__ import annotations

from dataclasses import dataclass

from backends.proxy.upstream_state import UpstreamState


@dataclass(eq=False)
class Reservation:
    """Holds ``prompt`` tokens at ``up`` until prefilled and ``decode`` context tokens until the request is done."""

    up: UpstreamState
    prompt: int
    decode: int
    cached: int = 0  # prompt tokens the prefix index expected cached there
    alone: bool = False  # nothing else of ours was in flight there when it was assigned
    open: bool = True

    def prompt_done(self) -> None:
        if self.prompt:
            self.up.prefilled(self.prompt)
            self.prompt = 0

    def close(self) -> bool:
        """Release what is still held; False if it was closed before."""
        if not self.open:
            return False
        self.prompt_done()
        self.up.finished(self.decode)
        self.open = False
        return True
