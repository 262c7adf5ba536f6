"""OmniInfer's TFAS engine-side prefill scheduler (``omni/adaptors/vllm/worker/tfas/tfas_scheduler.py``; REFERENCE.md).

Before every engine step, on a prefill (or colocated) instance:
- order: requests that have waited longer than ``timeout_s`` first, in arrival order; then the rest shortest prompt
  first (equal lengths keep queue order);
- budget: ``max(token_budget, alpha * sqrt(waiting_tokens / 1024 * adjust_param) * 1024)`` tokens for the step, with
  ``waiting_tokens`` the prompt tokens waiting; OmniInfer truncates to an int twice (inside, then after ``alpha``),
  and so does this class;
- ``admit_whole`` (OmniInfer's ``_accumulate_until_bound``): walking the ordered queue, the request whose prompt
  takes the running total past the budget is not cut into a chunk: the budget grows to that total + 1;
- the budget is capped by the engine's ``max_num_batched_tokens``, as OmniInfer does (``min(max_num_batched_tokens,
  bound)``): vLLM sizes a step's input buffers by it, so TFAS can only raise the budget up to it. Give prefill
  instances a generous ``max_num_batched_tokens`` (OmniInfer's R1 prefill: 32768 here) and TFAS lowers it when the
  queue is short.

OmniInfer's published rule reads ``time.time()`` and each request's arrival at the engine; this one reads only its
arguments (``now_s`` and ``QueuedPrompt.queued_s``), so the simulator, the emulator and vLLM (through
``backends.vllm.tfas_scheduler``) get the same decisions for the same inputs. It keeps no state.
"""
from __future__ import annotations

import math
from typing import Sequence

from omnisim.core.engine_policy import QueuedPrompt


class TFAS:
    def __init__(self, token_budget: int = 9154, alpha: float = 0.9, adjust_param: float = 3.6,
                 timeout_s: float = 60.0, admit_whole: bool = True) -> None:
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"tfas: token_budget must be an int >= 1, got {token_budget!r}")
        for name, value in (("alpha", alpha), ("adjust_param", adjust_param)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"tfas: {name} must be a finite number > 0, got {value!r}")
        # inf is a legal timeout: no request ever jumps the queue for having waited
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s >= 0:
            raise ValueError(f"tfas: timeout_s must be >= 0 seconds, got {timeout_s!r}")
        if not isinstance(admit_whole, bool):
            raise ValueError(f"tfas: admit_whole must be true or false, got {admit_whole!r}")
        self.token_budget = token_budget
        self.alpha = float(alpha)
        self.adjust_param = float(adjust_param)
        self.timeout_s = float(timeout_s)
        self.admit_whole = admit_whole

    def bound(self, waiting_tokens: int) -> int:
        """The formula: max(token_budget, alpha * sqrt(waiting_tokens / 1024 * adjust_param) * 1024)."""
        grown = int(self.alpha * int(math.sqrt(waiting_tokens / 1024 * self.adjust_param) * 1024))
        return max(self.token_budget, grown)

    def order(self, waiting: Sequence[QueuedPrompt], now_s: float) -> list[int]:
        late, rest = [], []
        for k, w in enumerate(waiting):
            if now_s - w.queued_s > self.timeout_s:
                late.append((w.queued_s, k))
            else:
                rest.append((w.tokens, k))
        late.sort()
        rest.sort()
        return [k for _, k in late] + [k for _, k in rest]

    def plan(self, waiting: Sequence[QueuedPrompt], max_num_batched_tokens: int, now_s: float
             ) -> tuple[list[int], int]:
        order = self.order(waiting, now_s)
        budget = self.bound(sum(w.tokens for w in waiting))
        if self.admit_whole:
            total = 0
            for k in order:
                total += waiting[k].tokens
                if total > budget:
                    budget = total + 1
                    break
        return order, min(max_num_batched_tokens, budget)
