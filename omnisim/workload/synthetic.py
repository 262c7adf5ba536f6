"""Synthetic workloads: renewal arrivals (Poisson or Gamma-bursty), optional rate steps, sampled lengths and
optional shared prefixes."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from omnisim.core import Request
from omnisim.workload.lengths import LengthSpec, sharegpt_lengths
from omnisim.workload.limits import Limits
from omnisim.workload.prefix import PrefixSpec
from omnisim.workload.rate_steps import RateSteps
from omnisim.workload.trace_file import resolve_trace_path

SHAREGPT_PATH = "../shared/traces/sharegpt_lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"

# Draws happen in fixed-size chunks from separate streams, so a request's values do not depend on the limits.
_CHUNK = 1024


class SyntheticWorkload:
    """Arrivals with gamma-distributed gaps of mean 1/rate and coefficient of variation ``cv`` (1 = Poisson,
    > 1 bursty, 0 = evenly spaced), optionally modulated by ``rate_steps`` ([[start_s, multiplier], ...]).

    Lengths come from ``lengths`` (a LengthSpec); ``prefix`` (a PrefixSpec) adds shared system prompts and prefix
    hashes. Needs ``max_requests`` or ``duration_s``, since the process itself never ends.
    """

    def __init__(
        self,
        seed: int,
        rate: float,
        lengths: LengthSpec,
        cv: float = 1.0,
        prefix: PrefixSpec | None = None,
        rate_steps: Sequence[Sequence[float]] | None = None,
        rate_scale: float = 1.0,
        max_requests: int | None = None,
        duration_s: float | None = None,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"workload.rate must be a positive number of requests per second, got {rate}")
        if not (cv >= 0 and math.isfinite(cv)):
            raise ValueError(f"workload.cv must be >= 0, got {cv}")
        _check_pairs(lengths)
        self.limits = Limits(rate_scale, max_requests, duration_s)
        if not self.limits.bounded:
            raise ValueError("a synthetic workload needs workload.max_requests or workload.duration_s")
        self.seed = int(seed)
        self.rate = float(rate)
        self.cv = float(cv)
        self.lengths = lengths
        self.prefix = prefix
        self.rate_steps = RateSteps(rate_steps) if rate_steps is not None else None

    def _gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.cv == 0:
            return np.full(n, 1.0 / self.rate)
        shape = 1.0 / self.cv**2
        return rng.gamma(shape, 1.0 / (self.rate * shape), size=n)

    def requests(self) -> Iterator[Request]:
        arrival_rng, length_rng, prefix_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(3)
        )
        base_clock, index = 0.0, 0
        while True:
            base_times = base_clock + np.cumsum(self._gaps(arrival_rng, _CHUNK))
            base_clock = float(base_times[-1])
            times = self.rate_steps.warp(base_times) if self.rate_steps else base_times
            times = times / self.limits.rate_scale
            prompts, outputs = self.lengths.sample(length_rng, _CHUNK)
            prefix_ids = self.prefix.choose(prefix_rng, _CHUNK) if self.prefix else None
            for j in range(_CHUNK):
                arrival_s = float(times[j])
                if not (self.limits.count_allowed(index) and self.limits.time_allowed(arrival_s)):
                    return
                yield self._request(index, arrival_s, int(prompts[j]), int(outputs[j]), prefix_ids, j)
                index += 1

    def _request(self, index: int, arrival_s: float, prompt: int, output: int, prefix_ids, j: int) -> Request:
        if self.prefix is None:
            return Request(f"r{index}", arrival_s, prompt, output)
        prefix_id = int(prefix_ids[j])
        if prefix_id >= 0:
            prompt += self.prefix.prefix_tokens
        hashes = self.prefix.block_hashes(self.seed, index, prefix_id, prompt)
        return Request(f"r{index}", arrival_s, prompt, output, hashes, self.prefix.hash_block_tokens)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(seed={self.seed}, rate={self.rate}, cv={self.cv}, lengths={self.lengths!r}, "
                f"prefix={self.prefix!r}, rate_steps={self.rate_steps!r}, {self.limits})")


def _check_pairs(lengths: LengthSpec) -> None:
    """Fail here, naming the field, rather than at the first draw: a one-dimensional distribution such as a bare
    Lognormal has the same ``sample`` method but draws one array, not (prompts, outputs)."""
    if not isinstance(lengths, LengthSpec):
        raise ValueError(f"workload.lengths must be a LengthSpec (with sample(rng, n)), got {lengths!r}")
    drawn = lengths.sample(np.random.default_rng(0), 1)
    if not (isinstance(drawn, tuple) and len(drawn) == 2):
        raise ValueError(f"workload.lengths must draw (prompt, output) pairs, got {lengths!r}: wrap one-dimensional "
                         f"distributions as IndependentLengths(prompt=..., output=...)")


class PoissonWorkload(SyntheticWorkload):
    """Poisson arrivals at ``rate`` requests per second (exponential gaps)."""

    def __init__(
        self,
        seed: int,
        rate: float,
        lengths: LengthSpec,
        prefix: PrefixSpec | None = None,
        rate_steps: Sequence[Sequence[float]] | None = None,
        rate_scale: float = 1.0,
        max_requests: int | None = None,
        duration_s: float | None = None,
    ) -> None:
        super().__init__(seed, rate, lengths, 1.0, prefix, rate_steps, rate_scale, max_requests, duration_s)


class GammaWorkload(SyntheticWorkload):
    """Bursty arrivals: gamma gaps with mean 1/rate and coefficient of variation ``cv``."""

    def __init__(
        self,
        seed: int,
        rate: float,
        cv: float,
        lengths: LengthSpec,
        prefix: PrefixSpec | None = None,
        rate_steps: Sequence[Sequence[float]] | None = None,
        rate_scale: float = 1.0,
        max_requests: int | None = None,
        duration_s: float | None = None,
    ) -> None:
        super().__init__(seed, rate, lengths, cv, prefix, rate_steps, rate_scale, max_requests, duration_s)


class ShareGPTWorkload(SyntheticWorkload):
    """Poisson arrivals at ``rate`` with (prompt, output) pairs resampled from the ShareGPT lengths CSV at ``path``
    (columns num_prefill_tokens, num_decode_tokens)."""

    def __init__(
        self,
        seed: int,
        rate: float,
        path: str = SHAREGPT_PATH,
        prefix: PrefixSpec | None = None,
        rate_steps: Sequence[Sequence[float]] | None = None,
        rate_scale: float = 1.0,
        max_requests: int | None = None,
        duration_s: float | None = None,
    ) -> None:
        lengths = sharegpt_lengths(resolve_trace_path(path, field="workload.path"))
        super().__init__(seed, rate, lengths, 1.0, prefix, rate_steps, rate_scale, max_requests, duration_s)
