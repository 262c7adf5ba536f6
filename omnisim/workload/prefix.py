"""Synthetic shared prefixes (system prompts), so prefix caching can be studied without the Mooncake trace."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def chain_hash(parent: int, *key: int) -> int:
    """A block hash that depends on the whole chain before it (``parent``) and on this block's ``key``: equal
    hashes mean equal leading content. blake2b, not Python's salted hash(), so it is the same in every process."""
    digest = hashlib.blake2b(f"{parent}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # non-negative, fits int64


@lru_cache(maxsize=4096)
def _shared_block_hashes(prefix_id: int, num_blocks: int) -> tuple[int, ...]:
    hashes, parent = [], 0
    for block in range(num_blocks):
        parent = chain_hash(parent, 0, prefix_id, block)
        hashes.append(parent)
    return tuple(hashes)


@dataclass(frozen=True)
class PrefixSpec:
    """``num_prefixes`` shared system prompts of ``prefix_tokens`` tokens each.

    A request shares a prefix with probability ``share_fraction``; which one follows a Zipf law (prefix k, 0-based,
    has weight 1/(k+1)**zipf_s). A sharing request's prompt is the prefix followed by its own sampled prompt, so its
    prompt_tokens = prefix_tokens + the sampled length. Every request then carries ``prefix_hashes`` for all
    ceil(prompt_tokens / hash_block_tokens) blocks (the last one possibly partial, as in Mooncake's hash_ids):
    blocks entirely inside the shared prefix get the prefix's hashes, the others hashes unique to the request.
    """

    num_prefixes: int
    prefix_tokens: int
    zipf_s: float = 1.0
    share_fraction: float = 1.0
    hash_block_tokens: int = 512

    def __post_init__(self) -> None:
        if self.num_prefixes < 1:
            raise ValueError(f"workload.prefix.num_prefixes must be >= 1, got {self.num_prefixes}")
        if self.prefix_tokens < 1:
            raise ValueError(f"workload.prefix.prefix_tokens must be >= 1, got {self.prefix_tokens}")
        if self.zipf_s < 0:
            raise ValueError(f"workload.prefix.zipf_s must be >= 0, got {self.zipf_s}")
        if not 0.0 <= self.share_fraction <= 1.0:
            raise ValueError(f"workload.prefix.share_fraction must be in [0, 1], got {self.share_fraction}")
        if self.hash_block_tokens < 1:
            raise ValueError(f"workload.prefix.hash_block_tokens must be >= 1, got {self.hash_block_tokens}")

    def choose(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Prefix id of each of ``n`` requests, -1 for a request that shares nothing."""
        weights = 1.0 / np.arange(1, self.num_prefixes + 1) ** self.zipf_s
        chosen = rng.choice(self.num_prefixes, size=n, p=weights / weights.sum())
        shares = rng.random(n) < self.share_fraction
        return np.where(shares, chosen, -1)

    def block_hashes(self, seed: int, index: int, prefix_id: int, prompt_tokens: int) -> tuple[int, ...]:
        """Hashes of all blocks of request ``index`` (whose ``prompt_tokens`` include the prefix, if any)."""
        block = self.hash_block_tokens
        shared = _shared_block_hashes(prefix_id, self.prefix_tokens // block) if prefix_id >= 0 else ()
        hashes, parent = list(shared), (shared[-1] if shared else 0)
        for position in range(len(shared), -(-prompt_tokens // block)):
            parent = chain_hash(parent, 1, seed, index, position)
            hashes.append(parent)
        return tuple(hashes)
