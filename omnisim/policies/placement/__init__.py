"""Expert placement policies (``PlacementPolicy``): numpy only, vectorised over layers."""
from omnisim.policies.placement.deepseek_eplb import DeepSeekEplb
from omnisim.policies.placement.migration_aware import MigrationAwarePlacement
from omnisim.policies.placement.omni_placement import OmniPlacement
from omnisim.policies.placement.omni_placement_static import OmniPlacementStatic
from omnisim.policies.placement.predictive import PredictivePlacement
from omnisim.policies.placement.static import StaticPlacement

# The configured policies are conf/placement/*.yaml (omnisim.app.config_options("placement")), each built from its
# node by omnisim.app.instantiate_node: the simulator, omnisim-placement and vLLM's EPLB plugin all do that.

__all__ = ["DeepSeekEplb", "MigrationAwarePlacement", "OmniPlacement", "OmniPlacementStatic", "PredictivePlacement",
           "StaticPlacement"]
