"""A run of engine steps timed in closed form: the simulator's unit of time, one event however many steps it holds.

While a decode batch does not change, each step adds one token of context to every sequence, so a step's time is
affine in the step index: step i (from 0) takes ``a + b * i`` seconds, and k steps take ``k * a + b * k * (k - 1) / 2``.
A prefill step is a run of one step (``b = 0``). New work cuts a run at the first step boundary after it arrives.
"""
from __future__ import annotations

import math


class DecodeRun:
    """``k`` steps starting at ``t0``; step i takes ``a + b * i`` seconds. A value: ``cut`` returns a new run."""

    __slots__ = ("t0", "a", "b", "k")

    def __init__(self, t0: float, a: float, b: float = 0.0, k: int = 1) -> None:
        self.t0, self.a, self.b, self.k = t0, a, b, k

    def elapsed(self, m: int) -> float:
        """Seconds the first ``m`` steps take."""
        return m * self.a + self.b * m * (m - 1) / 2

    @property
    def duration(self) -> float:
        k = self.k
        return k * self.a + self.b * k * (k - 1) / 2

    @property
    def first_step_end(self) -> float:
        return self.t0 + self.a

    def boundary_after(self, t: float) -> int:
        """The number of steps completed at the first step boundary at or after time ``t`` (at least 1)."""
        a, b = self.a, self.b
        e = t - self.t0
        if b > 1e-15:
            m = math.ceil((-(a - b / 2) + math.sqrt((a - b / 2) ** 2 + 2 * b * e)) / b)
        else:
            m = math.ceil(e / a)
        m = max(m, 1)
        # the square root rounds: settle on the exact boundary
        while m > 1 and (m - 1) * a + b * (m - 1) * (m - 2) / 2 >= e:
            m -= 1
        while m * a + b * m * (m - 1) / 2 < e:
            m += 1
        return m

    def cut(self, m: int) -> "DecodeRun":
        """The same run ending after its first ``m`` steps."""
        return DecodeRun(self.t0, self.a, self.b, m)

    def end_of(self, m: int) -> float:
        """The time the first ``m`` steps end."""
        return self.t0 + m * self.a + self.b * m * (m - 1) / 2

    def __repr__(self) -> str:
        return f"DecodeRun(t0={self.t0!r}, a={self.a!r}, b={self.b!r}, k={self.k})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DecodeRun) and (self.t0, self.a, self.b, self.k) == (other.t0, other.a, other.b,
                                                                                       other.k)
