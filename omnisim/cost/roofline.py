"""Roofline step time of one engine instance, per operator on the busiest device: a smooth roofline of compute and
memory time, a fixed cost per kernel, alpha-beta collectives, a fixed engine cost per step, and MTP verification.
Every coefficient comes from the hardware profile (conf/hardware/NAME.yaml names the source of each)."""
from __future__ import annotations

import math

from omnisim.cost.hardware_spec import HardwareSpec
from omnisim.cost.kv_capacity import kv_shards
from omnisim.cost.model_spec import ModelSpec
from omnisim.cost.parallelism import Parallelism

# Operators, in breakdown() order: five (compute, memory) rooflines, the small kernels, MTP's draft, communication.
COMPUTE_OPS = ("dense_gemm", "lm_head", "prefill_attention", "decode_attention", "moe")
FIXED_OPS = ("elementwise", "mtp_draft")
COMM_OPS = ("ep_all_to_all", "tp_all_reduce")
MOE_DISPATCH = ("auto", "all_to_all")  # RooflineModel's moe_dispatch
ACTIVATION_BYTES = 2.0  # BF16 activations: TP all-reduce messages, norms, rope, activation functions

# Kernels one step launches per layer, from the layer's structure as vLLM / SGLang run it (QKV or the fused MLA
# down-projection, q up-projection, MLA's absorbed W_UK / W_UV, output projection, FFN GEMMs; norms with the fused
# residual add, rope, KV-cache write, activation, router top-k, token permute/unpermute) and per step (embedding,
# final norm, LM head, sampling). Each one costs the hardware's kernel_latency_s on top of its roofline time.
KERNELS_GQA_ATTENTION = 2 + 3 + 1         # qkv, o | norm, rope, kv write | attention
KERNELS_MLA_ATTENTION = 5 + 5 + 1         # q_a+kv_a, q_b, W_UK, W_UV, o | norm, q_a norm, kv_a norm, rope, kv write
KERNELS_DENSE_FFN = 2 + 2                 # gate_up, down | norm, activation
KERNELS_MOE_FFN = 5 + 6                   # router, shared gate_up/down, routed gate_up/down | norm, top-k, 2 acts,
#                                           permute, unpermute
KERNELS_PER_STEP = 6                      # embedding, final norm, LM head, sampling (3)


def _smooth_max(n: float):
    """(c, m) -> (c^n + m^n)^(1/n): never below max(c, m), equal to it when n is inf, c + m when n is 1."""
    if math.isinf(n):
        return max
    if n == 2.0:
        return math.hypot
    inv = 1.0 / n
    return lambda c, m: (c ** n + m ** n) ** inv


