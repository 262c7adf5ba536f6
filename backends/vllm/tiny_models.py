"""Tiny random-weight models that vLLM can serve on a CPU, built locally in seconds (no model hub).

    python -m backends.vllm.tiny_models --out DIR [--kind llama|qwen3_moe] [--seed 0]

``llama``: LlamaForCausalLM, hidden 128, 2 layers. ``qwen3_moe``: Qwen3MoeForCausalLM, 8 experts top-2.
Both share a byte-level BPE tokenizer trained with ``tokenizers`` on a fixed text, saved as a
PreTrainedTokenizerFast with a small chat template, so chat and completion requests both work. The same seed
gives the same weights and the same tokenizer. Weights are random: the text they produce is noise, the serving
path (prefill, KV transfer, decode, metrics) is real.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

KINDS = ("llama", "qwen3_moe")
# Marks a finished build, so a half-written directory (a killed build) is never served.
DONE_MARKER = ".omnisim_tiny_model.json"
BUILDER_VERSION = 1

_SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Enough varied text for a few hundred merges; the words are those the load generators' synthetic prompts and
# the tests use, so prompts tokenize into whole words rather than single bytes.
_CORPUS_WORDS = (
    "the a an of to in and or is are was were be been it this that for on with as by at from serving request "
    "token tokens prefill decode cache block expert layer model instance proxy cluster policy latency throughput "
    "hello world quick brown fox jumps over lazy dog number time first last next queue batch memory transfer "
    "one two three four five six seven eight nine ten zero red green blue light heavy fast slow short long"
).split()
_VOCAB_SIZE = 512


def _corpus(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(400):
        lines.append(" ".join(rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(4, 16))))
    return lines + [" ".join(_CORPUS_WORDS)] + [f"{i} {i * 7} {i * 13}" for i in range(200)]


def build_tokenizer(out: Path, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE, special_tokens=_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        model_max_length=4096,
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _model_config(kind: str, vocab_size: int, bos: int, eos: int, pad: int):
    common = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad, tie_word_embeddings=False, dtype="float32",
    )
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                              norm_topk_prob=True, decoder_sparse_step=1)
    raise ValueError(f"tiny model kind: expected one of {KINDS}, got {kind!r}")


def build_tiny_model(out: Path | str, kind: str = "llama", seed: int = 0) -> Path:
    """Write a servable model directory (config, safetensors weights, tokenizer) to ``out``; returns ``out``."""
    if kind not in KINDS:
        raise ValueError(f"tiny model kind: expected one of {KINDS}, got {kind!r}")
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, seed)
    config = _model_config(kind, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # A private RNG state: the build is seeded without disturbing the caller's torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    (out / DONE_MARKER).write_text(json.dumps({"kind": kind, "seed": seed, "builder": BUILDER_VERSION}))
    return out


def is_built(path: Path | str, kind: str, seed: int = 0) -> bool:
    marker = Path(path) / DONE_MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except ValueError:
        return False
    return meta == {"kind": kind, "seed": seed, "builder": BUILDER_VERSION}


def ensure_tiny_model(cache_dir: Path | str, kind: str = "llama", seed: int = 0) -> Path:
    """The model ``cache_dir/tiny_{kind}_s{seed}``, built there first if absent. Safe against concurrent callers:
    each builds into a private temporary directory and renames it into place."""
    cache_dir = Path(cache_dir)
    target = cache_dir / f"tiny_{kind}_s{seed}"
    if is_built(target, kind, seed):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tiny_{kind}_", dir=cache_dir))
    try:
        build_tiny_model(staging, kind, seed)
        if target.exists() and not is_built(target, kind, seed):
            shutil.rmtree(target)  # a stale or half-written build
        try:
            os.rename(staging, target)
        except OSError:
            if not is_built(target, kind, seed):  # lost a race to a builder that produced something else
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backends.vllm.tiny_models", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model into")
    parser.add_argument("--kind", choices=KINDS, default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out, args.kind, args.seed)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"{args.kind} tiny model (seed {args.seed}) written to {path} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
