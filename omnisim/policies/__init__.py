"""Every routing, placement and ordering policy, written once against omnisim.core."""
from omnisim.policies.least_load import LeastLoad
from omnisim.policies.round_robin import RoundRobin

__all__ = ["LeastLoad", "RoundRobin"]
