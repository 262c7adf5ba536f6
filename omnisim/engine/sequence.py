"""A request's life inside an engine (simulated or emulated): progress counters and the timestamps of its record."""
from __future__ import annotations

import math

from omnisim.core import Request

NAN = math.nan


class Sequence:
    __slots__ = (
        "req", "id", "prompt", "output", "keys", "unit_blocks",
        # progress on the instance that holds it
        "prefill_target", "computed", "generated", "held_keys", "private_blocks", "reserved_tokens",
        "join_step", "epoch", "local", "source", "sent_keys", "sent_blocks", "expected_hit",
        # record
        "cached", "prefill_instance", "decode_instance", "t_prefill_dispatch", "t_prefill_start", "t_prefill_end",
        "t_decode_dispatch", "t_kv_end", "t_first", "t_finish", "preemptions",
    )

    def __init__(self, req: Request, block_size: int) -> None:
        self.req = req
        self.id = req.id
        self.prompt = req.prompt_tokens
        self.output = req.output_tokens
        h = req.hash_block_tokens
        if req.prefix_hashes and h % block_size == 0:
            self.keys = req.prefix_hashes[: self.prompt // h]  # full units only are cacheable
            self.unit_blocks = h // block_size
        else:
            if req.prefix_hashes:
                raise ValueError(f"request {req.id}: hash_block_tokens={h} is not a multiple of the KV block size "
                                 f"{block_size} (cluster.*.block_size)")
            self.keys = ()
            self.unit_blocks = 0
        self.prefill_target = self.prompt
        self.computed = 0
        self.generated = 0
        self.held_keys: tuple[int, ...] = ()
        self.private_blocks = 0
        self.reserved_tokens = 0
        self.join_step = 0
        self.epoch = 0
        self.local = True  # decodes where it prefills (colocated or not disaggregated)
        self.source = None  # prefill instance holding its KV while it transfers
        self.sent_keys: tuple[int, ...] = ()  # what that prefill instance holds for it meanwhile
        self.sent_blocks = 0
        self.expected_hit = 0  # prefix hit counted when it was queued on an instance, until admission
        self.cached = 0
        self.prefill_instance = ""
        self.decode_instance = ""
        self.t_prefill_dispatch = NAN
        self.t_prefill_start = NAN
        self.t_prefill_end = NAN
        self.t_decode_dispatch = NAN
        self.t_kv_end = NAN
        self.t_first = NAN
        self.t_finish = NAN
        self.preemptions = 0

    @property
    def held_blocks(self) -> int:
        """KV blocks this sequence holds on the instance it runs on (cached units it references + private)."""
        return self.private_blocks + len(self.held_keys) * self.unit_blocks

    def row(self, status: str = "ok", error: str = "") -> tuple:
        """The record, in omnisim.metrics.RECORD_COLUMNS order."""
        return (self.id, self.req.arrival_s, self.prompt, self.generated, self.cached, self.prefill_instance,
                self.decode_instance, self.t_prefill_dispatch, self.t_prefill_start, self.t_prefill_end,
                self.t_decode_dispatch, self.t_kv_end, self.t_first, self.t_finish, self.preemptions, status, error)
