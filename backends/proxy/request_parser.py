"""A client's OpenAI request body -> the ``Request`` a policy sees: validation, prompt token count, prefix hashes."""
from __future__ import annotations

import itertools
from typing import Callable, Container, Mapping

from backends.common.prompt_tokenizer import PromptTokenizer
from backends.common.tokens import block_hashes, prompt_tokens
from backends.proxy.config import ProxyConfig
from backends.proxy.prefix_source import PrefixSource
from omnisim.core import Request


_INT64 = 1 << 63
_MAX_REQUEST_ID = 256


def _header_int(headers: Mapping[str, str], name: str) -> int:
    try:
        value = int(headers[name])
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {headers[name][:40]!r}") from None
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"{name}: out of range (64-bit integers)")
    return value


def _request_id(value: str) -> str:
    """A client's X-Request-Id, checked: it goes upstream in a header (undecodable bytes arrive as surrogates)."""
    if len(value) > _MAX_REQUEST_ID or not value.isascii() or not value.isprintable():
        raise ValueError(f"X-Request-Id: expected at most {_MAX_REQUEST_ID} printable ASCII characters")
    return value


class RequestParser:
    """``parse`` raises ValueError with a message for the client (answered 400).

    Prompt tokens: with the model's ``tokenizer``, the engine's own (exact; they win over X-Prompt-Tokens); else
    X-Prompt-Tokens where given; else an estimate from the prompt (backends/common/tokens.py). Prefix hashes: the
    client's X-Prefix-Hashes where the prefix source takes them, else block hashes of the prompt's tokens where the
    source wants them (never for a prompt the tokenizer cannot reproduce). Request ids: the client's X-Request-Id,
    made unique among ``serving_ids`` (the requests being served)."""

    def __init__(self, config: ProxyConfig, prefix: PrefixSource, tokenizer: PromptTokenizer | None,
                 now_s: Callable[[], float], serving_ids: Container[str]) -> None:
        self.config = config
        self.prefix = prefix
        self.tokenizer = tokenizer
        self.now_s = now_s
        self.serving_ids = serving_ids
        self._ids = itertools.count()

    def parse(self, headers: Mapping[str, str], body: object, endpoint: str) -> Request:
        if not isinstance(body, dict):
            raise ValueError("body: expected a JSON object")
        if endpoint == "chat" and "messages" not in body:
            raise ValueError("messages: required")
        if endpoint == "completions" and "prompt" not in body:
            raise ValueError("prompt: required")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise ValueError("stream: expected true or false")
        h = headers
        # With the model's tokenizer: the engine's own prompt tokens (None for a prompt it cannot reproduce).
        tokens = self.tokenizer.tokens(body, endpoint) if self.tokenizer is not None else None
        exact = tokens is not None
        if exact:
            n_prompt = len(tokens)
        elif "X-Prompt-Tokens" in h:
            n_prompt = _header_int(h, "X-Prompt-Tokens")
        else:
            tokens = prompt_tokens(body)
            n_prompt = len(tokens)
            if tokens and isinstance(tokens[0], int) and (min(tokens) < 0 or max(tokens) >= _INT64):
                raise ValueError("prompt: token ids must be in 0..2**63-1")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", self.config.default_max_tokens))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
        hashes: tuple[int, ...] = ()
        block = 0
        if self.prefix.client_hashes and "X-Prefix-Hashes" in h:
            try:
                hashes = tuple(int(x) for x in h["X-Prefix-Hashes"].split(",") if x.strip())
            except ValueError:
                raise ValueError("X-Prefix-Hashes: expected comma-separated integers") from None
            if hashes and (min(hashes) < -_INT64 or max(hashes) >= 1 << 64):
                raise ValueError("X-Prefix-Hashes: out of range (64-bit integers)")
            block = _header_int(h, "X-Hash-Block-Tokens") if "X-Hash-Block-Tokens" in h else 0
            if hashes and block < 1:
                raise ValueError("X-Hash-Block-Tokens: required (>= 1) with X-Prefix-Hashes")
        elif self.prefix.hashes_prompts and (exact or self.tokenizer is None):
            block = self.config.prefix_block_tokens
            salt = body.get("cache_salt") if exact else None
            if salt is not None and not isinstance(salt, str):
                raise ValueError("cache_salt: expected a string")
            hashes = block_hashes(tokens if tokens is not None else prompt_tokens(body), block, salt)
        rid = _request_id(h.get("X-Request-Id") or "")
        if not rid or rid in self.serving_ids:
            base = rid or "req"
            rid = f"{base}-{next(self._ids)}"
            while rid in self.serving_ids:  # a client's own id may look like one of ours
                rid = f"{base}-{next(self._ids)}"
        return Request(rid, self.now_s(), max(1, n_prompt), max_tokens, hashes, block if hashes else 0)
