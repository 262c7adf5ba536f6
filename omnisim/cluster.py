"""The serving cluster's shape: xPyD (or colocated) instance groups, their parallelism and engine limits."""
from __future__ import annotations

from dataclasses import dataclass, field


DP_MODES = ("split", "ranks")


@dataclass(frozen=True)
class InstanceGroup:
    """``count`` identical engine instances, each on ``tp * dp`` devices.

    tp: tensor parallel; dp: attention data parallel inside the instance; ep: expert parallel degree of the MoE
    layers (1 for dense models; at most tp * dp). Engine limits follow vLLM's names.
    ``kv_capacity_tokens`` overrides the capacity derived from device memory (0 = derive). As in vLLM, an instance
    whose KV cannot hold one ``max_model_len`` sequence does not start, and longer requests are rejected.
    ``dp_mode`` (dp > 1): "split" runs one scheduler whose batch is spread evenly over the ranks (``max_num_seqs``,
    ``max_num_batched_tokens`` and the KV are the instance's); "ranks" runs each DP rank as its own engine core, as
    vLLM does: its own scheduler, KV (the instance's split evenly) and limits (``max_num_seqs`` and
    ``max_num_batched_tokens`` are then per rank, vLLM's meaning), requests given to the rank with the least
    ``4 * waiting + running`` (vLLM's DP load balancer), and every step waits for the slowest rank (the MoE layers'
    collectives join all ranks).
    """

    count: int = 1
    tp: int = 1
    dp: int = 1
    ep: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_capacity_tokens: int = 0
    max_model_len: int = 32768
    enable_prefix_caching: bool = True
    dp_mode: str = "split"

    def __post_init__(self) -> None:
        for name in ("count", "tp", "dp", "ep", "max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster: {name} must be >= 1, got {getattr(self, name)}")
        if self.ep > self.tp * self.dp:
            raise ValueError(f"cluster: ep={self.ep} exceeds the instance's devices tp*dp={self.tp * self.dp}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"cluster: gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_capacity_tokens < 0:
            raise ValueError(f"cluster: kv_capacity_tokens must be >= 0, got {self.kv_capacity_tokens}")
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"cluster: dp_mode must be one of {', '.join(DP_MODES)}, got {self.dp_mode!r}")

    @property
    def engine_cores(self) -> int:
        """Schedulers one instance runs: its dp ranks with dp_mode=ranks, else one."""
        return self.dp if self.dp_mode == "ranks" else 1

    @property
    def rank_max_num_seqs(self) -> int:
        """``--max-num-seqs`` of one of vLLM's DP engine cores for this group (split: the instance's share)."""
        return self.max_num_seqs if self.dp_mode == "ranks" else -(-self.max_num_seqs // self.dp)

    @property
    def devices(self) -> int:
        return self.tp * self.dp

    @property
    def parallelism(self):
        from omnisim.cost import Parallelism

        return Parallelism(tp=self.tp, dp=self.dp, ep=self.ep)

    def kv_capacity(self, model, hardware) -> int:
        """KV tokens one instance holds: the override, or what device memory leaves after the weights."""
        if self.kv_capacity_tokens:
            return self.kv_capacity_tokens
        from omnisim.cost import kv_capacity_tokens

        return kv_capacity_tokens(model, hardware, self.parallelism, self.gpu_memory_utilization)


@dataclass(frozen=True)
class KVLink:
    """Path of KV from a prefill to a decode instance: per-prefill-instance egress bandwidth, shared FIFO."""

    bandwidth_GBps: float = 50.0
    latency_s: float = 0.0005

    def __post_init__(self) -> None:
        if self.bandwidth_GBps <= 0 or self.latency_s < 0:
            raise ValueError(f"cluster.kv_link: bandwidth_GBps must be > 0 and latency_s >= 0, got {self}")

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / (self.bandwidth_GBps * 1e9)


@dataclass(frozen=True)
class ClusterSpec:
    """Either disaggregated (``prefill`` and ``decode`` groups) or colocated (``mixed``), not both."""

    prefill: InstanceGroup | None = None
    decode: InstanceGroup | None = None
    mixed: InstanceGroup | None = None
    kv_link: KVLink = field(default_factory=KVLink)
    name: str = ""

    def __post_init__(self) -> None:
        pd = self.prefill is not None or self.decode is not None
        if pd and self.mixed is not None:
            raise ValueError("cluster: give either prefill+decode (disaggregated) or mixed (colocated), not both")
        if pd and (self.prefill is None or self.decode is None):
            raise ValueError("cluster: a disaggregated cluster needs both a prefill and a decode group")
        if not pd and self.mixed is None:
            raise ValueError("cluster: no instances (give prefill+decode or mixed)")

    @property
    def disaggregated(self) -> bool:
        return self.mixed is None

    @property
    def block_size(self) -> int:
        """The KV block size every instance uses (KV moves block by block between prefill and decode)."""
        sizes = {g.block_size for _, g in self.groups()}
        if len(sizes) > 1:
            raise ValueError(f"cluster: prefill and decode block_size differ ({sorted(sizes)}); KV moves block by block")
        return sizes.pop()

    def check_model(self, model) -> None:
        """As vLLM checks at start-up: each group's tensor parallelism splits the model's attention heads evenly
        (and its KV heads, or replicates them when tp exceeds them)."""
        heads, kv_heads = getattr(model, "heads", 0), getattr(model, "kv_heads", 0)
        for role, g in self.groups():
            if heads and (g.tp > heads or heads % g.tp):
                raise ValueError(f"cluster.{role}.tp={g.tp} does not divide the {heads} attention heads of "
                                 f"{getattr(model, 'name', 'the model')}")
            if kv_heads and kv_heads % g.tp and g.tp % kv_heads:
                raise ValueError(f"cluster.{role}.tp={g.tp}: the {kv_heads} KV heads of "
                                 f"{getattr(model, 'name', 'the model')} can be neither split nor replicated evenly")

    @property
    def devices(self) -> int:
        """Devices the cluster occupies: every instance's tp * dp."""
        return sum(g.count * g.devices for _, g in self.groups())

    def groups(self) -> list[tuple[str, InstanceGroup]]:
        """(role name, group) pairs: instance ids are f"{role}-{index}"."""
        if self.disaggregated:
            return [("prefill", self.prefill), ("decode", self.decode)]
        return [("mixed", self.mixed)]
