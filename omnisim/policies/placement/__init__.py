"""Expert placement policies (``PlacementPolicy``): numpy only, vectorised over layers."""
from omnisim.policies.placement.deepseek_eplb import DeepSeekEplb
from omnisim.policies.placement.migration_aware import MigrationAwarePlacement
from omnisim.policies.placement.omni_placement import OmniPlacement
from omnisim.policies.placement.omni_placement_static import OmniPlacementStatic
from omnisim.policies.placement.predictive import PredictivePlacement
from omnisim.policies.placement.static import StaticPlacement

POLICIES = {
    "static": StaticPlacement,
    "deepseek_eplb": DeepSeekEplb,
    "omni_placement_static": OmniPlacementStatic,
    "omni_placement": OmniPlacement,
    "migration_aware": MigrationAwarePlacement,
    "predictive": PredictivePlacement,
}

__all__ = ["POLICIES", "DeepSeekEplb", "MigrationAwarePlacement", "OmniPlacement", "OmniPlacementStatic",
           "PredictivePlacement", "StaticPlacement"]
