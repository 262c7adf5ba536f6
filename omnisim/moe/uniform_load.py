"""Every expert equally popular: the load a perfectly balanced router would produce."""
from __future__ import annotations

import numpy as np


class UniformLoad:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def time_key(self, t_s: float) -> int:
        return 0

    def shares(self, t_s: float, num_layers: int, num_experts: int) -> np.ndarray:
        return np.full((num_layers, num_experts), 1.0 / num_experts)
