"""Roofline step time of one engine instance: every operator takes max(compute, memory) time on the busiest device;
communication and a fixed per-step overhead are added on top."""
from __future__ import annotations

from omnisim.cost.hardware_spec import HardwareSpec
from omnisim.cost.kv_capacity import kv_shards
from omnisim.cost.model_spec import ModelSpec
from omnisim.cost.parallelism import Parallelism

# Operators, in breakdown() order; the first five are (compute, memory) rooflines, the next two communication.
COMPUTE_OPS = ("dense_gemm", "lm_head", "prefill_attention", "decode_attention", "moe")
COMM_OPS = ("ep_all_to_all", "tp_all_reduce")
ACTIVATION_BYTES = 2.0  # BF16 activations on the wire for TP all-reduce


class RooflineModel:
    """StepTimeModel from first principles (conf/cost/roofline.yaml; the app fills model, hardware, parallel).

    What one step costs, per device of the instance (tp * dp devices; the batch is spread evenly over DP ranks):
    - dense_gemm: attention projections (MLA's low-rank ones included), dense FFN layers, shared experts and routers:
      FLOPs 2 * params per token split over tp * dp, weights (split over tp) read once per step.
    - lm_head: logits for the decode sequences (and one per step for prefill).
    - prefill_attention: FLOPs from query-key pairs (``prefill_attention``) plus, for MLA, the kv up-projection of
      every context token; bytes: the KV of ``prefill_context`` tokens read and of the new tokens written.
    - decode_attention: FLOPs per context token (MLA in absorbed form: 576 + 512 wide per head), KV bytes read.
      GQA's KV splits over min(tp, kv_heads); MLA's latent is read whole by every TP rank; DP ranks split sequences.
    - moe: tokens * top_k expert assignments; with ep > 1 the busiest rank carries mean * moe_imbalance; the
      weights of the experts a step touches are read once (expected fraction 1 - (1 - top_k/E)^tokens), so small
      batches are memory bound and large ones grouped-GEMM compute bound.
    - ep_all_to_all (ep > 1): dispatch (``dispatch_bytes`` per value) + combine (``combine_bytes``) of the busiest
      rank's remote assignments, over the scale-up link for peers in the node and scale-out for the rest.
    - tp_all_reduce (tp > 1): two ring all-reduces of BF16 activations per layer.
    Knobs: ``comm_overlap`` (fraction of communication hidden behind compute, e.g. DeepSeek's two-micro-batch
    overlap; never more than the compute time), ``collective_latency_s`` (fixed cost of one collective),
    ``overhead_s`` / ``seq_overhead_s`` (engine overhead per step and per sequence of a DP rank; None = the
    hardware's step_overhead_s / seq_overhead_s; a prefill counts as one sequence), ``dispatch_bytes`` (None = the
    model's dtype_bytes: 8-bit models dispatch 8-bit activations), ``combine_bytes``.
    ``moe_imbalance`` only matters with ep > 1 (without EP every device holds a slice of every expert).
    """

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, parallel: Parallelism | None = None,
                 comm_overlap: float = 0.0, collective_latency_s: float = 10e-6, overhead_s: float | None = None,
                 seq_overhead_s: float | None = None, dispatch_bytes: float | None = None,
                 combine_bytes: float = 2.0) -> None:
        parallel = parallel if parallel is not None else Parallelism()
        if not isinstance(model, ModelSpec) or not isinstance(hardware, HardwareSpec) \
                or not isinstance(parallel, Parallelism):
            raise ValueError("cost: RooflineModel needs model=ModelSpec, hardware=HardwareSpec, parallel=Parallelism")
        if parallel.ep > 1 and not model.is_moe:
            raise ValueError(f"cost: parallel.ep={parallel.ep} but model {model.name!r} is dense (num_experts=0)")
        if not 0.0 <= comm_overlap <= 1.0:
            raise ValueError(f"cost: comm_overlap must be in [0, 1], got {comm_overlap}")
        if collective_latency_s < 0:
            raise ValueError(f"cost: collective_latency_s must be >= 0, got {collective_latency_s}")
        for name, value in (("overhead_s", overhead_s), ("seq_overhead_s", seq_overhead_s)):
            if value is not None and value < 0:
                raise ValueError(f"cost: {name} must be >= 0 or null, got {value}")
        dispatch_bytes = model.dtype_bytes if dispatch_bytes is None else dispatch_bytes
        if dispatch_bytes <= 0 or combine_bytes <= 0:
            raise ValueError(f"cost: dispatch_bytes and combine_bytes must be > 0, got {dispatch_bytes}, "
                             f"{combine_bytes}")
        self.model, self.hardware, self.parallel = model, hardware, parallel
        self.comm_overlap = comm_overlap
        self.collective_latency_s = collective_latency_s
        self.overhead_s = hardware.step_overhead_s if overhead_s is None else overhead_s
        self.seq_overhead_s = hardware.seq_overhead_s if seq_overhead_s is None else seq_overhead_s
        self.dispatch_bytes, self.combine_bytes = dispatch_bytes, combine_bytes

        m, hw = model, hardware
        tp, dp, ep, devices = parallel.tp, parallel.dp, parallel.ep, parallel.devices
        gemm = hw.gemm_flops(m.dtype_bytes)
        attn = hw.attention_flops
        mem = hw.memory_Bps
        # Every coefficient below is "seconds per unit of one step_time argument" on the busiest device.
        dense_params = (m.layers * m.attention_params + m.dense_layers * m.dense_ffn_params
                        + m.moe_layers * (m.shared_expert_params + m.router_params))
        self._dense_flop_s = 2.0 * dense_params / devices / gemm
        self._dense_weight_s = dense_params * m.dtype_bytes / tp / mem
        lm_params = m.vocab * m.hidden
        self._lm_flop_s = 2.0 * lm_params / devices / gemm
        self._lm_weight_s = lm_params * m.dtype_bytes / tp / mem
        self._seq_s = self.seq_overhead_s / dp

        if m.attention == "mla":
            heads_pair = m.heads * m.layers
            prefill_pair = 2.0 * heads_pair * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
            decode_pair = 2.0 * heads_pair * (m.kv_values_per_token_layer + m.kv_lora_rank)
        else:
            prefill_pair = decode_pair = 4.0 * m.heads * m.attention_head_dim * m.layers
        self._prefill_pair_s = prefill_pair / devices / attn
        self._kv_up_s = 2.0 * m.mla_kv_up_params * m.layers / devices / gemm  # MLA: per cached context token
        self._decode_pair_s = decode_pair / devices / attn
        self._kv_byte_s = m.kv_bytes_per_token / kv_shards(m, parallel) / dp / mem

        self._moe_on = m.is_moe
        self._ep_on = ep > 1
        self._moe_flop_s = 2.0 * m.top_k * m.expert_params * m.moe_layers / devices / gemm if m.is_moe else 0.0
        expert_shards = devices if ep > 1 else tp
        self._moe_weight_s = m.routed_expert_params * m.dtype_bytes / expert_shards / mem
        self._expert_miss = 1.0 - m.top_k / m.num_experts if m.is_moe else 1.0
        self._moe_token_div = 1.0 if ep > 1 else float(dp)  # tokens one device's experts see

        if ep > 1:
            in_node = min(ep, hw.devices_per_node)
            link_s_per_byte = max((in_node - 1) / ep / (hw.intra_node_GBps * 1e9),
                                  (ep - in_node) / ep / (hw.inter_node_GBps * 1e9))
            per_assignment = m.hidden * (dispatch_bytes + combine_bytes) * m.moe_layers
            self._a2a_s = m.top_k / ep * per_assignment * link_s_per_byte
            self._a2a_latency_s = 2.0 * m.moe_layers * collective_latency_s
        else:
            self._a2a_s = self._a2a_latency_s = 0.0
        if tp > 1:
            bw = (hw.intra_node_GBps if tp <= hw.devices_per_node else hw.inter_node_GBps) * 1e9
            ring = 2.0 * (tp - 1) / tp
            self._ar_s = 2.0 * m.layers * ring * m.hidden * ACTIVATION_BYTES / dp / bw
            self._ar_latency_s = 2.0 * m.layers * collective_latency_s
        else:
            self._ar_s = self._ar_latency_s = 0.0

    # ---- the hot path: called once per engine step; keep it to plain float arithmetic --------------------------
    def step_time(self, prefill_tokens: int, prefill_attention: float, prefill_context: int,
                  decode_seqs: int, decode_context: int, moe_imbalance: float = 1.0) -> float:
        tokens = prefill_tokens + decode_seqs
        a = tokens * self._dense_flop_s
        b = self._dense_weight_s
        total = a if a > b else b
        seqs = decode_seqs + 1 if prefill_tokens else decode_seqs  # logits and engine work per sequence
        a = seqs * self._lm_flop_s
        b = self._lm_weight_s
        total += a if a > b else b
        if prefill_tokens:
            a = prefill_attention * self._prefill_pair_s + (prefill_context - prefill_tokens) * self._kv_up_s
            b = (prefill_context + prefill_tokens) * self._kv_byte_s
            total += a if a > b else b
        if decode_seqs:
            a = decode_context * self._decode_pair_s
            b = (decode_context + decode_seqs) * self._kv_byte_s
            total += a if a > b else b
        comm = 0.0
        if self._moe_on:
            if self._ep_on:
                load = tokens * moe_imbalance
                comm = load * self._a2a_s + self._a2a_latency_s
            else:
                load = tokens
            a = load * self._moe_flop_s
            b = self._moe_weight_s * (1.0 - self._expert_miss ** (tokens / self._moe_token_div))
            total += a if a > b else b
        if self._ar_s:
            comm += tokens * self._ar_s + self._ar_latency_s
        if comm:
            hidden = self.comm_overlap * (comm if comm < total else total)
            total += comm - hidden
        return total + self.overhead_s + seqs * self._seq_s

    # ---- explanations (allocate freely: not on the hot path) ---------------------------------------------------
    def bounds(self, prefill_tokens: int, prefill_attention: float, prefill_context: int, decode_seqs: int,
               decode_context: int, moe_imbalance: float = 1.0) -> dict[str, tuple[float, float]]:
        """(compute seconds, memory seconds) of each roofline operator; the larger one is its time."""
        tokens = prefill_tokens + decode_seqs
        lm_tokens = decode_seqs + (1 if prefill_tokens else 0)
        out = {
            "dense_gemm": (tokens * self._dense_flop_s, self._dense_weight_s),
            "lm_head": (lm_tokens * self._lm_flop_s, self._lm_weight_s),
            "prefill_attention": (
                (prefill_attention * self._prefill_pair_s + (prefill_context - prefill_tokens) * self._kv_up_s,
                 (prefill_context + prefill_tokens) * self._kv_byte_s) if prefill_tokens else (0.0, 0.0)),
            "decode_attention": (
                (decode_context * self._decode_pair_s, (decode_context + decode_seqs) * self._kv_byte_s)
                if decode_seqs else (0.0, 0.0)),
            "moe": (0.0, 0.0),
        }
        if self._moe_on:
            load = tokens * (moe_imbalance if self._ep_on else 1.0)
            touched = 1.0 - self._expert_miss ** (tokens / self._moe_token_div)
            out["moe"] = (load * self._moe_flop_s, self._moe_weight_s * touched)
        return out

    def breakdown(self, prefill_tokens: int, prefill_attention: float, prefill_context: int, decode_seqs: int,
                  decode_context: int, moe_imbalance: float = 1.0) -> dict[str, float]:
        """Seconds per operator (communication as exposed after overlap) plus "overhead"; the values sum to
        step_time() of the same arguments."""
        args = (prefill_tokens, prefill_attention, prefill_context, decode_seqs, decode_context, moe_imbalance)
        out = {op: max(pair) for op, pair in self.bounds(*args).items()}
        compute = sum(out.values())
        tokens = prefill_tokens + decode_seqs
        a2a = tokens * moe_imbalance * self._a2a_s + self._a2a_latency_s if self._ep_on else 0.0
        ar = tokens * self._ar_s + self._ar_latency_s if self._ar_s else 0.0
        comm = a2a + ar
        exposed = 1.0 - self.comm_overlap * min(comm, compute) / comm if comm else 0.0
        out["ep_all_to_all"] = a2a * exposed
        out["tp_all_reduce"] = ar * exposed
        out["overhead"] = self.overhead_s + (decode_seqs + (1 if prefill_tokens else 0)) * self._seq_s
        return out

    # ---- conveniences --------------------------------------------------------------------------------------------
    def prefill_time(self, tokens: int, cached: int = 0) -> float:
        """One prefill chunk of ``tokens`` new tokens after ``cached`` already-cached ones, alone in its step."""
        return self.step_time(tokens, tokens * (cached + (tokens + 1) / 2), cached + tokens, 0, 0)

    def decode_time(self, seqs: int, context: int, moe_imbalance: float = 1.0) -> float:
        """One decode step of ``seqs`` sequences of ``context`` tokens each."""
        return self.step_time(0, 0.0, 0, seqs, seqs * context, moe_imbalance)

    def __repr__(self) -> str:
        p = self.parallel
        return f"RooflineModel({self.model.name}, {self.hardware.name}, tp={p.tp}, dp={p.dp}, ep={p.ep})"
