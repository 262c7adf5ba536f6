"""Prompt and output lengths for synthetic workloads.

A ``LengthSpec`` draws (prompt, output) token-count pairs. ``IndependentLengths`` combines two one-dimensional
``LengthDistribution``s (``Fixed``, ``Uniform``, ``Lognormal``); ``EmpiricalLengths`` resamples rows of a CSV
(ShareGPT lengths, the Azure trace's ContextTokens/GeneratedTokens, any file with two count columns), so the
correlation between prompt and output length is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from omnisim.workload.trace_file import parse_counts, read_csv_table, resolve_trace_path


@runtime_checkable
class LengthDistribution(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` token counts (int64, each >= 1)."""
        ...


@runtime_checkable
class LengthSpec(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` prompt lengths and ``n`` output lengths (int64, each >= 1)."""
        ...


@dataclass(frozen=True)
class Fixed:
    value: int

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ValueError(f"Fixed.value must be >= 1, got {self.value}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


@dataclass(frozen=True)
class Uniform:
    """Integers uniform on [low, high], both included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"Uniform needs 1 <= low <= high, got low={self.low}, high={self.high}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high, size=n, endpoint=True, dtype=np.int64)


@dataclass(frozen=True)
class Lognormal:
    """Lognormal lengths, rounded and clipped to [low, high].

    Give either ``mean`` and ``cv`` (of the unclipped distribution) or ``mu`` and ``sigma`` (of the underlying
    normal). Azure 2023 conversation: prompt mean 1155 cv 0.96, output mean 211 cv 0.77.
    """

    mean: float | None = None
    cv: float | None = None
    mu: float | None = None
    sigma: float | None = None
    low: int = 1
    high: int | None = None

    def __post_init__(self) -> None:
        moments = [x is not None for x in (self.mean, self.cv)]
        params = [x is not None for x in (self.mu, self.sigma)]
        by_moments, by_params = all(moments) and not any(params), all(params) and not any(moments)
        if not (by_moments or by_params):
            raise ValueError("Lognormal needs exactly one of (mean, cv) or (mu, sigma)")
        if by_moments and not (self.mean > 0 and self.cv > 0):
            raise ValueError(f"Lognormal needs mean > 0 and cv > 0, got mean={self.mean}, cv={self.cv}")
        if by_params and not self.sigma > 0:
            raise ValueError(f"Lognormal needs sigma > 0, got sigma={self.sigma}")
        if self.low < 1 or (self.high is not None and self.high < self.low):
            raise ValueError(f"Lognormal needs 1 <= low <= high, got low={self.low}, high={self.high}")

    def normal_params(self) -> tuple[float, float]:
        if self.mu is not None and self.sigma is not None:
            return float(self.mu), float(self.sigma)
        sigma2 = math.log1p(self.cv**2)
        return math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu, sigma = self.normal_params()
        values = np.rint(rng.lognormal(mu, sigma, size=n))
        return np.clip(values, self.low, self.high if self.high is not None else np.inf).astype(np.int64)


@dataclass(frozen=True)
class IndependentLengths:
    """Prompt and output lengths drawn independently."""

    prompt: LengthDistribution
    output: LengthDistribution

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.prompt.sample(rng, n), self.output.sample(rng, n)


class EmpiricalLengths:
    """(prompt, output) pairs resampled with replacement from two count columns of a CSV file.

    ``path`` is resolved like trace paths (current directory, then repository root). A count of 0 is used as 1,
    since every request has at least one prompt and one output token. A malformed row fails with FILE:LINE.
    """

    def __init__(self, path: str, prompt_column: str, output_column: str) -> None:
        self.path = resolve_trace_path(path, field="workload.lengths.path")
        table = read_csv_table(self.path, [prompt_column, output_column])
        self.prompt_column = prompt_column
        self.output_column = output_column
        self.prompts = np.maximum(parse_counts(self.path, table, prompt_column), 1)
        self.outputs = np.maximum(parse_counts(self.path, table, output_column), 1)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        rows = rng.integers(0, len(self.prompts), size=n)
        return self.prompts[rows], self.outputs[rows]

    def __repr__(self) -> str:
        return f"EmpiricalLengths(path={str(self.path)!r}, {self.prompt_column!r}, {self.output_column!r})"


def sharegpt_lengths(path: str | Path) -> EmpiricalLengths:
    """The ShareGPT lengths CSV (sarathi-serve's llama2-tokenizer stats)."""
    return EmpiricalLengths(str(path), "num_prefill_tokens", "num_decode_tokens")
