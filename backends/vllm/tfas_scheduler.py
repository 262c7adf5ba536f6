"""vLLM's v1 engine scheduler with an omnisim engine policy (OmniInfer's TFAS by default) deciding, before every
step, the waiting queue's order and the step's token budget: the very ``omnisim.policies.TFAS`` object the simulator
and the emulator run.

    python -m vllm.entrypoints.openai.api_server ... --scheduler-cls backends.vllm.tfas_scheduler.TFASScheduler

``backend=vllm`` and ``backend=ascend`` add that flag to prefill and mixed instances when ``engine_policy=`` is set,
with ``OMNISIM_ENGINE_POLICY`` holding the resolved conf/engine_policy node as JSON (or a conf/engine_policy option
name); without the variable the class runs TFAS with its published defaults. ``OMNISIM_ENGINE_POLICY_LOG=PATH``
appends one JSON line per decision (the queue it saw, the order and budget it chose, the requests vLLM admitted).

How it plugs into vLLM (read from vLLM 0.32's ``vllm/v1/core/sched/scheduler.py``, the same two attributes
OmniInfer's own TFASScheduler sets): ``schedule()`` admits from ``self.waiting`` (an FCFS deque) front to back and
starts each step with ``token_budget = self.max_num_scheduled_tokens``; the step's input is capped separately at
``scheduler_config.max_num_batched_tokens``. So this class reorders ``self.waiting`` in place and sets
``max_num_scheduled_tokens`` to the policy's budget (at most the configured one; the conformance check holds every
engine policy to that), then calls vLLM's ``schedule()``.

What the policy sees: per waiting request ``QueuedPrompt(request_id, tokens = num_tokens - num_computed_tokens,
queued_s = arrival_time, preemptions)``, and ``now_s = time.time()`` (vLLM stamps ``arrival_time`` with
``time.time()``). vLLM looks a request's prefix-cache hit up only when it admits it, so ``tokens`` includes cached
prefix tokens here (as OmniInfer's TFAS counts them), while the simulator subtracts the hit it expects.
Requests in ``kv_holding_waiting`` (KV already allocated: vLLM drains them first) are left alone.

Imports vllm: load it only inside a vLLM process (vLLM resolves ``--scheduler-cls`` by name in its engine core).
"""
from __future__ import annotations

import json
import os
import time
from collections import deque

from vllm.logger import logger as log  # vLLM's configured logger (a logger of our own would print nothing)
from vllm.v1.core.sched.scheduler import Scheduler

from backends.vllm.launch_plan import ENGINE_POLICY_ENV, ENGINE_POLICY_LOG_ENV
from omnisim.core import QueuedPrompt

try:  # vLLM >= 0.11 schedules the next step while the current one runs, through its own subclass
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
except ImportError:  # pragma: no cover - older vLLM
    AsyncScheduler = None


def policy_from_env(value: str | None):
    """The engine policy ``OMNISIM_ENGINE_POLICY`` describes: a JSON conf/engine_policy node (what backend=vllm
    passes: every configured value), the name of a conf/engine_policy option, or, unset, TFAS's defaults."""
    from omnisim.app import compose_option, instantiate_node
    from omnisim.policies import TFAS

    text = (value or "").strip()
    if not text:
        return TFAS()
    if text.startswith("{"):
        try:
            node = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{ENGINE_POLICY_ENV}: not a JSON engine_policy config ({e})") from None
    else:
        try:
            node = compose_option("engine_policy", text)
        except ValueError as e:
            raise ValueError(f"{ENGINE_POLICY_ENV}={text!r}: {e}") from None
    policy = instantiate_node(node, seed=0)
    if not callable(getattr(policy, "plan", None)):
        raise ValueError(f"{ENGINE_POLICY_ENV}: {type(policy).__name__} is not an engine policy (no plan)")
    return policy


def queued_prompts(requests) -> list[QueuedPrompt]:
    """vLLM requests, in queue order, as the policy sees them."""
    return [QueuedPrompt(r.request_id, r.num_tokens - r.num_computed_tokens, r.arrival_time,
                         getattr(r, "num_preemptions", 0)) for r in requests]


class TFASScheduler(Scheduler):
    def __new__(cls, vllm_config, *args, **kwargs):
        # vLLM picks its AsyncScheduler only when no scheduler class is given; a plain Scheduler subclass under
        # async scheduling would lose its output placeholders, so take the async variant when vLLM runs async.
        if cls is TFASScheduler and AsyncScheduler is not None and vllm_config.scheduler_config.async_scheduling:
            cls = TFASAsyncScheduler
        return super().__new__(cls)

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        kv = vllm_config.kv_transfer_config
        if kv is not None and kv.kv_role == "kv_consumer":
            raise ValueError("TFASScheduler: a kv_consumer (PD decode) instance prefills nothing; give "
                             "--scheduler-cls to prefill and mixed instances only (as OmniInfer does)")
        if not isinstance(self.waiting, deque):
            raise ValueError("TFASScheduler: reorders an FCFS waiting queue; run with --scheduling-policy fcfs")
        self.engine_policy = policy_from_env(os.environ.get(ENGINE_POLICY_ENV))
        self.configured_tokens = self.max_num_scheduled_tokens  # the policy's max_num_batched_tokens
        path = os.environ.get(ENGINE_POLICY_LOG_ENV)
        self._log = open(path, "a", buffering=1) if path else None
        log.info("TFASScheduler: %s decides order and token budget (max %d) in %s", type(self.engine_policy).__name__,
                 self.configured_tokens, type(self).__name__)

    def schedule(self, *args, **kwargs):
        waiting = self.waiting
        queued = queued_prompts(waiting)
        now = time.time()
        order, budget = self.engine_policy.plan(queued, self.configured_tokens, now)
        order = list(order)
        if sorted(order) != list(range(len(queued))):
            raise ValueError(f"{type(self.engine_policy).__name__}.plan returned {order[:8]}..., not a permutation "
                             f"of the {len(queued)} waiting requests")
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= self.configured_tokens:
            raise ValueError(f"{type(self.engine_policy).__name__}.plan returned token budget {budget!r}: expected an "
                             f"int in 1..{self.configured_tokens} (max_num_batched_tokens)")
        if order != list(range(len(queued))):
            items = list(waiting)
            waiting.clear()
            waiting.extend(items[i] for i in order)
        self.max_num_scheduled_tokens = budget
        output = super().schedule(*args, **kwargs)
        if self._log is not None and queued:
            self._log.write(json.dumps({
                "pid": os.getpid(), "scheduler": type(self).__name__, "now_s": now, "max_num_batched_tokens": self.configured_tokens,
                "waiting": [[q.request_id, q.tokens, q.queued_s] for q in queued],
                "order": [queued[i].request_id for i in order], "budget": budget,
                "admitted": [r.req_id for r in output.scheduled_new_reqs]}) + "\n")
        return output

    def shutdown(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        super().shutdown()


if AsyncScheduler is not None:
    class TFASAsyncScheduler(TFASScheduler, AsyncScheduler):
        """TFASScheduler under vLLM's async scheduling (chosen by TFASScheduler itself)."""
