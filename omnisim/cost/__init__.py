"""Cost models: model and hardware specs as data, and step-time models behind one protocol (StepTimeModel)."""
from omnisim.cost.hardware_spec import HardwareSpec
from omnisim.cost.kv_capacity import kv_capacity_tokens, kv_shards, weight_bytes_per_device
from omnisim.cost.model_spec import ModelSpec
from omnisim.cost.parallelism import Parallelism
from omnisim.cost.roofline import RooflineModel
from omnisim.cost.step_time_model import StepTimeModel
from omnisim.cost.table_model import TableModel

__all__ = [
    "HardwareSpec", "ModelSpec", "Parallelism", "RooflineModel", "StepTimeModel", "TableModel",
    "kv_capacity_tokens", "kv_shards", "weight_bytes_per_device",
]
