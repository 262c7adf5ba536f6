"""Measured quality of an OmniAttn layer pattern on a real local Hugging Face causal LM (torch + transformers,
imported only when a harness is built).

Masking: a custom attention function registered with transformers' ``AttentionInterface`` wraps its SDPA attention
and gives every layer an explicit boolean mask: causal on full layers; on compressed layers a query at position
``i >= prompt_len`` (a decode step) sees only keys ``j < sink`` or ``i - j < recent`` (tokens), as OmniAttn's decode
does; queries of the prompt (prefill) keep full causal attention, as OmniAttn's prefill does. Positions are never
re-indexed (RoPE sees the true positions, as in OmniAttn, unlike StreamingLLM). Because a token's keys and values
depend only on its own row, one forward pass over prompt + continuation with this mask is exactly "prefill the
prompt with full attention, then decode the continuation teacher-forced", and the same mask works token by token
with a KV cache (queries sit at the end of the keys). The window is the last ``recent`` tokens, the current one
included: OmniAttn's ring buffer of ``recent`` blocks holds between recent - 1 and recent blocks of them.

Measures (``measure(pattern)``):
- ``kl``: mean KL(full || pattern) of the next-token distributions over the decode positions of ``prompts``
  calibration sequences of ``context_tokens`` tokens (the first ``prompt_tokens`` are the prompt); nats. From
  ``text`` (windows at seeded offsets) or, without one, seeded random words (fine for a random test model; give real
  text for a real one).
- ``passkey_accuracy``: share of ``passkeys`` trials (a 5-digit pass key hidden at a seeded depth in filler text of
  about ``context_tokens`` tokens, prefilled with full attention) whose ``answer_tokens`` greedy decode steps
  contain the key. The first answer token comes from the prefill, so compression reaches the answer from its second
  token on, as in serving. Each trial is 1 + ``answer_tokens`` forward passes: on a CPU, pass few trials.
The full-attention reference goes through the same function and masks, so a window covering the whole context
gives exactly zero divergence.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ATTN_NAME = "omnisim_omni_attn"
_STATE = "_omnisim_omni_attn"  # attribute on each attention module: the harness's _MaskState
_WORDS = ("the a of to in and is was for on with as by at from it this that one two three time serving request "
          "token cache block layer model memory queue batch first last next long short fast slow light heavy red "
          "green blue quick brown fox dog over number world hello").split()
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about it. ")


def _torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise ValueError(f"the quality harness needs torch and transformers (pip install torch transformers): "
                         f"{e}") from None
    return torch


@dataclass(frozen=True)
class PatternQuality:
    """What the harness measured for one pattern (see the module docstring)."""

    kl: float
    passkey_accuracy: float | None


class _MaskState:
    """The mask every attention layer of the harness's model reads on each call."""

    def __init__(self, sink: int, recent: int) -> None:
        self.sink, self.recent = sink, recent
        self.compressed: frozenset[int] = frozenset()
        self.prompt_len = 0

    def mask(self, layer: int, q_len: int, kv_len: int, given):
        import torch

        q = torch.arange(kv_len - q_len, kv_len, device=given.device if given is not None else None)[:, None]
        k = torch.arange(kv_len, device=q.device)[None, :]
        visible = k <= q
        if layer in self.compressed:
            visible &= (q < self.prompt_len) | (k < self.sink) | (q - k < self.recent)
        visible = visible[None, None]
        if given is None:
            return visible
        if given.dtype == torch.bool:
            return given & visible
        return given.masked_fill(~visible, torch.finfo(given.dtype).min)


def _omni_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = getattr(module, _STATE, None)
    if state is not None:
        attention_mask = state.mask(module.layer_idx, query.shape[-2], key.shape[-2], attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _omni_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)  # padding masks arrive as SDPA's booleans


