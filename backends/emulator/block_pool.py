"""The emulated engine's KV blocks: a fixed pool, hashed prompt blocks shared and kept as an LRU prefix cache.

It only answers questions and keeps counts (like nano-vllm's block manager); the engine decides. Blocks are either
hashed (full prompt blocks, shareable, reported in KV events) or anonymous (a partial last block, decode growth,
or a duplicate of a block another sequence stored first).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence


class BlockPool:
    def __init__(self, num_blocks: int, on_stored: Callable[[list[int], int | None], None] | None = None,
                 on_removed: Callable[[list[int]], None] | None = None, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"kv capacity: need at least one KV block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.on_stored = on_stored
        self.on_removed = on_removed
        self._ref: dict[int, int] = {}  # hashed blocks held by running sequences -> holders
        self._evictable: OrderedDict[int, None] = OrderedDict()  # hashed blocks no one holds, oldest first
        self._anonymous = 0

    @property
    def used(self) -> int:
        """Blocks held by sequences (evictable cached blocks count as free)."""
        return self._anonymous + len(self._ref)

    @property
    def free(self) -> int:
        return self.num_blocks - self.used

    def usage(self) -> float:
        return self.used / self.num_blocks

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are resident (held or evictable)."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        for h in hashes:
            if h not in self._ref and h not in self._evictable:
                break
            n += 1
        return n

    def can_allocate(self, hit_hashes: Sequence[int], new_blocks: int) -> bool:
        reused_from_evictable = sum(1 for h in hit_hashes if h in self._evictable)
        return new_blocks + reused_from_evictable <= self.free

    def allocate(self, hit_hashes: Sequence[int], new_blocks: int) -> None:
        """Hold the cached blocks ``hit_hashes`` and ``new_blocks`` anonymous ones (check can_allocate first)."""
        for h in hit_hashes:
            if h in self._evictable:
                del self._evictable[h]
                self._ref[h] = 1
            else:
                self._ref[h] += 1
        self._anonymous += new_blocks
        self._evict_to_fit()

    def grow(self, blocks: int = 1) -> bool:
        """One more anonymous block for a growing sequence; False if the pool is full."""
        if self.free < blocks:
            return False
        self._anonymous += blocks
        self._evict_to_fit()
        return True

    def commit(self, new_hashes: Sequence[int], parent: int | None) -> list[int]:
        """A sequence finished computing blocks it held anonymously: name them. ``new_hashes`` are consecutive
        blocks of one chain and ``parent`` the block before them. Returns the hashes it now holds (a hash another
        sequence already stored stays anonymous, and is not returned). Each unbroken run of newly stored blocks is
        reported with the block right before it as its parent, as a BlockStored event must."""
        if not self.enable_prefix_caching:
            return []
        held: list[int] = []
        run: list[int] = []
        run_parent = before = parent
        for h in new_hashes:
            if h in self._ref or h in self._evictable:
                self._stored(run, run_parent)
                run = []
            else:
                if not run:
                    run_parent = before
                self._anonymous -= 1
                self._ref[h] = 1
                held.append(h)
                run.append(h)
            before = h
        self._stored(run, run_parent)
        return held

    def _stored(self, run: list[int], parent: int | None) -> None:
        if run and self.on_stored:
            self.on_stored(run, parent)

    def release(self, hashes: Sequence[int], anonymous: int) -> None:
        """A sequence finished or was preempted: its hashed blocks become evictable when no one else holds them."""
        for h in hashes:
            n = self._ref[h] - 1
            if n:
                self._ref[h] = n
            else:
                del self._ref[h]
                self._evictable[h] = None
        self._anonymous -= anonymous
        self._evict_to_fit()

    def _evict_to_fit(self) -> None:
        removed = []
        while self._evictable and self.used + len(self._evictable) > self.num_blocks:
            h, _ = self._evictable.popitem(last=False)
            removed.append(h)
        if removed and self.on_removed:
            self.on_removed(removed)
