"""Block-based KV cache of one instance: free pool, prefix-cached units with reference counts, LRU eviction.

Prefix caching works in units of ``unit_blocks`` blocks, one unit per prefix hash of the request (a request's
``hash_block_tokens`` must be a multiple of the block size). Cached units with no reference stay resident and are
evicted least-recently-used when the free pool runs dry. Every store and eviction is published as a vLLM-shaped KV
event to ``listener(events)``, which is how the proxy-side prefix index learns the cache contents.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

from omnisim.core.kv_events import BlockRemoved, BlockStored, KVEvent


class BlockManager:
    __slots__ = ("num_blocks", "block_size", "free", "refs", "lru", "lru_blocks", "unit_blocks", "listener")

    def __init__(self, num_blocks: int, block_size: int,
                 listener: Callable[[Sequence[KVEvent]], None] | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free = num_blocks  # blocks holding nothing
        self.refs: dict[int, int] = {}  # cached unit -> requests using it
        self.lru: OrderedDict[int, int] = OrderedDict()  # unreferenced cached unit -> its blocks, oldest first
        self.lru_blocks = 0
        self.unit_blocks: dict[int, int] = {}  # cached unit -> blocks it occupies
        self.listener = listener  # receives every KVEvent batch (None: nobody listens)

    @property
    def available(self) -> int:
        """Blocks that an allocation can take: free ones plus evictable cached ones."""
        return self.free + self.lru_blocks

    @property
    def used(self) -> int:
        """Blocks referenced by running requests (vLLM's kv_cache_usage counts these)."""
        return self.num_blocks - self.available

    def match(self, keys: Sequence[int]) -> int:
        """Number of leading ``keys`` that are cached (no side effects)."""
        refs = self.refs
        n = 0
        for k in keys:
            if k not in refs:
                break
            n += 1
        return n

    def acquire(self, keys: Sequence[int], new_blocks: int) -> bool:
        """Reference the cached ``keys`` and take ``new_blocks`` from the pool; all or nothing."""
        lru = self.lru
        revived = sum(lru[k] for k in keys if k in lru) if lru else 0
        if new_blocks > self.available - revived:
            return False
        refs = self.refs
        for k in keys:
            n = refs[k]
            if n == 0:
                self.lru_blocks -= lru.pop(k)
            refs[k] = n + 1
        self.take(new_blocks)
        return True

    def take(self, blocks: int) -> bool:
        """Take ``blocks`` private blocks, evicting LRU cached units as needed; all or nothing."""
        if blocks > self.free + self.lru_blocks:
            return False
        if blocks > self.free:
            evicted = []
            lru, refs, unit_blocks = self.lru, self.refs, self.unit_blocks
            while blocks > self.free:
                k, n = lru.popitem(last=False)
                del refs[k], unit_blocks[k]
                self.lru_blocks -= n
                self.free += n
                evicted.append(k)
            if self.listener is not None:
                self.listener((BlockRemoved(tuple(evicted)),))
        self.free -= blocks
        return True

    def give(self, blocks: int) -> None:
        """Return private blocks to the pool."""
        self.free += blocks

    def store(self, keys: Sequence[int], unit_blocks: int, parent: int | None = None) -> list[int]:
        """Turn private blocks holding freshly computed units into cached units referenced once by the caller.

        ``keys`` are consecutive units of one chain and ``parent`` the unit before them (None: the chain's start).
        Returns the keys that were stored; keys already cached (computed concurrently elsewhere) are skipped and
        their blocks stay private to the caller. Each unbroken run of stored keys is published as one BlockStored
        naming the unit right before it as its parent, as vLLM's events do.
        """
        refs, stored = self.refs, []
        runs: list[tuple[list[int], int | None]] = []
        before = parent
        for k in keys:
            if k not in refs:
                refs[k] = 1
                self.unit_blocks[k] = unit_blocks
                if not runs or runs[-1][0][-1] != before:
                    runs.append(([], before))
                runs[-1][0].append(k)
                stored.append(k)
            before = k
        if stored and self.listener is not None:
            size = self.block_size * unit_blocks
            self.listener(tuple(BlockStored(tuple(run), run_parent, size) for run, run_parent in runs))
        return stored

    def release(self, keys: Sequence[int]) -> None:
        """Drop one reference to each cached unit; unreferenced units become evictable (most recent last)."""
        refs, lru, unit_blocks = self.refs, self.lru, self.unit_blocks
        for k in reversed(keys):  # tail blocks are evicted first, as in vLLM
            n = refs[k] - 1
            refs[k] = n
            if n == 0:
                b = unit_blocks[k]
                lru[k] = b
                self.lru_blocks += b

    def check(self) -> None:
        """Invariants (for tests): every block is free, cached-evictable, or referenced."""
        assert self.free >= 0 and self.lru_blocks >= 0
        assert self.lru_blocks == sum(self.lru.values())
        assert set(self.lru) == {k for k, n in self.refs.items() if n == 0}
        assert all(n >= 0 for n in self.refs.values())
        assert set(self.unit_blocks) == set(self.refs)
        assert self.free + sum(self.unit_blocks.values()) <= self.num_blocks
