"""A vLLM-compatible engine emulator whose continuous-batching step times come from an omnisim StepTimeModel.

    from backends.emulator import EmulatedEngine, EmulatorServer, EngineGroup, Fleet, LinearStepTime
    async with Fleet([EngineGroup("prefill", 2, model), EngineGroup("decode", 1, model)], time_scale=0.1) as fleet:
        fleet.upstreams()      # -> entries for backends.proxy.ProxyConfig(upstreams=...)

As a process: ``python -m backends.emulator --prefill 2 --decode 1``. The Hydra backend (``omnisim
backend=emulator``) is backends.emulator.backend.EmulatorBackend.
"""
from backends.emulator.engine import EmulatedEngine, EngineSequence
from backends.emulator.fleet import EngineGroup, Fleet
from backends.emulator.linear_step_time import LinearStepTime
from backends.emulator.server import EmulatorServer, SharedKVStore

__all__ = ["EmulatedEngine", "EmulatorServer", "EngineGroup", "EngineSequence", "Fleet", "LinearStepTime",
           "SharedKVStore"]
