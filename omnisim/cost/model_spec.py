"""Shape of a transformer LLM (HuggingFace config.json names in the docstring), and what follows from it: parameter
counts, weight bytes and KV-cache bytes per token."""
from __future__ import annotations

from dataclasses import dataclass

ATTENTION_KINDS = ("gqa", "mla")


@dataclass(frozen=True)
class ModelSpec:
    """One model, as data (conf/model/NAME.yaml).

    Dense fields: ``layers`` (num_hidden_layers), ``hidden`` (hidden_size), ``heads`` (num_attention_heads),
    ``kv_heads`` (num_key_value_heads), ``head_dim`` (0 = hidden // heads), ``intermediate`` (intermediate_size of
    the dense FFN), ``vocab`` (vocab_size), ``tie_embeddings`` (tie_word_embeddings).
    ``dtype_bytes``: bytes per weight as deployed (2 = BF16; 1 = FP8/INT8, e.g. DeepSeek's FP8 checkpoints or
    OmniInfer's W8A8; 8-bit weights also select the hardware's 8-bit GEMM peak). ``kv_dtype_bytes``: bytes per
    cached KV value.
    ``attention``: "gqa" (MHA/GQA/MQA) or "mla" (DeepSeek multi-head latent attention: q_lora_rank, kv_lora_rank,
    qk_nope_head_dim, qk_rope_head_dim, v_head_dim; the cache holds kv_lora_rank + qk_rope_head_dim values per token
    per layer, 512 + 64 = 576 for DeepSeek-V3).
    MoE fields (``num_experts`` 0 = dense): ``top_k`` (num_experts_per_tok), ``expert_intermediate``
    (moe_intermediate_size), ``shared_experts`` (n_shared_experts, each of expert_intermediate width),
    ``first_dense_layers`` (first_k_dense_replace), ``num_expert_groups`` / ``topk_groups`` (n_group / topk_group of
    group-limited routing; 1 / 1 = ungrouped).
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0
    tie_embeddings: bool = False
    dtype_bytes: float = 2.0
    kv_dtype_bytes: float = 2.0
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_experts: int = 0
    first_dense_layers: int = 0
    num_expert_groups: int = 1
    topk_groups: int = 1

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"model {self.name!r}: {field} {why}, got {getattr(self, field)!r}")

        if not self.name:
            raise ValueError("model: name must be a non-empty string")
        for field in ("layers", "hidden", "heads", "kv_heads", "vocab"):
            if getattr(self, field) < 1:
                fail(field, "must be >= 1")
        for field in ("head_dim", "intermediate", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                      "qk_rope_head_dim", "v_head_dim", "num_experts", "top_k", "expert_intermediate",
                      "shared_experts", "first_dense_layers"):
            if getattr(self, field) < 0:
                fail(field, "must be >= 0")
        for field in ("dtype_bytes", "kv_dtype_bytes"):
            if not 0 < getattr(self, field) <= 8:
                fail(field, "must be in (0, 8]")
        if self.attention not in ATTENTION_KINDS:
            fail("attention", f"must be one of {ATTENTION_KINDS}")
        if self.attention == "gqa":
            if self.heads % self.kv_heads:
                fail("kv_heads", f"must divide heads={self.heads}")
            if self.head_dim == 0 and self.hidden % self.heads:
                fail("head_dim", f"is 0 (derive hidden // heads) but heads={self.heads} does not divide hidden")
        else:
            for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, field) < 1:
                    fail(field, "must be >= 1 for attention='mla'")
        if self.num_experts == 0:
            if self.intermediate < 1:
                fail("intermediate", "must be >= 1 for a dense model (num_experts=0)")
            if self.top_k or self.shared_experts or self.first_dense_layers:
                fail("num_experts", "is 0 (dense) but top_k/shared_experts/first_dense_layers are set")
        else:
            if not 1 <= self.top_k <= self.num_experts:
                fail("top_k", f"must be in [1, num_experts={self.num_experts}]")
            if self.expert_intermediate < 1:
                fail("expert_intermediate", "must be >= 1 for an MoE model")
            if self.first_dense_layers >= self.layers:
                fail("first_dense_layers", f"must be < layers={self.layers}")
            if self.first_dense_layers and self.intermediate < 1:
                fail("intermediate", "must be >= 1 when first_dense_layers > 0")
            if self.num_expert_groups < 1 or self.num_experts % self.num_expert_groups:
                fail("num_expert_groups", f"must be >= 1 and divide num_experts={self.num_experts}")
            if not 1 <= self.topk_groups <= self.num_expert_groups:
                fail("topk_groups", f"must be in [1, num_expert_groups={self.num_expert_groups}]")

    # ---- layer structure -------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layers(self) -> int:
        """Layers whose FFN is a routed-expert MoE."""
        return self.layers - self.first_dense_layers if self.is_moe else 0

    @property
    def dense_layers(self) -> int:
        """Layers with a dense FFN of width ``intermediate``."""
        return self.layers - self.moe_layers

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    # ---- parameter counts (norms and biases are left out: < 0.1% of any model here) ---------------------------
    @property
    def attention_params(self) -> int:
        """Projection weights of one attention layer (for MLA incl. the low-rank q/kv down and up projections)."""
        h = self.hidden
        if self.attention == "gqa":
            d = self.attention_head_dim
            return h * self.heads * d * 2 + h * self.kv_heads * d * 2
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = h * self.q_lora_rank + self.q_lora_rank * self.heads * qk if self.q_lora_rank else h * self.heads * qk
        return q + h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.mla_kv_up_params + \
            self.heads * self.v_head_dim * h

    @property
    def mla_kv_up_params(self) -> int:
        """MLA's kv_b_proj (latent -> per-head K_nope and V); 0 for GQA. Prefill applies it to every context token,
        decode absorbs it into the query and output (same FLOPs per query token)."""
        if self.attention != "mla":
            return 0
        return self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)

    @property
    def dense_ffn_params(self) -> int:
        return 3 * self.hidden * self.intermediate  # gate, up, down (SwiGLU)

    @property
    def expert_params(self) -> int:
        """One routed expert of one layer."""
        return 3 * self.hidden * self.expert_intermediate

    @property
    def shared_expert_params(self) -> int:
        """All shared experts of one MoE layer."""
        return self.shared_experts * self.expert_params

    @property
    def router_params(self) -> int:
        return self.hidden * self.num_experts

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    @property
    def routed_expert_params(self) -> int:
        """All routed experts of all MoE layers: the part expert parallelism shards."""
        return self.moe_layers * self.num_experts * self.expert_params

    @property
    def total_params(self) -> int:
        return (self.embedding_params + self.lm_head_params + self.layers * self.attention_params
                + self.dense_layers * self.dense_ffn_params
                + self.moe_layers * (self.shared_expert_params + self.router_params) + self.routed_expert_params)

    @property
    def active_params(self) -> int:
        """Parameters one token touches (embedding row and LM head included, the published convention: ~37B for
        DeepSeek-V3, ~22B for Qwen3-235B-A22B)."""
        return (self.embedding_params + self.vocab * self.hidden + self.layers * self.attention_params
                + self.dense_layers * self.dense_ffn_params
                + self.moe_layers * (self.top_k * self.expert_params + self.shared_expert_params + self.router_params))

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.dtype_bytes

    # ---- KV cache ----------------------------------------------------------------------------------------------
    @property
    def kv_values_per_token_layer(self) -> int:
        """Cached values per token per layer: 2 * kv_heads * head_dim (GQA) or kv_lora_rank + qk_rope_head_dim
        (MLA)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_heads * self.attention_head_dim

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes of one token over all layers (whole model, before any TP split)."""
        return self.layers * self.kv_values_per_token_layer * self.kv_dtype_bytes
