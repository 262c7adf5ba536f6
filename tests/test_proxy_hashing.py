"""The prefix-block hashes the proxy computes for every request: pinned to their definition, since the emulator
publishes the same hashes in its KV events and the load generator sends them (backends/common/tokens.py)."""
from __future__ import annotations

import hashlib
import struct

import pytest

from backends.common.tokens import ROOT_DIGEST, block_hashes, chain_digests


def reference_digests(tokens, block_size, parent=ROOT_DIGEST, extra=None):
    """The definition, block by block: blake2b-64 of (parent digest, block bytes[, 0x1e + msgpack(extra key)])."""
    import msgspec

    out = []
    for k in range(len(tokens) // block_size):
        block = tokens[k * block_size:(k + 1) * block_size]
        data = struct.pack(f"<{block_size}q", *block) if isinstance(block[0], int) else "\x1f".join(block).encode()
        if extra and k < len(extra) and extra[k] is not None:
            data += b"\x1e" + msgspec.msgpack.encode(extra[k])
        parent = hashlib.blake2b(parent + data, digest_size=8).digest()
        out.append(parent)
    return out


@pytest.mark.parametrize("tokens", [["a", "b", "c", "d", "e"], [1, 2, 3, 4, 5], (-(2 ** 40), 0, 2 ** 40, 5),
                                    ["héllo", "", "x", "y"], []])
@pytest.mark.parametrize("block_size", [1, 2, 3, 64])
def test_chained_digests_follow_their_definition(tokens, block_size):
    assert chain_digests(tokens, block_size) == reference_digests(tokens, block_size)
    extra = [None, ["lora"]]
    assert chain_digests(tokens, block_size, b"12345678", extra) == reference_digests(tokens, block_size,
                                                                                      b"12345678", extra)


def test_block_hashes_are_stable_across_releases():
    assert block_hashes(["a", "b", "c", "d", "e"], 2) == (1973765811555044811, 6811155370336535893)
    assert block_hashes([1, 2, 3, 4, 5], 2) == (7471170043323827261, 4135971010877436707)
    assert block_hashes(["a", "b", "c", "d"], 2, "salt") == (7147896855586647634, 4489202066136149314)
    assert block_hashes(["a", "b", "c"], 4) == ()  # a partial block has no hash
    with pytest.raises(ValueError, match="block_size"):
        block_hashes(["a"], 0)
