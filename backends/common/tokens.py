"""Prompt tokens and prefix-block hashes as the emulator, the proxy and the load generator all count them.

Exact vs approximate:
- A prompt given as a list of token ids is counted exactly, by every engine (vLLM accepts token-id prompts).
- A text prompt is "tokenized" into whitespace-separated words. That is exact for the emulator (whose tokenizer
  this is) and for the load generator's synthetic prompts (one vocabulary word = one emulator token), and an
  approximation for a real tokenizer (English text is about 1.3 tokens per word).
- Block hashes are chained blake2b digests of consecutive ``block_size``-token blocks (position-dependent: block
  k's hash covers blocks 0..k), so equal hashes at the same position mean an equal prefix. The emulator publishes
  these very hashes in its KV events, so the proxy's prefix index is exact against emulated engines; vLLM hashes
  token ids with its own function, so against vLLM the proxy's hashes only drive its routing-history index.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Any, Sequence

Token = int | str


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


def _block_bytes(block: Sequence[Token]) -> bytes:
    if block and isinstance(block[0], int):
        return struct.pack(f"<{len(block)}q", *block)
    return "\x1f".join(block).encode()


def block_hashes(tokens: Sequence[Token], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full ``block_size``-token blocks of ``tokens`` (a partial last block has none)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out = []
    parent = b"\0" * 8
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(parent + _block_bytes(tokens[start:start + block_size]), digest_size=8).digest()
        out.append(int.from_bytes(digest, "big") >> 1)  # 63 bits: fits msgpack's signed int64
        parent = digest
    return tuple(out)