class RooflineModel:
    """StepTimeModel from first principles (conf/cost/roofline.yaml; the app fills model, hardware, parallel).

    What one step costs, per device of the instance (tp * dp devices; the batch is spread evenly over DP ranks).
    Each roofline operator takes smooth(C, M) = (C^n + M^n)^(1/n) of its compute time C and memory time M
    (``roofline_smoothing`` n of the hardware; near the ridge point neither peak is reached):
    - dense_gemm: attention projections (MLA's low-rank ones included), dense FFN layers, shared experts and routers:
      FLOPs 2 * params per token split over tp * dp, weights (split over tp) read once per step.
    - lm_head: logits for the decode sequences (and one per step for prefill).
    - prefill_attention: FLOPs from query-key pairs (``prefill_attention``) at the FlashAttention-class efficiency,
      plus, for MLA, the kv up-projection of every cached context token; bytes: the KV of ``prefill_context``
      tokens read and of the new tokens written.
    - decode_attention: per context token, smooth(FLOPs, KV bytes) at the paged-decode kernel's efficiencies (MLA in
      absorbed form: 576 + 512 wide per head, FlashMLA-class compute efficiency); both grow with the context, so the
      smoothing gives a constant per context token and the step stays affine in the context (the simulator's
      closed-form decode runs rely on that). GQA's KV splits over min(tp, kv_heads); MLA's latent is read whole by
      every TP rank; DP ranks split sequences.
    - moe: tokens * top_k expert assignments; with ep > 1 the busiest rank carries mean * moe_imbalance; the
      weights of the experts a step touches are read once (expected fraction 1 - (1 - top_k/E)^tokens), so small
      batches are memory bound and large ones grouped-GEMM compute bound.
    - elementwise: every kernel's fixed cost (kernel_latency_s times the kernels per step, see KERNELS_*), plus the
      activation traffic of norms, rope and activation functions per token (``activation_bytes_per_token``: rope
      and activations on a TP rank's heads and width) at the hardware's elementwise_efficiency of HBM.
    - ep_all_to_all (ep > 1, tokens dispatched: see ``moe_dispatch``): per MoE layer, dispatch (``dispatch_bytes``
      per value) and combine (``combine_bytes``) of the busiest rank's remote assignments at a2a_efficiency of the
      scale-up link for peers in the node and of scale-out for the rest, each plus one collective's latency.
    - tp_all_reduce (tp > 1): two ring all-reduces of BF16 activations per layer, alpha-beta
      (``all_reduce_s``): base + 2(tp-1) * alpha + 2(tp-1)/tp * bytes / (link * bus_efficiency), inside a node on
      the latency path's coefficients below the hardware's bulk_allreduce_bytes per rank and the bandwidth path's
      (bulk_*) from there.
    - MTP / speculative decoding (``mtp_tokens`` k > 0): every decode sequence verifies k + 1 tokens per step (k + 1
      query tokens through every GEMM, MoE and collective; attention reads each KV once for all of them), and the
      draft module (one more layer and the LM head per draft token, DeepSeek-V3's MTP) runs k times; a step yields
      ``tokens_per_step`` = 1 + a + ... + a^k tokens per sequence on average (a = ``mtp_acceptance``). The engine
      advances one token per step, so a decode-only step is charged verification time / tokens_per_step: TPOT,
      throughput and KV growth per second come out as with MTP (``verify_time`` is the raw step). Steps with
      prefill are charged in full (conservative).
    Knobs: ``micro_batches`` m (DeepSeek's and CloudMatrix-Infer's overlap of communication with compute: the step
    runs as m micro-batches in a two-stage pipeline, each paying its own weight reads and kernel launches, and takes
    max(C, K) + min(C, K) / m of its total compute C and communication K), or ``comm_overlap`` (a free fraction of
    communication hidden behind compute, never more than the compute time; not with micro_batches),
    ``collective_latency_s`` (None = the hardware's collective_base_s),
    ``overhead_s`` / ``seq_overhead_s`` (engine overhead per step and per sequence of a DP rank; None = the
    hardware's step_overhead_s / seq_overhead_s; a prefill counts as one sequence), ``dispatch_bytes`` (None = the
    model's dtype_bytes: 8-bit models dispatch 8-bit activations), ``combine_bytes``, ``moe_dispatch`` ("auto":
    vLLM's rule, tokens are dispatched to the experts' devices only when attention is data parallel, dp > 1; with one
    DP rank every TP rank holds every token, computes its own experts on them and the TP all-reduce after the MoE
    sums their outputs, so no dispatch is charged; "all_to_all": dispatch and combine whenever ep > 1, as
    OmniInfer's prefill does with TP and EP, ``prefill_moe_all_to_all``).
    ``moe_imbalance`` only matters with ep > 1 (without EP every device holds a slice of every expert).
    """

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, parallel: Parallelism | None = None,
                 comm_overlap: float = 0.0, collective_latency_s: float | None = None, overhead_s: float | None = None,
                 seq_overhead_s: float | None = None, dispatch_bytes: float | None = None,
                 combine_bytes: float = 2.0, mtp_tokens: int = 0, mtp_acceptance: float = 0.0,
                 micro_batches: int = 1, moe_dispatch: str = "auto") -> None:
        parallel = parallel if parallel is not None else Parallelism()
        if not isinstance(model, ModelSpec) or not isinstance(hardware, HardwareSpec) \
                or not isinstance(parallel, Parallelism):
            raise ValueError("cost: RooflineModel needs model=ModelSpec, hardware=HardwareSpec, parallel=Parallelism")
        if parallel.ep > 1 and not model.is_moe:
            raise ValueError(f"cost: parallel.ep={parallel.ep} but model {model.name!r} is dense (num_experts=0)")
        if not 0.0 <= comm_overlap <= 1.0:
            raise ValueError(f"cost: comm_overlap must be in [0, 1], got {comm_overlap}")
        for name, value in (("collective_latency_s", collective_latency_s), ("overhead_s", overhead_s),
                            ("seq_overhead_s", seq_overhead_s)):
            if value is not None and value < 0:
                raise ValueError(f"cost: {name} must be >= 0 or null, got {value}")
        dispatch_bytes = model.dtype_bytes if dispatch_bytes is None else dispatch_bytes
        if dispatch_bytes <= 0 or combine_bytes <= 0:
            raise ValueError(f"cost: dispatch_bytes and combine_bytes must be > 0, got {dispatch_bytes}, "
                             f"{combine_bytes}")
        if isinstance(mtp_tokens, bool) or not isinstance(mtp_tokens, int) or mtp_tokens < 0:
            raise ValueError(f"cost: mtp_tokens must be an integer >= 0 (draft tokens per step), got {mtp_tokens!r}")
        if not 0.0 <= mtp_acceptance < 1.0:
            raise ValueError(f"cost: mtp_acceptance must be in [0, 1), got {mtp_acceptance}")
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"cost: micro_batches must be an integer >= 1, got {micro_batches!r}")
        if moe_dispatch not in MOE_DISPATCH:
            raise ValueError(f"cost: moe_dispatch must be one of {', '.join(MOE_DISPATCH)}, got {moe_dispatch!r}")
        if micro_batches > 1 and comm_overlap:
            raise ValueError("cost: give comm_overlap (a fraction hidden) or micro_batches (a pipeline), not both")
        self.model, self.hardware, self.parallel = model, hardware, parallel
        self.comm_overlap = comm_overlap
        self.collective_latency_s = hardware.collective_base_s if collective_latency_s is None \
            else collective_latency_s
        self.overhead_s = hardware.step_overhead_s if overhead_s is None else overhead_s
        self.seq_overhead_s = hardware.seq_overhead_s if seq_overhead_s is None else seq_overhead_s
        self.dispatch_bytes, self.combine_bytes = dispatch_bytes, combine_bytes
        self.mtp_tokens, self.mtp_acceptance = mtp_tokens, mtp_acceptance
        self.micro_batches = micro_batches
        self._mb_inv = 1.0 / micro_batches
        # expected tokens a sequence gains per verification step: each draft accepted only if all before it were
        self.tokens_per_step = sum(mtp_acceptance ** i for i in range(mtp_tokens + 1))

        m, hw = model, hardware
        tp, dp, ep, devices = parallel.tp, parallel.dp, parallel.ep, parallel.devices
        self._smooth = sm = _smooth_max(hw.roofline_smoothing)
        gemm = hw.gemm_flops(m.dtype_bytes)
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
            decode_flops = hw.mla_decode_flops
        else:
            prefill_pair = decode_pair = 4.0 * m.heads * m.attention_head_dim * m.layers
            decode_flops = hw.attention_flops
        self._prefill_pair_s = prefill_pair / devices / hw.attention_flops
        self._kv_up_s = 2.0 * m.mla_kv_up_params * m.layers / devices / gemm  # MLA: per cached context token
        kv_bytes = m.kv_bytes_per_token / kv_shards(m, parallel) / dp  # one token's KV on one device
        self._kv_byte_s = kv_bytes / mem
        q = 1 + mtp_tokens  # query tokens per decode sequence and step
        self._q = q
        self._mtp = q > 1
        # decode attention per context token: the q queries of a sequence share one read of its KV
        decode_compute = q * decode_pair / devices / decode_flops
        decode_memory = kv_bytes / (hw.hbm_TBps * 1e12 * hw.decode_attention_efficiency)
        self._decode_pair_s, self._decode_kv_s = decode_compute, decode_memory
        self._ctx_s = sm(decode_compute, decode_memory)
        self._kv_write_s = q * self._kv_byte_s  # the step's new tokens' KV, per decode sequence

        self._moe_on = m.is_moe
        self._ep_on = ep > 1
        self._moe_flop_s = 2.0 * m.top_k * m.expert_params * m.moe_layers / devices / gemm if m.is_moe else 0.0
        expert_shards = devices if ep > 1 else tp
        self._moe_weight_s = m.routed_expert_params * m.dtype_bytes / expert_shards / mem
        self._expert_miss = 1.0 - m.top_k / m.num_experts if m.is_moe else 1.0
        self._moe_token_div = 1.0 if ep > 1 else float(dp)  # tokens one device's experts see

        # small kernels: fixed cost per kernel, activation traffic per token (tokens of one DP rank)
        kernels = m.layers * (KERNELS_MLA_ATTENTION if m.attention == "mla" else KERNELS_GQA_ATTENTION) \
            + m.dense_layers * KERNELS_DENSE_FFN + m.moe_layers * KERNELS_MOE_FFN + KERNELS_PER_STEP
        self.kernels_per_step = kernels
        self._fixed_s = kernels * hw.kernel_latency_s
        self._elem_s = activation_bytes_per_token(m, parallel) / hw.elementwise_Bps
        self._inv_layers = 1.0 / m.layers

        lat0 = self.collective_latency_s
        self.moe_dispatch = moe_dispatch
        if ep > 1 and (dp > 1 or moe_dispatch == "all_to_all"):
            in_node = min(ep, hw.devices_per_node)
            link_s_per_byte = max((in_node - 1) / ep / (hw.intra_node_GBps * 1e9 * hw.a2a_efficiency),
                                  (ep - in_node) / ep / (hw.inter_node_GBps * 1e9 * hw.a2a_efficiency))
            per_assignment = m.hidden * (dispatch_bytes + combine_bytes) * m.moe_layers
            self._a2a_s = m.top_k / ep * per_assignment * link_s_per_byte
            hop = hw.net_latency_s if ep > in_node else hw.link_latency_s
            self._a2a_latency_s = 2.0 * m.moe_layers * (lat0 + hop)  # dispatch + combine per MoE layer
        else:
            self._a2a_s = self._a2a_latency_s = 0.0
        # two all-reduces per layer of each rank's tokens (tokens / dp) x hidden activations; past the bulk size a
        # message takes the bandwidth path's coefficients (per step: tokens at or above _bulk_tokens)
        message_per_token = m.hidden * ACTIVATION_BYTES / dp
        self._ar_s = self._ar_latency_s = self._bulk_ar_s = self._bulk_ar_latency_s = 0.0
        self._bulk_tokens = math.inf
        if tp > 1:
            per_byte, fixed = all_reduce_coefficients(hw, tp, lat0)
            self._ar_s, self._ar_latency_s = 2.0 * m.layers * message_per_token * per_byte, 2.0 * m.layers * fixed
            if hw.bulk_allreduce_bytes and tp <= hw.devices_per_node:
                per_byte, fixed = all_reduce_coefficients(hw, tp, bulk=True)
                self._bulk_ar_s = 2.0 * m.layers * message_per_token * per_byte
                self._bulk_ar_latency_s = 2.0 * m.layers * fixed
                self._bulk_tokens = hw.bulk_allreduce_bytes / message_per_token

    # ---- the hot path: called once per engine step; keep it to plain float arithmetic --------------------------
    def step_time(self, prefill_tokens: int, prefill_attention: float, prefill_context: int,
                  decode_seqs: int, decode_context: int, moe_imbalance: float = 1.0) -> float:
        tokens = prefill_tokens + (decode_seqs * self._q if self._mtp else decode_seqs)
        return self._time(prefill_tokens, prefill_attention, prefill_context, decode_seqs, decode_context,
                          decode_seqs + 1 if prefill_tokens else decode_seqs, tokens, moe_imbalance, 0,
                          not prefill_tokens)

    def rank_step_times(self, ranks, moe_imbalance: float = 1.0) -> list[float]:
        """One synchronised step of DP ranks that schedule their own batches (cluster dp_mode=ranks): ``ranks`` holds
        each busy rank's (prefill_tokens, prefill_attention, prefill_context, decode_seqs, decode_context); returns
        each rank's time, and the step takes the largest. Every MoE layer's dispatch and combine joins all ranks:
        a rank's time is its own attention, dense layers, kernels and engine overheads, with the experts computing
        every rank's tokens and the all-to-all moving the larger of what the busiest device receives and what this
        rank sends."""
        dp, q = self.parallel.dp, self._q
        total = 0
        decode_only = True
        for pt, _pa, _pc, n, _ctx in ranks:
            total += pt + n * q
            if pt:
                decode_only = False
        # a rank's batch in the instance-wide units the coefficients use (as if every rank had it)
        return [self._time(dp * pt, dp * pa, dp * pc, dp * n, dp * ctx, dp * (n + 1 if pt else n), total,
                           moe_imbalance, dp * (pt + n * q), decode_only) for pt, pa, pc, n, ctx in ranks]

    def _time(self, prefill_tokens, prefill_attention, prefill_context, decode_seqs, decode_context, seqs,
              expert_tokens, moe_imbalance, sent, decode_only) -> float:
        """step_time's arithmetic with the MoE layers' inputs given apart: ``expert_tokens`` the tokens the experts
        compute (over all ranks), ``sent`` the tokens this rank dispatches (the all-to-all moves the larger of that
        and the busiest device's ``expert_tokens * moe_imbalance``), ``seqs`` the sequences the engine handles (a
        prefill is one); ``decode_only``: no rank prefills."""
        sm = self._smooth
        per_token = self._mtp and decode_seqs and decode_only
        lm_extra = seqs - decode_seqs  # one logit per prefill (per micro-batch, as breakdown() counts)
        mb = self.micro_batches
        if mb > 1:  # each micro-batch carries 1/mb of the step's work
            inv = self._mb_inv
            prefill_tokens, prefill_attention, prefill_context = \
                prefill_tokens * inv, prefill_attention * inv, prefill_context * inv
            decode_seqs, decode_context = decode_seqs * inv, decode_context * inv
            expert_tokens, sent = expert_tokens * inv, sent * inv
        queries = decode_seqs * self._q if self._mtp else decode_seqs  # MTP: k + 1 query tokens per sequence
        tokens = prefill_tokens + queries
        total = sm(tokens * self._dense_flop_s, self._dense_weight_s) \
            + sm((queries + lm_extra) * self._lm_flop_s, self._lm_weight_s) \
            + tokens * self._elem_s + self._fixed_s
        if prefill_tokens:
            total += sm(prefill_attention * self._prefill_pair_s + (prefill_context - prefill_tokens) * self._kv_up_s,
                        (prefill_context + prefill_tokens) * self._kv_byte_s)
        if decode_seqs:
            total += decode_context * self._ctx_s + decode_seqs * self._kv_write_s
        comm = 0.0 if not self._ar_s else tokens * self._ar_s + self._ar_latency_s if tokens < self._bulk_tokens \
            else tokens * self._bulk_ar_s + self._bulk_ar_latency_s
        if self._moe_on:
            if self._ep_on:
                load = expert_tokens * moe_imbalance
                comm += (load if load > sent else sent) * self._a2a_s + self._a2a_latency_s
            else:
                load = expert_tokens
            total += sm(load * self._moe_flop_s,
                        self._moe_weight_s * (1.0 - self._expert_miss ** (expert_tokens / self._moe_token_div)))
        if self._mtp and decode_seqs:  # MTP's draft: one layer and the LM head per draft token
            total += (self._q - 1) * (sm(decode_seqs * self._lm_flop_s, self._lm_weight_s) + total * self._inv_layers)
        if mb > 1:  # a two-stage pipeline of mb micro-batches: max(C, K) + min(C, K) / mb
            total, comm = total * mb, comm * mb
            total = total + comm / mb if total > comm else comm + total / mb
        elif comm:
            total += comm - self.comm_overlap * (comm if comm < total else total)
        total += self.overhead_s + seqs * self._seq_s
        return total / self.tokens_per_step if per_token else total

    # ---- explanations (allocate freely: not on the hot path) ---------------------------------------------------
    def bounds(self, prefill_tokens: int, prefill_attention: float, prefill_context: int, decode_seqs: int,
               decode_context: int, moe_imbalance: float = 1.0) -> dict[str, tuple[float, float]]:
        """(compute seconds, memory seconds) of each roofline operator in one (verification) step; its time is
        their smooth maximum."""
        queries = decode_seqs * self._q
        tokens = prefill_tokens + queries
        lm_tokens = queries + (1 if prefill_tokens else 0)
        out = {
            "dense_gemm": (tokens * self._dense_flop_s, self._dense_weight_s),
            "lm_head": (lm_tokens * self._lm_flop_s, self._lm_weight_s),
            "prefill_attention": (
                (prefill_attention * self._prefill_pair_s + (prefill_context - prefill_tokens) * self._kv_up_s,
                 (prefill_context + prefill_tokens) * self._kv_byte_s) if prefill_tokens else (0.0, 0.0)),
            "decode_attention": (
                (decode_context * self._decode_pair_s, decode_context * self._decode_kv_s) if decode_seqs
                else (0.0, 0.0)),
            "moe": (0.0, 0.0),
        }
        if self._moe_on:
            load = tokens * (moe_imbalance if self._ep_on else 1.0)
            touched = 1.0 - self._expert_miss ** (tokens / self._moe_token_div)
            out["moe"] = (load * self._moe_flop_s, self._moe_weight_s * touched)
        return out

    def breakdown(self, prefill_tokens: int, prefill_attention: float, prefill_context: int, decode_seqs: int,
                  decode_context: int, moe_imbalance: float = 1.0) -> dict[str, float]:
        """Seconds per operator (communication as exposed after overlap; with micro-batches, every operator summed
        over them) plus "overhead"; the values sum to step_time() of the same arguments (a decode-only MTP step:
        each divided by tokens_per_step)."""
        mb = self.micro_batches
        whole = (prefill_tokens, decode_seqs)
        args = (prefill_tokens / mb, prefill_attention / mb, prefill_context / mb, decode_seqs / mb,
                decode_context / mb, moe_imbalance) if mb > 1 else \
            (prefill_tokens, prefill_attention, prefill_context, decode_seqs, decode_context, moe_imbalance)
        prefill_tokens, decode_seqs = args[0], args[3]
        out = {op: self._smooth(*pair) for op, pair in self.bounds(*args).items()}
        if decode_seqs:  # the new tokens' KV write, linear in the sequences
            out["decode_attention"] += decode_seqs * self._kv_write_s
        queries = decode_seqs * self._q
        tokens = prefill_tokens + queries
        out["elementwise"] = tokens * self._elem_s + self._fixed_s
        compute = sum(out.values())
        out["mtp_draft"] = (self._q - 1) * (self._smooth(decode_seqs * self._lm_flop_s, self._lm_weight_s)
                                            + compute * self._inv_layers) if self._q > 1 and decode_seqs else 0.0
        compute += out["mtp_draft"]
        a2a = tokens * moe_imbalance * self._a2a_s + self._a2a_latency_s if self._ep_on else 0.0
        ar = 0.0 if not self._ar_s else tokens * self._ar_s + self._ar_latency_s if tokens < self._bulk_tokens \
            else tokens * self._bulk_ar_s + self._bulk_ar_latency_s
        if mb > 1:
            out = {k: v * mb for k, v in out.items()}
            compute, a2a, ar = compute * mb, a2a * mb, ar * mb
        comm = a2a + ar
        if not comm:
            exposed = 0.0
        elif mb > 1:
            exposed = (max(compute, comm) + min(compute, comm) / mb - compute) / comm
        else:
            exposed = 1.0 - self.comm_overlap * min(comm, compute) / comm
        out["ep_all_to_all"] = a2a * exposed
        out["tp_all_reduce"] = ar * exposed
        out["overhead"] = self.overhead_s + (whole[1] + (1 if whole[0] else 0)) * self._seq_s
        if self._q > 1 and whole[1] and not whole[0]:
            out = {k: v / self.tokens_per_step for k, v in out.items()}
        return out

    def verify_time(self, prefill_tokens: int, prefill_attention: float, prefill_context: int, decode_seqs: int,
                    decode_context: int, moe_imbalance: float = 1.0) -> float:
        """One real step (with MTP: the verification of k + 1 tokens per sequence), not per generated token."""
        t = self.step_time(prefill_tokens, prefill_attention, prefill_context, decode_seqs, decode_context,
                           moe_imbalance)
        return t * self.tokens_per_step if self._q > 1 and decode_seqs and not prefill_tokens else t

    # ---- conveniences --------------------------------------------------------------------------------------------
    def prefill_time(self, tokens: int, cached: int = 0) -> float:
        """One prefill chunk of ``tokens`` new tokens after ``cached`` already-cached ones, alone in its step."""
        return self.step_time(tokens, tokens * (cached + (tokens + 1) / 2), cached + tokens, 0, 0)

    def decode_time(self, seqs: int, context: int, moe_imbalance: float = 1.0) -> float:
        """One decode step of ``seqs`` sequences of ``context`` tokens each, per generated token (= TPOT)."""
        return self.step_time(0, 0.0, 0, seqs, seqs * context, moe_imbalance)

    def __repr__(self) -> str:
        p = self.parallel
        mtp = f", mtp={self.mtp_tokens}@{self.mtp_acceptance}" if self.mtp_tokens else ""
        mtp += f", micro_batches={self.micro_batches}" if self.micro_batches > 1 else ""
        return f"RooflineModel({self.model.name}, {self.hardware.name}, tp={p.tp}, dp={p.dp}, ep={p.ep}{mtp})"


