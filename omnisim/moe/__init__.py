"""MoE expert load, live placement and rebalancing for the simulator (see ``MoeRuntime``)."""
from omnisim.moe.bursty_load import BurstyLoad
from omnisim.moe.drifting_load import DriftingLoad
from omnisim.moe.expert_load_model import ExpertLoadModel, inclusion, route_counts
from omnisim.moe.load_matrix import logical_counts, read_load_matrix, write_load_csv
from omnisim.moe.migration import Migration
from omnisim.moe.mixed_load import MixedLoad
from omnisim.moe.rebalance_config import RebalanceConfig
from omnisim.moe.replay_load import ReplayLoad
from omnisim.moe.runtime import MoeRuntime
from omnisim.moe.uniform_load import UniformLoad
from omnisim.moe.zipf_load import ZipfLoad

__all__ = ["BurstyLoad", "DriftingLoad", "ExpertLoadModel", "Migration", "MixedLoad", "MoeRuntime",
           "RebalanceConfig", "ReplayLoad", "UniformLoad", "ZipfLoad", "inclusion", "logical_counts",
           "read_load_matrix", "route_counts", "write_load_csv"]
