"""One accelerator (or this CPU VM) as the cost model sees it: peaks, memory, links, achievable fractions."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareSpec:
    """Per-device numbers (conf/hardware/NAME.yaml names the source of each one).

    Peaks: bf16_tflops (dense BF16), int8_tflops (dense 8-bit GEMM: FP8 on Hopper, INT8 on Ascend / A100; used when
    the model's weights are 8-bit; 0 = no faster 8-bit path), hbm_GB / hbm_TBps (device memory, its bandwidth),
    intra_node_GBps (scale-up link per device per direction: NVLink, HCCS, UB), inter_node_GBps (scale-out per
    device per direction: IB, RoCE), devices_per_node (devices sharing the scale-up domain).
    Kernels (fractions of those peaks, each the asymptote of a published kernel benchmark):
    - gemm_efficiency / int8_gemm_efficiency: large BF16 / 8-bit GEMMs (0 for the 8-bit one = the BF16 figure);
      memory_efficiency: HBM streaming of weights; elementwise_efficiency: HBM reached by the small kernels (norms,
      rope, activation functions: one thread block per token, below a GEMM's streaming; 0 = memory_efficiency).
    - roofline_smoothing n: an operator with compute time C and memory time M takes (C^n + M^n)^(1/n) (a smooth
      maximum: n = inf is the plain roofline max(C, M), n = 1 no overlap at all), plus kernel_latency_s per kernel
      (the fixed cost of one kernel launch: ramp-up and tail; Hockney's t0). Never below max(C, M).
    - attention_efficiency: prefill (FlashAttention-class) attention, fraction of the BF16 peak;
      decode_attention_efficiency: paged decode attention, fraction of HBM bandwidth reached reading the KV cache;
      mla_decode_efficiency: MLA absorbed decode (FlashMLA-class, 576/512-wide heads), fraction of the BF16 peak.
    Collectives (alpha-beta per collective): collective_base_s (fixed cost of one collective: launch, sync),
    link_latency_s / net_latency_s (alpha per ring step inside / across nodes), bus_efficiency / net_efficiency
    (all-reduce bus bandwidth reached, fraction of the link's), a2a_efficiency (EP dispatch/combine bandwidth
    reached, fraction of the link's). Those describe the latency path; a TP all-reduce inside a node of at least
    bulk_allreduce_bytes per rank (0 = never) runs the bandwidth path instead, with its own bulk_collective_base_s,
    bulk_link_latency_s and bulk_bus_efficiency (vLLM hands messages under its custom all-reduce's limit to that
    kernel and larger ones to NCCL's ring, whose pipeline costs tens of microseconds to fill).
    Engine: step_overhead_s (fixed engine cost per step: scheduler, input prep, sampling, output processing);
    seq_overhead_s (engine cost per sequence in a step, per DP rank: each runs its own engine loop).
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
    int8_gemm_efficiency: float = 0.0
    memory_efficiency: float = 0.8
    elementwise_efficiency: float = 0.0
    roofline_smoothing: float = math.inf
    kernel_latency_s: float = 0.0
    attention_efficiency: float = 0.5
    decode_attention_efficiency: float = 0.8
    mla_decode_efficiency: float = 0.5
    collective_base_s: float = 0.0
    link_latency_s: float = 0.0
    net_latency_s: float = 0.0
    bus_efficiency: float = 1.0
    net_efficiency: float = 1.0
    a2a_efficiency: float = 1.0
    bulk_allreduce_bytes: float = 0.0
    bulk_collective_base_s: float = 0.0
    bulk_link_latency_s: float = 0.0
    bulk_bus_efficiency: float = 1.0
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
        for field in ("gemm_efficiency", "memory_efficiency", "attention_efficiency", "decode_attention_efficiency",
                      "mla_decode_efficiency", "bus_efficiency", "net_efficiency", "a2a_efficiency",
                      "bulk_bus_efficiency"):
            if not 0 < getattr(self, field) <= 1:
                fail(field, "must be in (0, 1]")
        if not 0 <= self.int8_gemm_efficiency <= 1:
            fail("int8_gemm_efficiency", "must be in [0, 1] (0 = gemm_efficiency)")
        if not 0 <= self.elementwise_efficiency <= 1:
            fail("elementwise_efficiency", "must be in [0, 1] (0 = memory_efficiency)")
        if not self.roofline_smoothing >= 1:
            fail("roofline_smoothing", "must be >= 1 (1 = compute and memory never overlap, inf = max of the two)")
        for field in ("kernel_latency_s", "collective_base_s", "link_latency_s", "net_latency_s", "step_overhead_s",
                      "seq_overhead_s", "bulk_allreduce_bytes", "bulk_collective_base_s", "bulk_link_latency_s"):
            if not getattr(self, field) >= 0:
                fail(field, "must be >= 0")
        if not 0 <= self.reserved_GB < self.hbm_GB:
            fail("reserved_GB", f"must be in [0, hbm_GB={self.hbm_GB})")

    def gemm_flops(self, weight_bytes: float) -> float:
        """Achievable GEMM FLOP/s for weights of ``weight_bytes`` bytes each."""
        if weight_bytes <= 1 and self.int8_tflops > 0:
            return self.int8_tflops * 1e12 * (self.int8_gemm_efficiency or self.gemm_efficiency)
        return self.bf16_tflops * 1e12 * self.gemm_efficiency

    @property
    def attention_flops(self) -> float:
        """Achievable prefill attention FLOP/s (BF16 kernels)."""
        return self.bf16_tflops * 1e12 * self.attention_efficiency

    @property
    def mla_decode_flops(self) -> float:
        """Achievable FLOP/s of MLA's absorbed decode attention (BF16)."""
        return self.bf16_tflops * 1e12 * self.mla_decode_efficiency

    @property
    def memory_Bps(self) -> float:
        """Achievable HBM read bandwidth, bytes/s."""
        return self.hbm_TBps * 1e12 * self.memory_efficiency

    @property
    def elementwise_Bps(self) -> float:
        """HBM bandwidth the small kernels (norms, rope, activation functions) reach, bytes/s."""
        return self.hbm_TBps * 1e12 * (self.elementwise_efficiency or self.memory_efficiency)
