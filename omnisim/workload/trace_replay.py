"""Replaying loaded trace rows as requests, with a start offset, rate scaling and limits."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from omnisim.core import Request
from omnisim.workload.limits import Limits


class TraceReplay:
    """Rows held as arrays (times in seconds from the trace's first row, nondecreasing; token counts as read; block
    hashes flattened with row offsets) and turned into ``Request``s one at a time.

    Rows before ``start_s`` are skipped; arrival_s = (trace time - start_s) / rate_scale. A token count of 0 is
    replayed as 1 (a request has at least one prompt and one output token), so no row is dropped.
    """

    def __init__(
        self,
        times_s: np.ndarray,
        prompts: np.ndarray,
        outputs: np.ndarray,
        start_s: float,
        limits: Limits,
        hashes: np.ndarray | None = None,
        hash_offsets: np.ndarray | None = None,
        hash_block_tokens: int = 0,
    ) -> None:
        if not start_s >= 0:
            raise ValueError(f"workload.start_s must be >= 0, got {start_s}")
        if start_s > times_s[-1]:
            raise ValueError(f"workload.start_s={start_s} is past the trace's last arrival at {times_s[-1]:.3f} s")
        self.times_s = times_s
        self.prompts = np.maximum(prompts, 1)
        self.outputs = np.maximum(outputs, 1)
        self.start_s = float(start_s)
        self.limits = limits
        self.hashes = hashes
        self.hash_offsets = hash_offsets
        self.hash_block_tokens = hash_block_tokens

    def requests(self) -> Iterator[Request]:
        first = int(np.searchsorted(self.times_s, self.start_s, side="left"))
        arrivals = (self.times_s[first:] - self.start_s) / self.limits.rate_scale
        for index, arrival_s in enumerate(arrivals.tolist()):
            if not (self.limits.count_allowed(index) and self.limits.time_allowed(arrival_s)):
                return
            row = first + index
            prompt, output = int(self.prompts[row]), int(self.outputs[row])
            if self.hashes is None:
                yield Request(f"r{index}", arrival_s, prompt, output)
            else:
                block_ids = tuple(self.hashes[self.hash_offsets[row]:self.hash_offsets[row + 1]].tolist())
                yield Request(f"r{index}", arrival_s, prompt, output, block_ids, self.hash_block_tokens)
