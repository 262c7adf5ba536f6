"""What an expert-load model is, and how the tokens of a step are routed top-k according to one.

A load model gives, per MoE layer, each expert's share of the routed picks at time t (rows sum to 1), constant
while ``time_key(t)`` is: the runtime caches everything derived from the shares under that key, so a model
whose load drifts continuously quantises time into its key.

Routing: a token picks ``top_k`` distinct experts, so an expert is picked by at most every token, and its share of
the picks is at most 1 / top_k. ``inclusion`` caps shares at 1 / top_k (water-filling: the excess goes to the
others in proportion) and scales by top_k: the probability that a token picks the expert. A step of T tokens then
routes ``Binomial(T, inclusion)`` tokens to each expert: exact per-expert marginals, vectorised over layers,
experts and samples in one call; only the coupling that makes every token's picks sum to exactly top_k is dropped
(the total is exact in expectation).
"""
from __future__ import annotations

from typing import Hashable, Protocol

import numpy as np


class ExpertLoadModel(Protocol):
    def time_key(self, t_s: float) -> Hashable:
        """Equal keys promise equal ``shares``."""

    def shares(self, t_s: float, num_layers: int, num_experts: int) -> np.ndarray:
        """``[num_layers, num_experts]`` expected share of routed picks per expert (rows sum to 1)."""


def inclusion(shares: np.ndarray, top_k: int) -> np.ndarray:
    """``[layers, experts]`` probability that a token picks each expert (rows sum to ``top_k``, entries <= 1)."""
    shares = np.asarray(shares, dtype=np.float64)
    layers, experts = shares.shape
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, {experts}], got {top_k}")
    # a floor keeps rows with fewer than top_k live experts routable
    s = shares / shares.sum(axis=1, keepdims=True) * (1 - 1e-9) + 1e-9 / experts
    order = np.argsort(-s, axis=1, kind="stable")
    ranked = np.take_along_axis(s, order, axis=1)
    tail = np.cumsum(ranked[:, ::-1], axis=1)[:, ::-1]                     # sum of ranked[m:]
    m = np.arange(top_k)                                                      # how many are capped
    scale = (1.0 - m / top_k) / tail[:, :top_k]                               # [layers, top_k]
    fits = scale * ranked[:, :top_k] <= 1.0 / top_k + 1e-15                   # the (m+1)-th no longer needs a cap
    capped = np.argmax(fits, axis=1)                                          # first m that fits (always exists)
    c = scale[np.arange(layers), capped]
    out_ranked = np.where(np.arange(experts)[None, :] < capped[:, None], 1.0 / top_k, ranked * c[:, None])
    out = np.empty_like(out_ranked)
    np.put_along_axis(out, order, out_ranked, axis=1)
    return np.minimum(out * top_k, 1.0)


def route_counts(rng: np.random.Generator, picks: np.ndarray, tokens: int, samples: int | None = None) -> np.ndarray:
    """Tokens routed to each expert in a step of ``tokens`` tokens: ``[layers, experts]`` (or
    ``[samples, layers, experts]``), ``picks`` from ``inclusion``."""
    shape = picks.shape if samples is None else (samples, *picks.shape)
    return rng.binomial(int(tokens), np.broadcast_to(picks, shape))
