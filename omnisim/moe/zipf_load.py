"""Skewed, time-invariant expert popularity: Zipf-like over a per-layer random ranking (each layer its hot set)."""
from __future__ import annotations

import numpy as np


def zipf_weights(num_experts: int, exponent: float) -> np.ndarray:
    """Share of the expert of popularity rank i (0 = hottest): proportional to (i + 1) ** -exponent."""
    w = (np.arange(num_experts) + 1.0) ** -exponent
    return w / w.sum()


def layer_exponents(rng: np.random.Generator, num_layers: int, exponent: float, spread: float) -> np.ndarray:
    """Per-layer exponents, uniform in exponent +- spread (clipped at 0): some layers are more skewed."""
    return np.clip(exponent + rng.uniform(-spread, spread, num_layers), 0.0, None)


class ZipfLoad:
    """Share of expert e in layer l: ``(rank_l(e) + 1) ** -s_l``, normalised; ``rank_l`` is a seeded random
    permutation per layer (independent hot sets), ``s_l`` the exponent (+- ``exponent_spread`` per layer).
    exponent 0 is uniform; about 0.5 gives a hottest expert ~8x the mean over 256 experts. ``variant`` picks
    another draw of hot sets for the same seed (e.g. one per kind of request in a ``MixedLoad``)."""

    def __init__(self, exponent: float = 0.6, exponent_spread: float = 0.0, variant: int = 0, seed: int = 0) -> None:
        if isinstance(variant, bool) or not isinstance(variant, int) or variant < 0:
            raise ValueError(f"zipf: variant must be an integer >= 0, got {variant!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"zipf: seed must be an integer >= 0, got {seed!r}")
        if exponent < 0 or exponent_spread < 0:
            raise ValueError(f"zipf: exponent and exponent_spread must be >= 0, got {exponent}, {exponent_spread}")
        self.exponent = exponent
        self.exponent_spread = exponent_spread
        self.variant = variant
        self.seed = seed
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def time_key(self, t_s: float) -> int:
        return 0

    def shares(self, t_s: float, num_layers: int, num_experts: int) -> np.ndarray:
        shape = (num_layers, num_experts)
        if shape not in self._cache:
            rng = np.random.default_rng([self.seed, self.variant, num_layers, num_experts])
            exps = layer_exponents(rng, num_layers, self.exponent, self.exponent_spread)
            rows = [zipf_weights(num_experts, s)[rng.permutation(num_experts)] for s in exps]
            self._cache[shape] = np.array(rows)
        return self._cache[shape]
