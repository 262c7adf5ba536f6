"""The proxy's own guess of each instance's prefix cache, from where it routed requests (used when KV events are
off): a request's prefix hashes count as cached on the instance that prefilled it, until pushed out by the
``capacity_blocks`` most recently routed blocks of that instance (LRU). Approximate: the engine may have evicted
them sooner, or cached more."""
from __future__ import annotations

from collections import OrderedDict

from omnisim.core import Request
from omnisim.core.prefix_index import reusable_tokens


class RoutingHistory:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def record(self, instance_id: str, hashes: tuple[int, ...]) -> None:
        blocks = self._blocks.setdefault(instance_id, OrderedDict())
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def forget(self, instance_id: str) -> None:
        self._blocks.pop(instance_id, None)

    def cached_tokens(self, request: Request, instance_id: str) -> int:
        return reusable_tokens(request, self._blocks.get(instance_id, ()))
