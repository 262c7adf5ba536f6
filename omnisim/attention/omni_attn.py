"""OmniAttn as OmniInfer ships it (omni/accelerators/cache): a layer pattern (1 = compressed), and on compressed
layers a KV of ``sink`` blocks at the start plus a ring buffer of the ``recent`` blocks; the cache is split into
one block pool per group, compressed layers getting ``int(N * beta)`` blocks and full layers
``int(N * (1 + (1 - beta) * n_compressed / (n_full + 1)))``, N being the blocks per layer of an uncompressed cache.
Decode instances only: prefill runs full attention, and prefix caching is off where OmniAttn is on.
"""
from __future__ import annotations

from dataclasses import dataclass

# OmniInfer's shipped default for DeepSeek-R1 (61 layers + the MTP layer = 62 entries): 30 compressed layers.
R1_COMPRESSED_LAYERS = (0, 3, 4, 5, 6, 7, 9, 10, 11, 13, 14, 15, 18, 19, 29, 33, 34, 35, 36, 37, 38, 40, 42, 44, 47,
                        49, 51, 52, 55, 60)


@dataclass(frozen=True)
class OmniAttn:
    """``pattern``: one entry per layer (the model's layers, optionally followed by its MTP layer), 1 = compressed.
    ``sink`` and ``recent``: blocks a compressed layer keeps at the start and at the end of the context.
    ``beta``: the share of an uncompressed cache's blocks that the compressed layers' pool gets."""

    pattern: tuple[int, ...]
    sink: int = 1
    recent: int = 3
    beta: float = 0.2

    def __post_init__(self) -> None:
        pattern = tuple(self.pattern)
        object.__setattr__(self, "pattern", pattern)
        if not pattern:
            raise ValueError("attention.pattern: empty; give one entry (0 or 1) per layer")
        bad = [(i, v) for i, v in enumerate(pattern) if v not in (0, 1) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"attention.pattern[{bad[0][0]}]: expected 0 or 1, got {bad[0][1]!r}")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"attention.sink: expected an int >= 0 (blocks), got {self.sink!r}")
        if not isinstance(self.recent, int) or self.recent < 1:
            raise ValueError(f"attention.recent: expected an int >= 1 (blocks), got {self.recent!r}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"attention.beta: expected a fraction in (0, 1), got {self.beta!r}")

    @classmethod
    def from_layers(cls, num_layers: int, compressed: tuple[int, ...] | list[int], **kw) -> "OmniAttn":
        """The pattern with ``compressed`` layer indices set, of ``num_layers`` entries."""
        bad = [i for i in compressed if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"attention: compressed layer {bad[0]} outside 0..{num_layers - 1}")
        chosen = set(compressed)
        return cls(tuple(int(i in chosen) for i in range(num_layers)), **kw)

    @property
    def compressed(self) -> int:
        return sum(self.pattern)

    @property
    def full(self) -> int:
        return len(self.pattern) - self.compressed

    @property
    def window_blocks(self) -> int:
        """Blocks one sequence holds in a compressed layer once its context is past the window."""
        return self.sink + self.recent

    def window_tokens(self, block_size: int) -> int:
        return self.window_blocks * block_size

    def pool_blocks(self, uncompressed_blocks: int) -> tuple[int, int]:
        """(full layers' blocks, compressed layers' blocks) per layer for a cache that would hold
        ``uncompressed_blocks`` blocks per layer without OmniAttn (OmniInfer's split)."""
        n = uncompressed_blocks
        if not self.compressed:
            return n, 0
        full = int(n * (1 + (1 - self.beta) * self.compressed / (self.full + 1)))
        return full, int(n * self.beta)

    def check_model(self, layers: int, where: str = "attention") -> None:
        """The pattern covers the model's layers (and at most one MTP layer after them)."""
        if len(self.pattern) not in (layers, layers + 1):
            raise ValueError(f"{where}.pattern has {len(self.pattern)} entries; the model has {layers} layers "
                             f"(give {layers}, or {layers + 1} with the MTP layer)")

    def model_fractions(self, layers: int) -> tuple[float, float]:
        """(full, compressed) shares of the model's ``layers`` attention layers (the MTP entry, if any, is not one
        of them: the cost model has no MTP layer)."""
        c = sum(self.pattern[:layers])
        return (layers - c) / layers, c / layers

    def attention_context(self, context: int, block_size: int, layers: int) -> float:
        """Context tokens one decode step of a sequence attends to, averaged over the model's layers: all of it on
        full layers, at most the sink + recent window on compressed ones (what decode attention reads and
        computes; what a PD transfer moves for the prompt)."""
        full, comp = self.model_fractions(layers)
        w = self.window_tokens(block_size)
        return full * context + comp * (context if context < w else w)

    def decode_capacity(self, uncompressed_blocks: int) -> tuple[int, int]:
        """(blocks of the full layers' pool, the most sequences the compressed layers' pool seats) on a decode
        instance whose cache would hold ``uncompressed_blocks`` blocks per layer without OmniAttn. The full pool
        bounds context, the compressed pool bounds sequences: OmniInfer's OmniAttentionManager gives every request
        its ``window_blocks`` there at admission, whatever its length, so seats are exact, not an estimate."""
        full, comp = self.pool_blocks(uncompressed_blocks)
        if not self.compressed:
            return full, 1 << 62
        return full, comp // self.window_blocks

    def decode_pools(self, uncompressed_blocks: int, block_size: int, layers: int,
                     where: str = "cluster.decode") -> "DecodePools":
        """What a decode instance's engine needs (omnisim.engine.Scheduler's ``attention``): its two pools and the
        per-layer shares of the model's ``layers`` that decode attention reads in full or in the window.
        ValueError when the compressed pool seats no sequence (the instance could never admit one)."""
        full, seats = self.decode_capacity(uncompressed_blocks)
        comp = self.pool_blocks(uncompressed_blocks)[1]
        if seats < 1:
            raise ValueError(f"{where}: with attention=omni_attn the compressed layers' pool ({comp} blocks = "
                             f"{self.beta} x {uncompressed_blocks}) seats no sequence of {self.window_blocks} blocks "
                             f"(attention.sink + attention.recent); raise the KV capacity or attention.beta")
        f_full, f_comp = self.model_fractions(layers)
        return DecodePools(full, seats, comp, self.window_blocks, self.window_tokens(block_size),
                           f_full, f_comp)

    def omniinfer_config(self) -> dict:
        """OmniInfer's ``omni_attn_config`` (--additional-config, with ``enable_omni_attn: true``): its checks want
        ints for sink and recent, a float for beta and a list of 0/1 for pattern."""
        return {"sink": int(self.sink), "recent": int(self.recent), "beta": float(self.beta),
                "pattern": [int(v) for v in self.pattern]}

    def check_deployment(self, cluster, layers: int) -> None:
        """OmniAttn as OmniInfer runs it: on the decode instances of a disaggregated cluster, with a pattern that
        fits the model. OmniInfer's attention metadata refuses prefills on an OmniAttn instance ("Only support PD
        disaggregation and only enabled in D now"), so a colocated cluster is refused rather than modelled."""
        if not cluster.disaggregated:
            raise ValueError("attention=omni_attn: OmniAttn runs on the decode instances of a disaggregated "
                             "(prefill + decode) cluster; OmniInfer refuses prefills on an OmniAttn instance, so a "
                             "colocated (mixed) cluster cannot use it: pick a PD cluster, or run without attention=")
        self.check_model(layers)


@dataclass(frozen=True)
class DecodePools:
    """One decode instance's OmniAttn, as its engine scheduler uses it (``OmniAttn.decode_pools``).

    ``full_blocks``: the block manager's size (one block = ``block_size`` tokens of every full layer);
    ``seats``: sequences the compressed pool holds (``window_blocks`` each, of ``compressed_blocks``);
    ``window_tokens``: the sink + recent tokens a compressed layer reads; ``full_frac`` / ``comp_frac``: the shares
    of the model's layers that are full / compressed."""

    full_blocks: int
    seats: int
    compressed_blocks: int
    window_blocks: int
    window_tokens: int
    full_frac: float
    comp_frac: float

    @property
    def seat_usage(self) -> float:
        """The compressed pool's usage per sequence holding KV there."""
        return self.window_blocks / self.compressed_blocks if self.compressed_blocks else 0.0

    def attention_context(self, context: int) -> float:
        """Per-layer-averaged context one decode step of a ``context``-token sequence reads (OmniAttn's
        ``attention_context``); also the tokens whose KV a PD transfer moves for a prompt of ``context`` tokens."""
        w = self.window_tokens
        return self.full_frac * context + self.comp_frac * (context if context < w else w)
