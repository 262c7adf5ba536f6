"""A prefix lookup fed by KV-cache events: what the proxy knows of each instance's cache."""
from __future__ import annotations

from typing import Iterable

from omnisim.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from omnisim.core.request import Request


class PrefixIndex:
    """Per instance, the set of cached block hashes. Hashes are position-dependent (chained), so a flat set answers
    leading-prefix matches exactly as a radix tree would."""

    def __init__(self) -> None:
        self._blocks: dict[str, set[int]] = {}

    def apply(self, instance_id: str, events: Iterable[KVEvent]) -> None:
        blocks = self._blocks.setdefault(instance_id, set())
        for event in events:
            if isinstance(event, BlockStored):
                blocks.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                blocks.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                blocks.clear()
            else:
                raise TypeError(f"not a KV event: {event!r}")

    def forget(self, instance_id: str) -> None:
        self._blocks.pop(instance_id, None)

    def cached_blocks(self, request: Request, instance_id: str) -> int:
        blocks = self._blocks.get(instance_id)
        if not blocks:
            return 0
        n = 0
        for h in request.prefix_hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def cached_tokens(self, request: Request, instance_id: str) -> int:
        # As in vLLM: the last prompt token is always recomputed (it produces the first logits), and hits are whole
        # blocks, so a fully cached prompt reuses all but its last block.
        h = request.hash_block_tokens
        return min(self.cached_blocks(request, instance_id), (request.prompt_tokens - 1) // h) * h if h else 0
