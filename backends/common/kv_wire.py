"""vLLM's KV-cache event wire format (vllm/distributed/kv_events.py) over ZMQ PUB/SUB.

A message is three frames: topic, an 8-byte big-endian sequence number, and a msgpack ``EventBatch``
``[ts, [event, ...], data_parallel_rank?]`` whose events are tagged arrays: ``["BlockStored", block_hashes,
parent_block_hash, token_ids, block_size, lora_id, medium]``, ``["BlockRemoved", block_hashes, medium]``,
``["AllBlocksCleared"]``. Decoding reads fields by position and ignores trailing ones, so newer vLLM versions that
append fields still decode. Block hashes may be ints or bytes (vLLM's ExternalBlockHash); bytes become ints.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import msgspec
import zmq
import zmq.asyncio

from omnisim.core import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

log = logging.getLogger(__name__)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def _hash(h: int | bytes) -> int:
    return int.from_bytes(h, "big") if isinstance(h, (bytes, bytearray)) else int(h)


def encode_batch(events: list[KVEvent], ts: float | None = None) -> bytes:
    wire = []
    for e in events:
        if isinstance(e, BlockStored):
            wire.append(["BlockStored", list(e.block_hashes), e.parent_block_hash, [], e.block_size, None, None])
        elif isinstance(e, BlockRemoved):
            wire.append(["BlockRemoved", list(e.block_hashes), None])
        elif isinstance(e, AllBlocksCleared):
            wire.append(["AllBlocksCleared"])
        else:
            raise TypeError(f"not a KV event: {e!r}")
    return _encoder.encode([time.time() if ts is None else ts, wire])


def decode_batch(payload: bytes) -> list[KVEvent]:
    """Events of one EventBatch payload; ValueError naming what is malformed."""
    try:
        batch = _decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise ValueError(f"kv event batch: not msgpack ({e})") from e
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("kv event batch: expected [ts, [events...], ...]")
    out: list[KVEvent] = []
    for k, ev in enumerate(batch[1]):
        if not isinstance(ev, list) or not ev:
            raise ValueError(f"kv event batch: event {k} is not a tagged array")
        tag = ev[0]
        if tag == "BlockStored":
            parent = ev[2] if len(ev) > 2 else None
            out.append(BlockStored(tuple(_hash(h) for h in ev[1]), None if parent is None else _hash(parent),
                                   int(ev[4]) if len(ev) > 4 and ev[4] is not None else 0))
        elif tag == "BlockRemoved":
            out.append(BlockRemoved(tuple(_hash(h) for h in ev[1])))
        elif tag == "AllBlocksCleared":
            out.append(AllBlocksCleared())
        else:
            raise ValueError(f"kv event batch: event {k} has unknown tag {tag!r}")
    return out


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

    def publish(self, events: list[KVEvent]) -> None:
        if not events:
            return
        self._sock.send_multipart((self._topic, self._seq.to_bytes(8, "big"), encode_batch(events)),
                                  flags=zmq.NOBLOCK)
        self._seq += 1

    def close(self) -> None:
        self._sock.close(0)


class KVEventSubscriber:
    """Connects to one engine's publisher and hands decoded events to ``on_events`` (runs as an asyncio task).
    A malformed batch is logged and skipped, never fatal: routing then falls back to what is already indexed."""

    def __init__(self, endpoint: str, on_events: Callable[[list[KVEvent]], None], topic: str = "kv-events"):
        self.endpoint = endpoint
        self._on_events = on_events
        self._topic = topic.encode()
        self.received = 0
        self.malformed = 0
        self.gaps = 0

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
                if last_seq >= 0 and seq != last_seq + 1:
                    self.gaps += 1  # missed batches: the index may be stale until blocks are stored again
                last_seq = seq
                try:
                    events = decode_batch(frames[2])
                except ValueError as e:
                    self.malformed += 1
                    log.warning("kv events from %s: %s", self.endpoint, e)
                    continue
                self.received += 1
                self._on_events(events)
        except asyncio.CancelledError:
            pass
        finally:
            sock.close(0)