def all_reduce_coefficients(hw: HardwareSpec, tp: int, base_s: float | None = None,
                            bulk: bool = False) -> tuple[float, float]:
    """(seconds per byte of each rank's message, fixed seconds) of one ring all-reduce over ``tp`` devices: inside
    a node the latency path (``base_s``, None = the hardware's collective_base_s) or with ``bulk`` the bandwidth
    path (bulk_*); across nodes the network's alpha and bandwidth with the latency path's base."""
    base = hw.collective_base_s if base_s is None else base_s
    steps = 2.0 * (tp - 1)
    if tp > hw.devices_per_node:
        bw, alpha = hw.inter_node_GBps * hw.net_efficiency, hw.net_latency_s
    elif bulk:
        bw, alpha, base = hw.intra_node_GBps * hw.bulk_bus_efficiency, hw.bulk_link_latency_s, hw.bulk_collective_base_s
    else:
        bw, alpha = hw.intra_node_GBps * hw.bus_efficiency, hw.link_latency_s
    return steps / tp / (bw * 1e9), base + steps * alpha


def all_reduce_s(hw: HardwareSpec, tp: int, nbytes: float, base_s: float | None = None) -> float:
    """One TP all-reduce of ``nbytes`` per rank as a step charges it (``RooflineModel`` prices two per layer)."""
    bulk = 0 < hw.bulk_allreduce_bytes <= nbytes and tp <= hw.devices_per_node
    per_byte, fixed = all_reduce_coefficients(hw, tp, base_s, bulk)
    return fixed + nbytes * per_byte if tp > 1 else 0.0


