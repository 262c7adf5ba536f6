"""vLLM's KV-cache event wire format (vllm/distributed/kv_events.py) over ZMQ PUB/SUB.

A message is three frames: topic, an 8-byte big-endian sequence number, and a msgpack ``EventBatch``
``[ts, [event, ...], data_parallel_rank?]``. vLLM 0.32 sends each event as a map tagged by ``"type"`` (its
``KVCacheEvent`` structs are ``tag=True`` but not ``array_like``), for example::

    {"type": "BlockStored", "block_hashes": [...], "parent_block_hash": h | None, "token_ids": [...],
     "block_size": 32, "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": [None, ...],
     "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
    {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU", "group_idx": 0}
    {"type": "AllBlocksCleared"}

Older builds (and array_like encoders) send tagged arrays with the same fields in the same order:
``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, extra_keys,
group_idx, ...]``, ``["BlockRemoved", block_hashes, medium, group_idx, ...]``, ``["AllBlocksCleared"]``. Both
decode; fields a version adds or omits (vLLM omits those at their default) are tolerated. Block hashes may be ints
or bytes (vLLM's ExternalBlockHash: sha256 bytes when VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0); bytes become ints.

Decoded events keep what the core contract's KV events leave out (the blocks' token ids, their extra hash keys,
the KV cache group and medium): backends/common/engine_block_map.py needs them to re-hash vLLM's blocks.
``as_core`` turns them into omnisim.core events.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import msgspec
import zmq
import zmq.asyncio

from omnisim.core import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

log = logging.getLogger(__name__)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()

# Field order of vLLM's structs (positions in the tagged-array form, after the tag).
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                  "extra_keys", "group_idx")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


@dataclass(frozen=True, slots=True)
class StoredBlocks:
    """vLLM's BlockStored: consecutive full blocks of one sequence, ``token_ids`` being all their tokens in order
    (``block_size`` per block) and ``parent_block_hash`` the engine hash of the block before the first (None at
    the start of a sequence). ``extra_keys[k]``: what besides tokens went into block k's hash (LoRA name, cache
    salt, multimodal ids), None where nothing did."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...] = ()
    block_size: int = 0
    extra_keys: tuple[Any, ...] | None = None
    group_idx: int = 0
    medium: str | None = None

    def core(self) -> BlockStored:
        return BlockStored(self.block_hashes, self.parent_block_hash, self.block_size)


@dataclass(frozen=True, slots=True)
class RemovedBlocks:
    """vLLM's BlockRemoved: blocks evicted from KV cache group ``group_idx`` of ``medium``."""

    block_hashes: tuple[int, ...]
    group_idx: int = 0
    medium: str | None = None

    def core(self) -> BlockRemoved:
        return BlockRemoved(self.block_hashes)


WireEvent = StoredBlocks | RemovedBlocks | AllBlocksCleared


def as_core(events: Sequence[WireEvent]) -> list[KVEvent]:
    """The omnisim.core events of decoded wire events (block hashes as the engine sent them)."""
    return [e if isinstance(e, AllBlocksCleared) else e.core() for e in events]


def _hash(h: Any, where: str) -> int:
    if isinstance(h, (bytes, bytearray)):
        return int.from_bytes(h, "big")
    if isinstance(h, int) and not isinstance(h, bool):
        return h
    raise ValueError(f"kv event batch: {where}: expected an int or bytes block hash, got {type(h).__name__}")


def _hashes(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"kv event batch: {where}: expected a list of block hashes")
    return tuple(_hash(h, where) for h in value)


def _fields(ev: Any, k: int) -> tuple[str, dict]:
    """(tag, fields by name) of one event in either form."""
    if isinstance(ev, dict):
        tag = ev.get("type")
        if not isinstance(tag, str):
            raise ValueError(f"kv event batch: event {k} is a map without a string 'type'")
        return tag, ev
    if isinstance(ev, list) and ev and isinstance(ev[0], str):
        tag = ev[0]
        names = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS if tag == "BlockRemoved" else ()
        return tag, dict(zip(names, ev[1:]))
    raise ValueError(f"kv event batch: event {k} is neither a map with 'type' nor a tagged array")


def _stored(f: dict, k: int) -> StoredBlocks:
    where = f"event {k} (BlockStored)"
    if "block_hashes" not in f:
        raise ValueError(f"kv event batch: {where}: block_hashes missing")
    parent = f.get("parent_block_hash")
    tokens = f.get("token_ids") or []
    if not isinstance(tokens, list):  # the ints themselves are checked where they are hashed
        raise ValueError(f"kv event batch: {where}.token_ids: expected a list of token ids")
    size = f.get("block_size") or 0
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"kv event batch: {where}.block_size: expected a non-negative int, got {size!r}")
    extra = f.get("extra_keys")
    if extra is not None and not isinstance(extra, list):
        raise ValueError(f"kv event batch: {where}.extra_keys: expected a list (one entry per block) or null")
    return StoredBlocks(_hashes(f["block_hashes"], f"{where}.block_hashes"),
                        None if parent is None else _hash(parent, f"{where}.parent_block_hash"),
                        tuple(tokens), size, None if extra is None else tuple(extra), _group(f, where),
                        f.get("medium"))


