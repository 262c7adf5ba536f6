"""Replay of recorded expert loads (vLLM EPLB windows, SGLang expert distribution CSV, OmniPlacement dumps)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from omnisim.moe.load_matrix import read_load_matrix


class ReplayLoad:
    """The shares of window i of the file during ``[i * window_s, (i + 1) * window_s)``; after the last window,
    start over (``loop``) or keep the last. A 2-D file is one window for all time. A layer that recorded no tokens
    is uniform. The file's layers and experts must match the model's."""

    def __init__(self, path: str, window_s: float = 60.0, loop: bool = True, seed: int = 0) -> None:
        if window_s <= 0:
            raise ValueError(f"replay: window_s must be > 0, got {window_s}")
        counts = read_load_matrix(path)
        self.path = str(Path(path))
        self.windows = counts if counts.ndim == 3 else counts[None]
        self.window_s = window_s
        self.loop = loop
        self.seed = seed
        totals = self.windows.sum(axis=2, keepdims=True)
        uniform = 1.0 / self.windows.shape[2]
        self._shares = np.where(totals > 0, self.windows / np.where(totals > 0, totals, 1.0), uniform)

    def time_key(self, t_s: float) -> int:
        i = int(max(t_s, 0.0) // self.window_s)
        n = len(self.windows)
        return i % n if self.loop else min(i, n - 1)

    def shares(self, t_s: float, num_layers: int, num_experts: int) -> np.ndarray:
        layers, experts = self.windows.shape[1:]
        if (layers, experts) != (num_layers, num_experts):
            raise ValueError(f"replay: {self.path} has {layers} layers x {experts} experts, the model has "
                             f"{num_layers} x {num_experts}")
        return self._shares[self.time_key(t_s)]
