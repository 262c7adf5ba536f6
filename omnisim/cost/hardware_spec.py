"""One accelerator (or this CPU VM) as the cost model sees it: peaks, memory, links, achievable fractions."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareSpec:
    """Per-device numbers (conf/hardware/NAME.yaml); where a value is an estimate the yaml says so.

    bf16_tflops: dense BF16 peak. int8_tflops: dense 8-bit GEMM peak (FP8 on Hopper, INT8 on Ascend / A100), used
    when the model's weights are 8-bit (0 = no faster 8-bit path, use bf16_tflops).
    hbm_GB / hbm_TBps: device memory and its bandwidth.
    intra_node_GBps: scale-up link per device per direction (NVLink, HCCS, UB); inter_node_GBps: scale-out per device
    per direction (IB, RoCE); devices_per_node: devices sharing the scale-up domain.
    gemm_efficiency / attention_efficiency / memory_efficiency: achievable fraction of the peaks for large GEMMs,
    attention kernels and streaming HBM reads.
    step_overhead_s: fixed engine cost per step (scheduler, input prep, launches, sampling, output processing);
    seq_overhead_s: engine cost per sequence in a step (per DP rank: each runs its own engine loop).
    reserved_GB: device memory neither weights nor KV may use (activations, graphs, runtime workspace).
    The prefill -> decode KV link is not a device figure: the cluster sets it (omnisim.cluster.KVLink).
    """

    name: str
    bf16_tflops: float
    hbm_GB: float
    hbm_TBps: float
    intra_node_GBps: float
    inter_node_GBps: float
    devices_per_node: int
    int8_tflops: float = 0.0
    gemm_efficiency: float = 0.7
    attention_efficiency: float = 0.5
    memory_efficiency: float = 0.8
    step_overhead_s: float = 0.002
    seq_overhead_s: float = 0.0
    reserved_GB: float = 2.0

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"hardware {self.name!r}: {field} {why}, got {getattr(self, field)!r}")

        if not self.name:
            raise ValueError("hardware: name must be a non-empty string")
        for field in ("bf16_tflops", "hbm_GB", "hbm_TBps", "intra_node_GBps", "inter_node_GBps"):
            if not getattr(self, field) > 0:
                fail(field, "must be > 0")
        if self.devices_per_node < 1:
            fail("devices_per_node", "must be >= 1")
        if self.int8_tflops < 0:
            fail("int8_tflops", "must be >= 0 (0 = no 8-bit speed-up)")
        for field in ("gemm_efficiency", "attention_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, field) <= 1:
                fail(field, "must be in (0, 1]")
        for field in ("step_overhead_s", "seq_overhead_s"):
            if getattr(self, field) < 0:
                fail(field, "must be >= 0")
        if not 0 <= self.reserved_GB < self.hbm_GB:
            fail("reserved_GB", f"must be in [0, hbm_GB={self.hbm_GB})")

    def gemm_flops(self, weight_bytes: float) -> float:
        """Achievable GEMM FLOP/s for weights of ``weight_bytes`` bytes each."""
        peak = self.int8_tflops if weight_bytes <= 1 and self.int8_tflops > 0 else self.bf16_tflops
        return peak * 1e12 * self.gemm_efficiency

    @property
    def attention_flops(self) -> float:
        """Achievable attention FLOP/s (BF16 kernels)."""
        return self.bf16_tflops * 1e12 * self.attention_efficiency

    @property
    def memory_Bps(self) -> float:
        """Achievable HBM read bandwidth, bytes/s."""
        return self.hbm_TBps * 1e12 * self.memory_efficiency
