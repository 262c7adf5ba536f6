"""A prefix lookup fed by KV-cache events: what the proxy knows of each instance's cache."""
from __future__ import annotations

from typing import Container, Iterable

from omnisim.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from omnisim.core.request import Request


def reusable_units(matched: int, tokens: int, unit_tokens: int) -> int:
    """Of ``matched`` leading cached units (``unit_tokens`` tokens each), how many a prefill of ``tokens`` tokens
    reuses: as in vLLM, whole units only, and never the last token (it produces the first logits). Every driver
    (the engine scheduler, the event-fed index, the proxy's routing history) counts cache hits with this rule."""
    return min(matched, (tokens - 1) // unit_tokens)


def reusable_tokens(request: Request, blocks: Container[int]) -> int:
    """Prompt tokens of ``request`` a cache holding ``blocks`` lets its prefill skip: the leading run of its prefix
    hashes found in ``blocks``, in whole blocks, never the last prompt token (it produces the first logits), as in
    vLLM: a fully cached prompt reuses all but its last block."""
    h = request.hash_block_tokens
    if not h or not blocks:
        return 0
    n = 0
    for key in request.prefix_hashes:
        if key not in blocks:
            break
        n += 1
    return reusable_units(n, request.prompt_tokens, h) * h


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
        """Leading prefix hashes of ``request`` cached on the instance (whatever the prompt's length)."""
        blocks = self._blocks.get(instance_id, ())
        n = 0
        for h in request.prefix_hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def cached_tokens(self, request: Request, instance_id: str) -> int:
        return reusable_tokens(request, self._blocks.get(instance_id, ()))