def _group(f: dict, where: str) -> int:
    g = f.get("group_idx")
    if g is None:
        return 0
    if not isinstance(g, int) or isinstance(g, bool):
        raise ValueError(f"kv event batch: {where}.group_idx: expected an int, got {g!r}")
    return g


def decode_batch(payload: bytes) -> list[WireEvent]:
    """Events of one EventBatch payload (either event form); ValueError naming what is malformed."""
    try:
        batch = _decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise ValueError(f"kv event batch: not msgpack ({e})") from e
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("kv event batch: expected [ts, [events...], data_parallel_rank?]")
    out: list[WireEvent] = []
    for k, ev in enumerate(batch[1]):
        tag, f = _fields(ev, k)
        if tag == "BlockStored":
            out.append(_stored(f, k))
        elif tag == "BlockRemoved":
            if "block_hashes" not in f:
                raise ValueError(f"kv event batch: event {k} (BlockRemoved): block_hashes missing")
            where = f"event {k} (BlockRemoved)"
            out.append(RemovedBlocks(_hashes(f["block_hashes"], f"{where}.block_hashes"), _group(f, where),
                                     f.get("medium")))
        elif tag == "AllBlocksCleared":
            out.append(AllBlocksCleared())
        else:
            raise ValueError(f"kv event batch: event {k} has unknown type {tag!r}")
    return out


def _wire(e: WireEvent | KVEvent) -> dict:
    """One event as vLLM 0.32 puts it on the wire (the fields it always sends; extra_keys only when present)."""
    if isinstance(e, BlockStored):
        e = StoredBlocks(tuple(e.block_hashes), e.parent_block_hash, (), e.block_size)
    elif isinstance(e, BlockRemoved):
        e = RemovedBlocks(tuple(e.block_hashes))
    if isinstance(e, StoredBlocks):
        out = {"type": "BlockStored", "block_hashes": list(e.block_hashes), "parent_block_hash": e.parent_block_hash,
               "token_ids": list(e.token_ids), "block_size": e.block_size, "lora_id": None,
               "medium": e.medium or "GPU", "lora_name": None}
        if e.extra_keys is not None:
            out["extra_keys"] = list(e.extra_keys)
        out["group_idx"] = e.group_idx
        return out
    if isinstance(e, RemovedBlocks):
        return {"type": "BlockRemoved", "block_hashes": list(e.block_hashes), "medium": e.medium or "GPU",
                "group_idx": e.group_idx}
    if isinstance(e, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {e!r}")


def encode_batch(events: Sequence[WireEvent | KVEvent], ts: float | None = None, dp_rank: int = 0) -> bytes:
    """An EventBatch payload in vLLM 0.32's layout (core events get no token ids)."""
    return _encoder.encode([time.time() if ts is None else ts, [_wire(e) for e in events], dp_rank])


class KVEventPublisher:
    """ZMQ PUB socket that sends event batches in vLLM's framing (bind side, as vLLM's publisher)."""

    def __init__(self, endpoint: str, topic: str = "kv-events"):
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = topic.encode()
        self._seq = 0

    def publish(self, events: Sequence[WireEvent | KVEvent]) -> None:
        if not events:
            return
        self._sock.send_multipart((self._topic, self._seq.to_bytes(8, "big"), encode_batch(events)),
                                  flags=zmq.NOBLOCK)
        self._seq += 1

    def close(self) -> None:
        self._sock.close(0)


class KVEventSubscriber:
    """Connects to one engine's publisher and hands decoded events (``WireEvent``s) to ``on_events`` (runs as an
    asyncio task). A malformed batch is logged and skipped, never fatal: routing then falls back to what is
    already indexed. When the sequence numbers start again (the engine restarted, its cache is empty) the
    handed events begin with an AllBlocksCleared."""

    def __init__(self, endpoint: str, on_events: Callable[[list[WireEvent]], None], topic: str = "kv-events"):
        self.endpoint = endpoint
        self._on_events = on_events
        self._topic = topic.encode()
        self.received = 0
        self.malformed = 0
        self.gaps = 0
        self.restarts = 0

    async def run(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self._topic)
        sock.connect(self.endpoint)
        last_seq = -1
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    self.malformed += 1
                    continue
                seq = int.from_bytes(frames[1], "big")
                restarted = 0 <= seq <= last_seq  # numbering starts again: a new publisher, an empty cache
                if last_seq >= 0 and seq != last_seq + 1:
                    self.gaps += 1  # missed batches: the index may be stale until blocks are stored again
                last_seq = seq
                try:
                    events = decode_batch(frames[2])
                except ValueError as e:
                    self.malformed += 1
                    log.warning("kv events from %s: %s", self.endpoint, e)
                    events = []
                else:
                    self.received += 1
                if restarted:
                    self.restarts += 1
                    events = [AllBlocksCleared(), *events]
                if events:
                    self._on_events(events)
        except asyncio.CancelledError:
            pass
        finally:
            sock.close(0)
