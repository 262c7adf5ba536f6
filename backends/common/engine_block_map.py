"""Exact prefix matching against engines whose block hashes the proxy cannot compute (vLLM's): per instance, a map
from the engine's block hash to the proxy's own chained hash (backends/common/tokens.py), learned from the token
ids that every BlockStored event carries.

A BlockStored event lists consecutive blocks and the engine hash of the block before them. Their own hashes are
the chain continued from that parent's own hash over the event's token ids, ``block_size`` per block (and the
event's extra hash keys: cache salt, LoRA name). A request's own hashes are the same chain over its prompt's token
ids from the start, so a request block matches an indexed block exactly when the whole prefix up to it has the same
tokens (and keys) as a block the engine holds. Nothing depends on the engine's hash function or PYTHONHASHSEED.

Counting follows vLLM's block pool: every BlockStored of a hash is one cached block (two blocks may hold the same
content, e.g. two requests that computed the same prefix at once) and every BlockRemoved one eviction; a hash
leaves the index when its last copy is evicted. AllBlocksCleared empties the instance.

Blocks that cannot be mapped are left out (a miss, never a false hit) and counted in ``unmapped_blocks``: an event
without token ids (an engine that sends hashes only), with another block size than the proxy's
(``prefix_block_tokens`` must be the engines' ``--block-size``), token ids that do not fill the blocks, or a parent
never seen (events missed, e.g. published before the proxy subscribed; its descendants are left out too). Known
limits: with several KV cache groups (hybrid models) a block counts while any group holds it; vLLM's per-request
``kv_cache_report_mode="full"`` re-reports hit blocks as stored, which this counts as extra copies.
"""
from __future__ import annotations

import logging
import struct
from typing import Sequence

from omnisim.core import AllBlocksCleared, BlockRemoved, BlockStored, PrefixIndex

from backends.common.kv_wire import RemovedBlocks, StoredBlocks, WireEvent
from backends.common.tokens import ROOT_DIGEST, chain_digests, digest_hash

log = logging.getLogger(__name__)


class _Block:
    __slots__ = ("digest", "copies")

    def __init__(self, digest: bytes) -> None:
        self.digest = digest
        self.copies = 0


class EngineBlockMap:
    """Feeds ``index`` (what the proxy's view queries) with its own hashes for each instance's engine events."""

    def __init__(self, index: PrefixIndex, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.index = index
        self.block_size = block_size
        self._blocks: dict[str, dict[tuple[int, int], _Block]] = {}  # instance -> (group, engine hash) -> block
        self._refs: dict[str, dict[int, int]] = {}  # instance -> own hash -> engine blocks mapped to it
        self.mapped_blocks = 0
        self.unmapped_blocks = 0
        self._warned: set[str] = set()

    def apply(self, instance_id: str, events: Sequence[WireEvent]) -> None:
        blocks = self._blocks.setdefault(instance_id, {})
        refs = self._refs.setdefault(instance_id, {})
        for e in events:
            if isinstance(e, StoredBlocks):
                added = self._store(instance_id, blocks, refs, e)
                if added:
                    self.index.apply(instance_id, [BlockStored(tuple(added))])
            elif isinstance(e, RemovedBlocks):
                gone = self._remove(blocks, refs, e)
                if gone:
                    self.index.apply(instance_id, [BlockRemoved(tuple(gone))])
            elif isinstance(e, AllBlocksCleared):
                blocks.clear()
                refs.clear()
                self.index.apply(instance_id, [e])
            else:
                raise TypeError(f"not a decoded KV event: {e!r}")

    def forget(self, instance_id: str) -> None:
        """The instance's cache is gone (e.g. its engine restarted)."""
        self._blocks.pop(instance_id, None)
        self._refs.pop(instance_id, None)
        self.index.forget(instance_id)

    def tracked_blocks(self, instance_id: str) -> int:
        return len(self._blocks.get(instance_id, ()))

    def _skip(self, instance_id: str, e: StoredBlocks, reason: str, warn_key: str | None = None) -> list[int]:
        self.unmapped_blocks += len(e.block_hashes)
        if warn_key is not None and warn_key not in self._warned:
            self._warned.add(warn_key)
            log.warning("kv events from %s: %s; such blocks are not indexed", instance_id, reason)
        else:
            log.debug("kv events from %s: %s", instance_id, reason)
        return []

    def _store(self, instance_id: str, blocks: dict, refs: dict, e: StoredBlocks) -> list[int]:
        n = len(e.block_hashes)
        if not n:
            return []
        if not e.token_ids:
            return self._skip(instance_id, e, "BlockStored without token ids (an engine that publishes hashes "
                                              "only)", "no_tokens")
        if e.block_size != self.block_size:
            return self._skip(instance_id, e, f"block_size {e.block_size} in the engine's events but "
                                              f"prefix_block_tokens={self.block_size} in the proxy (set it to the "
                                              "engines' --block-size)", f"size{e.block_size}")
        if len(e.token_ids) != n * e.block_size:
            return self._skip(instance_id, e, f"{len(e.token_ids)} token ids for {n} blocks of {e.block_size}",
                              "shape")
        if e.parent_block_hash is None:
            parent = ROOT_DIGEST
        else:
            known = blocks.get((e.group_idx, e.parent_block_hash))
            if known is None:
                return self._skip(instance_id, e, "a block whose parent was never seen (events missed)")
            parent = known.digest
        extra = e.extra_keys if e.extra_keys is not None and any(k is not None for k in e.extra_keys) else None
        try:
            if not isinstance(e.token_ids[0], int):
                raise TypeError("token ids")
            digests = chain_digests(e.token_ids, e.block_size, parent, extra)
        except (struct.error, TypeError):
            return self._skip(instance_id, e, "token ids that are not 64-bit integers", "bad_tokens")
        added = []
        for h, d in zip(e.block_hashes, digests):
            key = (e.group_idx, h)
            block = blocks.get(key)
            if block is None:  # else another copy of a known block (same engine hash, so same content)
                block = blocks[key] = _Block(d)
                own = digest_hash(d)
                refs[own] = refs.get(own, 0) + 1
                added.append(own)
            block.copies += 1
        self.mapped_blocks += n
        return added

    def _remove(self, blocks: dict, refs: dict, e: RemovedBlocks) -> list[int]:
        gone: list[int] = []
        for h in e.block_hashes:
            key = (e.group_idx, h)
            block = blocks.get(key)
            if block is None:
                continue  # never mapped
            block.copies -= 1
            if block.copies <= 0:
                del blocks[key]
                self._unref(refs, digest_hash(block.digest), gone)
        return gone

    @staticmethod
    def _unref(refs: dict, own: int, gone: list[int]) -> None:
        left = refs.get(own, 0) - 1
        if left > 0:
            refs[own] = left
        else:
            refs.pop(own, None)
            gone.append(own)
