"""How many tokens of KV cache an instance holds once its weights are loaded."""
from __future__ import annotations

from omnisim.cost.hardware_spec import HardwareSpec
from omnisim.cost.model_spec import ModelSpec
from omnisim.cost.parallelism import Parallelism


def weight_bytes_per_device(model: ModelSpec, parallel: Parallelism) -> float:
    """Weights one device holds: the non-expert part is sharded over tp and replicated over dp; routed experts are
    sharded over all tp * dp devices with expert parallelism (ep > 1), else over tp like the rest."""
    routed = model.routed_expert_params
    expert_shards = parallel.devices if parallel.ep > 1 else parallel.tp
    return ((model.total_params - routed) / parallel.tp + routed / expert_shards) * model.dtype_bytes


def kv_shards(model: ModelSpec, parallel: Parallelism) -> int:
    """Devices one token's KV is split over inside a DP rank: TP splits GQA's KV heads (replicated past kv_heads);
    MLA's latent is one shared vector per token, so every TP rank holds all of it."""
    return 1 if model.attention == "mla" else min(parallel.tp, model.kv_heads)


def kv_capacity_tokens(model: ModelSpec, hardware: HardwareSpec, parallel: Parallelism,
                       gpu_memory_utilization: float = 0.9) -> int:
    """KV tokens one instance (tp * dp devices) can hold: per device, hbm_GB * gpu_memory_utilization - reserved_GB
    - weights, divided by that device's share of a token's KV, times the dp ranks (each DP rank caches its own
    sequences). Raises ValueError when the weights do not fit."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"kv_capacity_tokens: gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    usable = (hardware.hbm_GB * gpu_memory_utilization - hardware.reserved_GB) * 1e9
    weights = weight_bytes_per_device(model, parallel)
    free = usable - weights
    if free <= 0:
        raise ValueError(
            f"kv_capacity_tokens: model {model.name!r} needs {weights / 1e9:.1f} GB of weights per device "
            f"(weight_bytes={model.weight_bytes / 1e9:.1f} GB over tp={parallel.tp}, dp={parallel.dp}, "
            f"ep={parallel.ep}) but hardware {hardware.name!r} leaves {usable / 1e9:.1f} GB per device "
            f"(hbm_GB={hardware.hbm_GB} * gpu_memory_utilization={gpu_memory_utilization} - "
            f"reserved_GB={hardware.reserved_GB}): raise tp/ep or pick a bigger device")
    per_device_token = model.kv_bytes_per_token / kv_shards(model, parallel)
    return int(parallel.dp * (free // per_device_token))
