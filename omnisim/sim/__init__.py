"""The SimPy discrete-event simulator: proxy driver, engine instances, block KV caches, KV links."""
from omnisim.engine import BlockManager
from omnisim.sim.instance import Instance
from omnisim.sim.proxy_driver import PolicyError, ProxyDriver
from omnisim.sim.simulation import SimBackend, Simulation

__all__ = ["BlockManager", "Instance", "PolicyError", "ProxyDriver", "SimBackend", "Simulation"]