class QualityHarness:
    """``model_path``: a local Hugging Face causal LM directory (Llama/Qwen-style attention with ``layer_idx``).
    ``sink_tokens``, ``recent_tokens``: a compressed layer's window in tokens. See the module docstring."""

    def __init__(self, model_path: str | Path, *, sink_tokens: int, recent_tokens: int, context_tokens: int = 256,
                 prompt_tokens: int | None = None, prompts: int = 4, passkeys: int = 4, answer_tokens: int = 6,
                 seed: int = 0, text: str | None = None, device: str = "cpu", dtype: str = "float32") -> None:
        torch = _torch()
        prompt_tokens = context_tokens // 2 if prompt_tokens is None else prompt_tokens
        for name, value, low in (("sink_tokens", sink_tokens, 0), ("recent_tokens", recent_tokens, 1),
                                 ("context_tokens", context_tokens, 2), ("prompt_tokens", prompt_tokens, 1),
                                 ("prompts", prompts, 1), ("passkeys", passkeys, 0),
                                 ("answer_tokens", answer_tokens, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"harness: {name} must be an integer >= {low}, got {value!r}")
        if prompt_tokens >= context_tokens:
            raise ValueError(f"harness: prompt_tokens={prompt_tokens} leaves no decode positions in "
                             f"context_tokens={context_tokens}")
        path = Path(model_path)
        if not path.is_dir():
            raise ValueError(f"--harness-model {path}: not a model directory")
        if not hasattr(torch, dtype):
            raise ValueError(f"harness: unknown torch dtype {dtype!r}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _register()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                              attn_implementation=ATTN_NAME).to(device)
        except Exception as e:  # noqa: BLE001 - any loading failure is the user's path or files
            raise ValueError(f"--harness-model {path}: cannot load a causal LM: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        self.model.eval()
        config = self.model.config.get_text_config()
        self.num_layers = int(config.num_hidden_layers)
        limit = getattr(config, "max_position_embeddings", None)
        if limit and context_tokens + answer_tokens > limit:
            raise ValueError(f"harness: context_tokens={context_tokens} (+{answer_tokens} answer tokens) exceeds the "
                             f"model's max_position_embeddings={limit}")
        self.state = _MaskState(sink_tokens, recent_tokens)
        attn_layers = set()
        for module in self.model.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, _STATE, self.state)
                attn_layers.add(module.layer_idx)
        if attn_layers != set(range(self.num_layers)):
            raise ValueError(f"--harness-model {path}: found attention modules for layers {sorted(attn_layers)}, "
                             f"expected 0..{self.num_layers - 1} (a Llama/Qwen-style model with layer_idx)")
        self.device = device
        self.sink_tokens, self.recent_tokens = sink_tokens, recent_tokens
        self.context_tokens, self.prompt_tokens = context_tokens, prompt_tokens
        self.answer_tokens = answer_tokens
        rng = np.random.default_rng(seed)
        self._calibration = self._calibration_ids(rng, prompts, text)
        self._passkeys = [self._passkey_prompt(rng) for _ in range(passkeys)]
        self.forwards = 0
        self._reference_logp = self._logprobs(frozenset())
        self._reference_passkey = self._passkey_accuracy(frozenset())

    # ---- inputs --------------------------------------------------------------------------------------------------
    def _calibration_ids(self, rng: np.random.Generator, prompts: int, text: str | None):
        torch = _torch()
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        need = self.context_tokens - len(bos)
        if text is not None:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) < need:
                raise ValueError(f"--harness-text: {len(ids)} tokens, fewer than --harness-context "
                                 f"{self.context_tokens}")
            starts = rng.integers(0, len(ids) - need + 1, size=prompts)
            rows = [bos + ids[s:s + need] for s in starts]
        else:
            rows = []
            for _ in range(prompts):
                ids: list[int] = []
                while len(ids) < need:  # words are at least one token each
                    words = rng.choice(_WORDS, size=need)
                    ids = self.tokenizer(" ".join(words), add_special_tokens=False).input_ids
                rows.append(bos + ids[:need])
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _passkey_prompt(self, rng: np.random.Generator) -> tuple:
        torch = _torch()
        key = str(int(rng.integers(10000, 100000)))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        question = "What is the pass key? The pass key is"
        fixed = len(self.tokenizer(_PASSKEY_INTRO + needle + question).input_ids)
        per_filler = len(self.tokenizer(_FILLER, add_special_tokens=False).input_ids)
        fillers = max(1, (self.context_tokens - fixed) // per_filler)
        depth = int(rng.integers(0, fillers + 1))
        text = _PASSKEY_INTRO + _FILLER * depth + needle + _FILLER * (fillers - depth) + question
        ids = self.tokenizer(text).input_ids[-self.context_tokens:]
        return key, torch.tensor([ids], dtype=torch.long, device=self.device)

    # ---- measurements --------------------------------------------------------------------------------------------
    def _logprobs(self, compressed: frozenset):
        torch = _torch()
        self.state.compressed, self.state.prompt_len = compressed, self.prompt_tokens
        with torch.inference_mode():
            logits = self.model(input_ids=self._calibration, use_cache=False).logits
        self.forwards += 1
        return torch.log_softmax(logits[:, self.prompt_tokens:].float(), dim=-1)

    def _passkey_accuracy(self, compressed: frozenset) -> float | None:
        if not self._passkeys:
            return None
        torch = _torch()
        hits = 0
        for key, ids in self._passkeys:
            self.state.compressed, self.state.prompt_len = compressed, ids.shape[1]
            with torch.inference_mode():
                out = self.model(input_ids=ids, use_cache=True)
                answer = []
                for _ in range(self.answer_tokens):
                    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
                    answer.append(int(token))
                    out = self.model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            self.forwards += 1 + self.answer_tokens
            hits += key in self.tokenizer.decode(answer)
        return hits / len(self._passkeys)

    def measure(self, pattern) -> PatternQuality:
        pattern = tuple(int(v) for v in pattern)
        if len(pattern) != self.num_layers:
            raise ValueError(f"harness: pattern has {len(pattern)} entries, the model has {self.num_layers} layers")
        torch = _torch()
        compressed = frozenset(i for i, v in enumerate(pattern) if v)
        logp = self._logprobs(compressed)
        ref = self._reference_logp
        kl = float(torch.sum(ref.exp() * (ref - logp), dim=-1).mean())
        return PatternQuality(kl, self._passkey_accuracy(compressed))

    def layer_table(self) -> list[PatternQuality]:
        """Each layer compressed alone."""
        return [self.measure(np.eye(self.num_layers, dtype=int)[layer]) for layer in range(self.num_layers)]

    @property
    def reference_passkey_accuracy(self) -> float | None:
        return self._reference_passkey

    def loss_of(self, quality: PatternQuality, metric: str) -> float:
        """The search's loss: ``kl`` as measured, or ``passkey``: full attention's accuracy minus the pattern's."""
        if metric == "kl":
            return quality.kl
        if metric == "passkey":
            if quality.passkey_accuracy is None:
                raise ValueError("--harness-metric passkey needs --harness-passkeys > 0")
            return self._reference_passkey - quality.passkey_accuracy
        raise ValueError(f"--harness-metric: expected kl or passkey, got {metric!r}")

    def loss(self, metric: str):
        """patterns[n, L] -> losses[n], measuring each pattern whole (layers interact)."""
        self.loss_of(PatternQuality(0.0, self._reference_passkey), metric)  # reject a bad metric before measuring
        return lambda patterns: np.array([self.loss_of(self.measure(p), metric) for p in patterns], dtype=float)

    def describe(self) -> dict:
        return {"layers": self.num_layers, "sink_tokens": self.sink_tokens, "recent_tokens": self.recent_tokens,
                "context_tokens": self.context_tokens, "prompt_tokens": self.prompt_tokens,
                "prompts": int(self._calibration.shape[0]), "passkeys": len(self._passkeys),
                "reference_passkey_accuracy": self._reference_passkey}

