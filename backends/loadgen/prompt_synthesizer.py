"""Prompts made to a workload request's size and prefix structure.

A request with prefix hashes h_0..h_k (blocks of ``hash_block_tokens``) gets, for block i, tokens drawn from a
generator seeded by (seed, h_i): equal hashes give equal blocks, so a shared prefix in the trace is a shared prefix
in the text the engine sees. Tokens past the hashed blocks are drawn from (seed, request id): unique to the request.

Formats: "text" joins vocabulary words with spaces (exactly ``prompt_tokens`` emulator tokens; about that many for
a real tokenizer, as the words are common single-token English words); "token_ids" sends token ids below
``vocab_size`` (exact for any engine that accepts token-id prompts, such as vLLM's /v1/completions).
"""
from __future__ import annotations

import hashlib

import numpy as np

from omnisim.core import Request

WORDS = tuple("""the of and to in is that it for on with as was at by be this are from or have an not they which
one you had but all were we when your can there use each she do how their if will up other about out many then them
these so some her would make like him into time has look two more write go see number no way could people my than
first water been call who oil its now find long down day did get come made may part over new sound take only little
work know place year live me back give most very after thing our just name good sentence man think say great where
help through much before line right too mean old any same tell boy follow came want show also around form three small
set put end does another well large must big even such because turn here why ask went men read need land different
home us move try kind hand picture again change off play spell air away animal house point page letter mother answer
found study still learn should world high every near add food between own below country plant last school father
keep tree never start city earth eye light thought head under story saw left few while along might close something
seem next hard open example begin life always those both paper together got group often run important until children
side feet car mile night walk white sea began grow took river four carry state once book hear stop without second
later miss idea enough eat face watch far really almost let above girl sometimes mountain cut young talk soon list
song being leave family""".split())

FORMATS = ("text", "token_ids")


class PromptSynthesizer:
    def __init__(self, seed: int = 0, prompt_format: str = "text", vocab_size: int = 32000, cache_blocks: int = 65536):
        if prompt_format not in FORMATS:
            raise ValueError(f"prompt_format: expected one of {FORMATS}, got {prompt_format!r}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {vocab_size}")
        self.seed = seed
        self.prompt_format = prompt_format
        self.vocab_size = vocab_size
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._cache_blocks = cache_blocks
        self._words = np.array(WORDS, dtype=object)

    def _draw(self, key: int, n: int) -> np.ndarray:
        high = len(WORDS) if self.prompt_format == "text" else self.vocab_size
        return np.random.default_rng([self.seed, key & ((1 << 63) - 1)]).integers(0, high, n)

    def _block(self, h: int, n: int) -> np.ndarray:
        block = self._cache.get((h, n))
        if block is None:
            if len(self._cache) >= self._cache_blocks:
                self._cache.clear()
            block = self._cache[(h, n)] = self._draw(h, n)
        return block

    def token_indices(self, request: Request) -> np.ndarray:
        """The prompt as indices (into WORDS for text, token ids otherwise), exactly prompt_tokens long."""
        parts = []
        left = request.prompt_tokens
        b = request.hash_block_tokens
        for h in request.prefix_hashes:
            if left <= 0:
                break
            parts.append(self._block(h, b)[:left])
            left -= b
        if left > 0:
            key = int.from_bytes(hashlib.blake2b(request.id.encode(), digest_size=8).digest(), "big")
            parts.append(self._draw(key ^ 0x5DEECE66D, left))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def prompt(self, request: Request) -> str | list[int]:
        idx = self.token_indices(request)
        if self.prompt_format == "token_ids":
            return idx.tolist()
        return " ".join(self._words[idx])
