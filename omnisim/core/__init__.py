"""The contract between policies and drivers. Imports the standard library and numpy only."""
from omnisim.core.dispatch import (
    Assignment, Phase, PolicyError, ProxyPolicy, Waiting, accepts, check_assignments, roles_for, serves,
    validate_assignments,
)
from omnisim.core.engine_policy import FCFS, PrefillPolicy, QueuedPrompt
from omnisim.core.instance import BatchSample, InstanceState, Role
from omnisim.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from omnisim.core.placement import ExpertLoad, Placement, PlacementPolicy, Topology
from omnisim.core.prefix_index import PrefixIndex
from omnisim.core.request import Request
from omnisim.core.view import NO_PREFIX_CACHE, ClusterView, PrefixLookup

PROTOCOL_VERSION = "1.0"

__all__ = [
    "PROTOCOL_VERSION", "AllBlocksCleared", "Assignment", "BatchSample", "BlockRemoved", "BlockStored",
    "ClusterView", "ExpertLoad", "FCFS", "InstanceState", "KVEvent", "NO_PREFIX_CACHE", "Phase", "Placement",
    "PlacementPolicy", "PolicyError", "PrefillPolicy", "PrefixIndex", "PrefixLookup", "ProxyPolicy", "QueuedPrompt",
    "Request", "Role", "Topology", "Waiting", "accepts", "check_assignments", "roles_for", "serves",
    "validate_assignments",
]
