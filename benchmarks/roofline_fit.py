"""Least-squares fit of the smooth roofline's kernel coefficients to measured kernel times: a hardware profile's
compute efficiency, memory efficiency and per-kernel latency, from a published table of GEMM times
(``fidelity_published.py``: DeepGEMM's H800 table; ``vidur_fit.py``: Vidur's A100 profiles); and the HBM fraction
of memory-bound kernels of known fixed cost (``fit_memory_fraction``: the small kernels' elementwise_efficiency).

The model is RooflineModel's per-operator rule, t = latency + ((F / (peak * e_c))^n + (B / (bw * e_m))^n)^(1/n),
fitted in log time (every kernel weighs the same, small or large): a coarse grid, then three refinements around
the best point.
"""
from __future__ import annotations

import math


def fit_roofline(flops, nbytes, seconds, peak_flops: float, bandwidth: float, n: float = 2.0,
                 latency: bool = True) -> dict:
    """Fitted ``compute_efficiency``, ``memory_efficiency``, ``kernel_latency_s`` (0 with ``latency`` False) and
    the fit's median and worst |error| in % over the kernels (``flops``, ``nbytes``, ``seconds``: one per kernel)."""
    import numpy as np

    flops, nbytes, measured = (np.asarray(a, float) for a in (flops, nbytes, seconds))
    if not (len(flops) == len(nbytes) == len(measured) > 0) or (measured <= 0).any():
        raise ValueError("fit_roofline: needs equally long, non-empty flops, bytes and positive times")
    # the coarse grid spans every fraction and latencies of 0-20 us; each refinement narrows it 8x around the best
    best, span = (0.5, 0.5, 1e-5 if latency else 0.0), (0.5, 0.5, 1e-5 if latency else 0.0)
    for _ in range(4):
        axes = [np.linspace(max(lo, b - s), min(hi, b + s), 41)
                for (b, s), (lo, hi) in zip(zip(best, span), ((0.05, 1.0), (0.05, 1.0), (0.0, 1e-4)))]
        ec, em, t0 = np.meshgrid(*axes, indexing="ij")
        best = _argmin(flops, nbytes, measured, peak_flops, bandwidth, n, ec, em, t0)
        span = tuple(s / 8 for s in span)
    ec, em, t0 = best
    err = np.abs(predict(flops, nbytes, peak_flops, bandwidth, n, ec, em, t0) / measured - 1)
    return {"n": n, "compute_efficiency": round(ec, 3), "memory_efficiency": round(em, 3),
            "kernel_latency_s": round(t0, 8), "median_abs_error_pct": round(float(np.median(err)) * 100, 1),
            "max_abs_error_pct": round(float(err.max()) * 100, 1)}


def fit_memory_fraction(nbytes, seconds, bandwidth: float, fixed_s) -> dict:
    """The fraction e of ``bandwidth`` that best fits t = fixed_s + bytes / (bandwidth * e) in log time, with the
    fit's median and worst |error| in % (``fixed_s``: one per row or one for all)."""
    import numpy as np

    nbytes, measured = np.asarray(nbytes, float), np.asarray(seconds, float)
    fixed = np.broadcast_to(np.asarray(fixed_s, float), measured.shape)
    if not len(measured) or (measured <= 0).any() or (nbytes < 0).any():
        raise ValueError("fit_memory_fraction: needs non-empty rows with positive times and bytes >= 0")
    best, span = 0.5, 0.5
    for _ in range(4):
        grid = np.linspace(max(0.01, best - span), min(1.0, best + span), 81)
        pred = fixed[None, :] + nbytes[None, :] / (bandwidth * grid[:, None])
        best = float(grid[np.argmin((np.log(pred / measured) ** 2).mean(axis=1))])
        span /= 8
    err = np.abs((fixed + nbytes / (bandwidth * best)) / measured - 1)
    return {"memory_fraction": round(best, 3), "median_abs_error_pct": round(float(np.median(err)) * 100, 1),
            "max_abs_error_pct": round(float(err.max()) * 100, 1)}


def predict(flops, nbytes, peak_flops: float, bandwidth: float, n: float, ec, em, t0):
    """The rule's time per kernel (numpy broadcasting over coefficient grids)."""
    import numpy as np

    c, m = flops / (peak_flops * ec), nbytes / (bandwidth * em)
    return t0 + (np.maximum(c, m) if math.isinf(n) else (c ** n + m ** n) ** (1 / n))


def _argmin(flops, nbytes, measured, peak_flops, bandwidth, n, ec, em, t0) -> tuple[float, float, float]:
    import numpy as np

    pred = predict(flops[None, None, None, :], nbytes[None, None, None, :], peak_flops, bandwidth, n,
                   ec[..., None], em[..., None], t0[..., None])
    loss = (np.log(pred / measured) ** 2).mean(axis=-1)
    i = np.unravel_index(np.argmin(loss), loss.shape)
    return float(ec[i]), float(em[i]), float(t0[i])
