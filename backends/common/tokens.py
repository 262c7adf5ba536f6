"""Prompt tokens and prefix-block hashes as the emulator, the proxy and the load generator all count them.

Exact vs approximate:
- A prompt given as a list of token ids is counted exactly, by every engine (vLLM accepts token-id prompts).
- A text prompt is "tokenized" into whitespace-separated words. That is exact for the emulator (whose tokenizer
  this is) and for the load generator's synthetic prompts (one vocabulary word = one emulator token), and an
  approximation for a real tokenizer (English text is about 1.3 tokens per word).
- Block hashes are chained blake2b digests of consecutive ``block_size``-token blocks (position-dependent: block
  k's hash covers blocks 0..k), so equal hashes at the same position mean an equal prefix. The emulator publishes
  these very hashes in its KV events, so the proxy's prefix index is exact against emulated engines. vLLM hashes
  token ids with its own function; the proxy makes matches against vLLM exact by re-hashing the token ids that
  vLLM's BlockStored events carry with these same functions (backends/common/engine_block_map.py), and by
  tokenizing prompts with the model's tokenizer (backends/common/prompt_tokenizer.py).
"""
from __future__ import annotations

import hashlib
import struct
from typing import Any, Sequence

import msgspec

Token = int | str
_extra_encoder = msgspec.msgpack.Encoder()


def chat_text(messages: Any) -> str:
    """The text of an OpenAI chat ``messages`` list (contents joined; multi-part text contents flattened)."""
    if not isinstance(messages, list):
        raise ValueError("messages: expected a list of {role, content} objects")
    parts = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{k}]: expected an object with role and content")
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
        elif content is not None:
            raise ValueError(f"messages[{k}].content: expected a string or a list of parts")
    return " ".join(parts)


def prompt_tokens(body: dict) -> list[Token]:
    """Tokens of a /v1/completions (``prompt``) or /v1/chat/completions (``messages``) body."""
    if "messages" in body:
        return chat_text(body["messages"]).split()
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt.split()
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0].split()
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        return prompt_tokens({"prompt": prompt[0]})
    raise ValueError("prompt: expected a string, a list of token ids, or a one-element list of either")


ROOT_DIGEST = bytes(8)  # the parent of a sequence's first block


def _blocks_bytes(tokens: Sequence[Token], block_size: int, n: int) -> list[bytes]:
    """The bytes of each full block of ``tokens[:n]`` (n a multiple of block_size): token ids as little-endian
    int64s, words joined by \x1f. All ids are packed at once: per block, this runs once per block of a prompt on
    every request the proxy routes."""
    if isinstance(tokens[0], int):
        packed = struct.pack(f"<{n}q", *tokens[:n])
        size = 8 * block_size
        return [packed[i:i + size] for i in range(0, 8 * n, size)]
    join = "\x1f".join
    return [join(tokens[i:i + block_size]).encode() for i in range(0, n, block_size)]


def chain_digests(tokens: Sequence[Token], block_size: int, parent: bytes = ROOT_DIGEST,
                  extra_keys: Sequence[Any] | None = None) -> list[bytes]:
    """8-byte chained digests of the full ``block_size``-token blocks of ``tokens``, continuing the chain from
    ``parent`` (the digest of the block before ``tokens[0]``). ``extra_keys[k]``, when given and not None, is
    mixed into block k's digest: what besides its tokens decides the block's KV in vLLM (a cache salt, a LoRA
    name), so blocks that differ only there never match."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = len(tokens) - len(tokens) % block_size
    if not n:
        return []
    blake2b = hashlib.blake2b
    out = []
    for k, data in enumerate(_blocks_bytes(tokens, block_size, n)):
        if extra_keys is not None and k < len(extra_keys) and extra_keys[k] is not None:
            data += b"\x1e" + _extra_encoder.encode(extra_keys[k])
        parent = blake2b(parent + data, digest_size=8).digest()
        out.append(parent)
    return out


def digest_hash(digest: bytes) -> int:
    """The block hash of a chained digest: 63 bits, so it fits msgpack's signed int64."""
    return int.from_bytes(digest, "big") >> 1


def block_hashes(tokens: Sequence[Token], block_size: int, cache_salt: str | None = None) -> tuple[int, ...]:
    """Chained hashes of the full ``block_size``-token blocks of ``tokens`` (a partial last block has none).
    ``cache_salt``: a request's vLLM ``cache_salt``, which vLLM mixes into its first block's hash."""
    extra = [[cache_salt]] if cache_salt else None
    from_bytes = int.from_bytes
    return tuple(from_bytes(d, "big") >> 1 for d in chain_digests(tokens, block_size, extra_keys=extra))  # digest_hash