def activation_bytes_per_token(m: ModelSpec, parallel: Parallelism | None = None) -> float:
    """Bytes the small kernels of one token move over all layers on one device (BF16, read + write), for a token
    of the instance (tokens spread over its dp ranks): two RMSNorms with their fused residual add (4 vectors of
    hidden each) and MLA's norms of the q and kv latents, on every TP rank; rope on a TP rank's q heads and KV heads
    (GQA's split over min(tp, kv_heads); MLA's one rope key whole); the activation function (reads gate and up,
    writes one) on a TP rank's slice of the dense and shared-expert width, and on the routed experts a device holds
    (tensor-sharded over tp, or whole experts over ep devices)."""
    p = parallel if parallel is not None else Parallelism()
    norms = 2 * 4 * m.hidden
    if m.attention == "mla":
        rope = 2 * (m.heads / p.tp + 1) * m.qk_rope_head_dim
        norms += 2 * (m.q_lora_rank + m.kv_lora_rank)
    else:
        rope = 2 * (m.heads / p.tp + m.kv_heads / kv_shards(m, p)) * m.attention_head_dim
    per_rank = (norms + rope) * m.layers \
        + 3 * (m.dense_layers * m.intermediate + m.moe_layers * m.shared_experts * m.expert_intermediate) / p.tp
    routed = 3 * m.moe_layers * m.top_k * m.expert_intermediate / (p.ep if p.ep > 1 else p.devices)
    return (per_rank / p.dp + routed) * ACTIVATION_BYTES
