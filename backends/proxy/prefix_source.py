"""Where the proxy learns what each engine has cached, chosen once from ``ProxyConfig.prefix_source``:

- ``KVEventPrefixSource`` ("kv_events"): each engine's ZMQ KV-cache events, into a PrefixIndex (through an
  EngineBlockMap when the proxy has the model's tokenizer: vLLM's hashes are then mapped to the proxy's own);
- ``RoutingHistoryPrefixSource`` ("history"): the proxy's own record of where it routed which prefix blocks;
- ``NoPrefixSource`` ("none"): nothing is ever cached.

Each answers the view's prefix lookups (``lookup``), says whether the proxy hashes prompts for it and whether it
takes the client's own hashes (X-Prefix-Hashes), and hears of routing decisions and of engines that went away.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Iterable

from backends.common.engine_block_map import EngineBlockMap
from backends.common.kv_wire import KVEventSubscriber, StoredBlocks, WireEvent, as_core
from backends.proxy.config import ProxyConfig
from backends.proxy.routing_history import RoutingHistory
from backends.proxy.upstream_state import UpstreamState
from omnisim.core import NO_PREFIX_CACHE, PrefixIndex, PrefixLookup, Request

log = logging.getLogger(__name__)


class PrefixSource:
    """What every source offers; the defaults are those of a source that hears nothing."""

    name = ""
    lookup: PrefixLookup = NO_PREFIX_CACHE  # what the policy's view.cached_tokens asks
    hashes_prompts = False  # the proxy computes block hashes from prompts for this source
    client_hashes = False  # X-Prefix-Hashes headers (the client's own hashes) are taken as the request's
    block_map: EngineBlockMap | None = None
    subscribers: tuple[KVEventSubscriber, ...] | list[KVEventSubscriber] = ()

    def routed(self, instance_id: str, request: Request) -> None:
        """``request`` (with prefix hashes) was assigned to prefill on ``instance_id``."""

    def engine_lost(self, instance_id: str) -> None:
        """The engine refused a connection: a restarted one starts with an empty cache."""

    def start(self, upstreams: Iterable[UpstreamState]) -> list[asyncio.Task]:
        """Background tasks the source needs while the proxy runs (cancelled at stop)."""
        return []


class NoPrefixSource(PrefixSource):
    """Prefix matching off: requests carry no prefix hashes, every lookup answers 0."""

    name = "none"


class RoutingHistoryPrefixSource(PrefixSource):
    """A request's prefix blocks count as cached where it was prefilled (approximate: evictions are not seen). The
    client's X-Prefix-Hashes, where given, are the request's hashes (the load generator sends the workload's)."""

    name = "history"
    hashes_prompts = True
    client_hashes = True

    def __init__(self, capacity_blocks: int) -> None:
        self.history = RoutingHistory(capacity_blocks)
        self.lookup = self.history

    def routed(self, instance_id: str, request: Request) -> None:
        self.history.record(instance_id, request.prefix_hashes)

    def engine_lost(self, instance_id: str) -> None:
        self.history.forget(instance_id)


class KVEventPrefixSource(PrefixSource):
    """Each engine's cache as its KV events tell it. ``block_map``: with the model's tokenizer, events' token ids
    map the engine's block hashes to the proxy's (exact against vLLM); without, hashes are matched as they are
    (exact against the emulator only)."""

    name = "kv_events"
    hashes_prompts = True

    def __init__(self, block_tokens: int, exact_tokens: bool) -> None:
        self.index = PrefixIndex()
        self.lookup = self.index
        self.block_map = EngineBlockMap(self.index, block_tokens) if exact_tokens else None
        self.subscribers: list[KVEventSubscriber] = []
        self._hash_only_warned = False

    def start(self, upstreams: Iterable[UpstreamState]) -> list[asyncio.Task]:
        tasks = []
        for up in upstreams:
            if up.upstream.kv_events:
                sub = KVEventSubscriber(up.upstream.kv_events, lambda events, i=up.id: self.on_events(i, events))
                self.subscribers.append(sub)
                tasks.append(asyncio.create_task(sub.run()))
        return tasks

    def on_events(self, instance_id: str, events: list[WireEvent]) -> None:
        if self.block_map is not None:
            self.block_map.apply(instance_id, events)
            return
        if not self._hash_only_warned and any(isinstance(e, StoredBlocks) and e.token_ids for e in events):
            self._hash_only_warned = True  # vLLM: its hashes never equal the proxy's
            log.warning("kv events from %s carry token ids (a vLLM engine?): set the proxy's tokenizer to the "
                        "model's for exact prefix matches; without it they match only an emulator's hashes",
                        instance_id)
        self.index.apply(instance_id, as_core(events))


def prefix_source(config: ProxyConfig, exact_tokens: bool) -> PrefixSource:
    """The source ``config.prefix_source`` names; ``exact_tokens``: the proxy has the model's tokenizer."""
    if config.prefix_source == "kv_events":
        return KVEventPrefixSource(config.prefix_block_tokens, exact_tokens)
    if config.prefix_source == "history":
        return RoutingHistoryPrefixSource(config.history_blocks)
    return NoPrefixSource()
