"""Many emulated engines in one asyncio process, each on its own port: a whole xPyD cluster on one machine."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

from backends.emulator.engine import EmulatedEngine
from backends.emulator.server import EmulatorServer, SharedKVStore


@dataclass(frozen=True)
class EngineGroup:
    """``count`` engines of one role with the same limits; ``step_time_model`` is any omnisim StepTimeModel."""

    role: str
    count: int
    step_time_model: Any
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    kv_capacity_tokens: int = 1 << 20
    enable_prefix_caching: bool = True
    engine_policy: Any = None  # omnisim.core.PrefillPolicy deciding admission order and step budget; None: FCFS
    attention: Any = None  # omnisim.attention.OmniAttn on these (decode) engines, of a ``layers``-layer model
    layers: int = 0
    ranks: int = 1  # DP ranks as separate engine cores per engine (the limits above are per rank)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "mixed"):
            raise ValueError(f"role: expected prefill, decode or mixed, got {self.role!r}")
        if self.count < 0:
            raise ValueError(f"count: must be >= 0, got {self.count}")


class Fleet:
    """Engines with ids f"{role}-{i}". ``kv_events``: each engine publishes KV events on a free loopback port.
    ``shared_storage``: prefill engines save prompts and decode engines load them (ExampleConnector's flow);
    otherwise PD uses kv_transfer_params. ``kv_transfer_s(tokens)``: emulated seconds a prompt's KV takes to
    reach a decode engine."""

    def __init__(self, groups: list[EngineGroup], *, time_scale: float = 1.0, host: str = "127.0.0.1",
                 kv_events: bool = False, shared_storage: bool = False,
                 kv_transfer_s: Callable[[int], float] | None = None, model_name: str = "omnisim-emulated",
                 max_model_len: int = 1 << 17, moe_imbalance: float = 1.0) -> None:
        store = SharedKVStore() if shared_storage else None
        kv_links: dict = {}  # one egress FIFO per prefill engine, shared by every decode engine pulling from it
        self.servers: list[EmulatorServer] = []
        for g in groups:
            for i in range(g.count):
                engine = EmulatedEngine(g.step_time_model, max_num_seqs=g.max_num_seqs,
                                        max_num_batched_tokens=g.max_num_batched_tokens, block_size=g.block_size,
                                        kv_capacity_tokens=g.kv_capacity_tokens,
                                        enable_prefix_caching=g.enable_prefix_caching, time_scale=time_scale,
                                        moe_imbalance=moe_imbalance, engine_policy=g.engine_policy,
                                        attention=g.attention, layers=g.layers, ranks=g.ranks)
                kv_role = None
                if store is not None:
                    kv_role = {"prefill": "producer", "decode": "consumer"}.get(g.role)
                server = EmulatorServer(engine, engine_id=f"{g.role}-{i}", role=g.role, model_name=model_name, host=host,
                                        max_model_len=max_model_len,
                                        kv_events_endpoint=f"tcp://{host}:*" if kv_events else None,
                                        kv_transfer_s=kv_transfer_s if g.role == "decode" else None,
                                        shared_store=store, kv_role=kv_role, kv_links=kv_links)
                self.servers.append(server)

    def __getitem__(self, engine_id: str) -> EmulatorServer:
        for s in self.servers:
            if s.engine_id == engine_id:
                return s
        raise KeyError(engine_id)

    async def start(self) -> None:
        try:
            for s in self.servers:
                await s.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers), return_exceptions=True)

    def upstreams(self) -> list[dict]:
        """Upstream entries for backends.proxy.ProxyConfig (plain dicts: url, role, id, kv_events, limits)."""
        return [{"url": s.url, "role": s.role, "id": s.engine_id, "kv_events": s.kv_events_endpoint,
                 "max_num_seqs": s.engine.max_num_seqs, "kv_capacity_tokens": s.engine.kv_capacity_tokens}
                for s in self.servers]

    async def __aenter__(self) -> "Fleet":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
