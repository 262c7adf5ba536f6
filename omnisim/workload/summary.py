"""A few numbers that describe a workload, for notebooks, tests and sanity checks against published stats."""
from __future__ import annotations

import numpy as np

from omnisim.workload.workload import Workload


def summarize_workload(workload: Workload) -> dict:
    """Count, span, mean rate, inter-arrival CV, prompt/output length mean and percentiles, and the fraction of
    prompt tokens an infinite prefix cache would serve (leading-block matching over ``prefix_hashes``, 0 when the
    requests carry none)."""
    arrivals, prompts, outputs = [], [], []
    seen: set[int] = set()
    hit_tokens = 0
    with_hashes = 0
    for request in workload.requests():
        arrivals.append(request.arrival_s)
        prompts.append(request.prompt_tokens)
        outputs.append(request.output_tokens)
        if request.prefix_hashes:
            with_hashes += 1
            matched = 0
            for block_hash in request.prefix_hashes:
                if block_hash not in seen:
                    break
                matched += 1
            hit_tokens += min(matched * request.hash_block_tokens, request.prompt_tokens)
            seen.update(request.prefix_hashes)
    count = len(arrivals)
    if count == 0:
        return {"count": 0}
    times = np.asarray(arrivals)
    gaps = np.diff(times)
    span = float(times[-1] - times[0])
    summary = {
        "count": count,
        "first_arrival_s": float(times[0]),
        "span_s": span,
        "mean_rate_per_s": (count - 1) / span if span > 0 else float("nan"),
        "interarrival_cv": float(gaps.std() / gaps.mean()) if gaps.size and gaps.mean() > 0 else float("nan"),
        "prefix_hashed_fraction": with_hashes / count,
        "prefix_hit_token_fraction": hit_tokens / float(np.sum(prompts)),
    }
    for name, values in (("prompt", np.asarray(prompts)), ("output", np.asarray(outputs))):
        summary[f"{name}_mean"] = float(values.mean())
        for q in (50, 90, 99):
            summary[f"{name}_p{q}"] = float(np.percentile(values, q))
        summary[f"{name}_max"] = int(values.max())
    return summary
