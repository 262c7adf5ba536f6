"""The engine model, pure: one instance's scheduler (vLLM v1's shape), its block KV cache, the closed-form runs of
decode steps and the KV link queue. No SimPy, asyncio or HTTP: the simulator (``omnisim.sim``) and the engine
emulator (``backends.emulator``) both drive it."""
from omnisim.engine.block_manager import BlockManager
from omnisim.engine.decode_run import DecodeRun
from omnisim.engine.kv_link_queue import KVLinkQueue
from omnisim.engine.scheduler import EngineEvents, Scheduler, StepPlan
from omnisim.engine.sequence import Sequence

__all__ = ["BlockManager", "DecodeRun", "EngineEvents", "KVLinkQueue", "Scheduler", "Sequence", "StepPlan"]
