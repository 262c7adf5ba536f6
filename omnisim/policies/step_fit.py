"""A step-time line (seconds = intercept + slope * x) fitted to an instance's recent batches, pulled toward a prior.

Two stages, each shrunk toward the prior by ``weight`` pseudo-observations: first one scale factor (the mean ratio
of observed to prior times: hardware uniformly faster or slower than the prior), then ridge regression of
(intercept, slope) toward the scaled prior, the slope judged at ``x_scale``: samples spread over batch sizes also
correct the shape, a few samples of one batch size move the level (what they can tell) and leave the shape.
Stateless: the view carries the last few batches and the same batches give the same line, so no sample is counted
twice across calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True, slots=True)
class StepLine:
    intercept_s: float
    slope_s: float

    def at(self, x: float) -> float:
        return self.intercept_s + self.slope_s * x


def fit_step_line(points: Iterable[tuple[float, float]], prior: StepLine, weight: float, x_scale: float) -> StepLine:
    """Corrected (intercept, slope) for ``points`` (x, seconds); never below a tenth of the scaled prior's
    coefficients (noise cannot make a step nearly free)."""
    points = list(points)
    if not points:
        return prior
    scale = (weight + sum(y / prior.at(x) for x, y in points)) / (weight + len(points))
    prior = StepLine(prior.intercept_s * scale, prior.slope_s * scale)
    lam_b, lam_a = weight, weight * x_scale * x_scale
    n = sx = sxx = sy = sxy = 0.0
    for x, y in points:
        n += 1.0
        sx += x
        sxx += x * x
        sy += y
        sxy += x * y
    a11, a12, a22 = n + lam_b, sx, sxx + lam_a
    r1, r2 = sy + lam_b * prior.intercept_s, sxy + lam_a * prior.slope_s
    det = a11 * a22 - a12 * a12
    intercept = (r1 * a22 - a12 * r2) / det
    slope = (a11 * r2 - a12 * r1) / det
    return StepLine(max(intercept, 0.1 * prior.intercept_s), max(slope, 0.1 * prior.slope_s))
