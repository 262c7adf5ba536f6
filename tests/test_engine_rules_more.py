"""More engine rules, pinned with concrete numbers: each test here fails on a mutant of omnisim/engine that the
first suite (tests/test_engine_scheduler.py) let through (a mutation run over omnisim/engine).

Covered: preemption bookkeeping (tokens so far, context, queued work, stale step events after a second preemption or
an abort), abort in every queue, PD decode seats and block counts, the prefill side's hold and release, the engine
policy's inputs, budget edges of a step, the plan's work figures, KV reservation at join, statistics and the
``dirty`` flag drivers rebuild InstanceState on, the closed-form decode run, KV events and a never-served record."""
from __future__ import annotations

import math
import random

import pytest

from omnisim.core import Request
from omnisim.core.engine_policy import FCFS
from omnisim.engine import BlockManager, DecodeRun, KVLinkQueue, Scheduler, Sequence, StepPlan
from tests.test_engine_scheduler import B, Events, run_all, sched, seq


def step(s, plan, k=None, now=1.0):
    s.complete(plan, plan.steps if k is None else k, now, now)


# -- recompute preemption: what the preempted request keeps, what the instance counts ------------------------------
def test_preemption_keeps_tokens_so_far_and_queues_prompt_plus_output_first():
    s, _ = sched(blocks=4, tokens=1000)
    old, new = seq("old", 16, 40), seq("new", 16, 40)
    s.submit(old)
    s.submit(new)
    step(s, s.schedule(0.0))  # both prefilled: 1 token each, 2 blocks each (prompt + 1 reserved): the cache is full
    late = seq("late", 16, 5)
    s.submit(late)  # no block for it: it waits
    plan = s.schedule(1.0)
    assert plan.steps == 15 and not plan.chunks and plan.decode_context == 2 * 17  # both fill 2 blocks at 32
    step(s, plan)
    # at step 15 old needs a block: new (the newest) is preempted with 1 + 15 tokens, old takes one of its blocks
    assert (s.steps, new.preemptions, old.preemptions) == (15, 1, 0)
    assert new.generated == 16 and new.prefill_target == 32 and new.computed == 0 and new.held_blocks == 0
    assert s.ctx_sum == 32 and s.generated(old) == 16  # only old's context (16 + 16) is left
    assert s.pending_prefill == 16 + 32  # late's prompt plus new's recompute
    assert [x.id for x in s.waiting] == ["new", "late"] and s.bm.free == 1 and old.held_blocks == 3


def test_a_recomputed_request_continues_from_its_tokens_so_far():
    s, _ = sched(blocks=4, tokens=1000)
    s.trace = []
    old, new = seq("old", 16, 40), seq("new", 16, 40)
    s.submit(old)
    s.submit(new)
    plans = run_all(s)
    assert old.generated == new.generated == 40 and new.preemptions == 1 and s.n_preemptions == 1
    # old takes new's blocks and runs out at step 39; new recomputes its 32 tokens there, samples its 17th token,
    # and decodes the other 23 (its third block is needed at context 48, step 54)
    assert s.trace[2:] == [(15, 16, (), ("old",)), (31, 8, (), ("old",)), (39, 1, (("new", 32),), ()),
                           (39, 15, (), ("new",)), (54, 8, (), ("new",))]
    assert plans[-1].decode_seqs == 1 and plans[-1].decode_context == 16 + 17 + 15
    assert s.pending_prefill == 0 and s.ctx_sum == 0 and s.bm.used == 0
    assert s.prefill_tokens_done == 16 + 16 + 32 and s.decode_tokens_done == 2 * 15 + 16 + 8 + 15 + 8


class Spy(FCFS):
    def __init__(self):
        self.calls = []

    def plan(self, waiting, budget, now):
        self.calls.append((now, [(w.request_id, w.tokens, w.queued_s, w.preemptions) for w in waiting]))
        return super().plan(waiting, budget, now)


def test_the_engine_policy_sees_the_clock_dispatch_times_and_a_preempted_request_recomputing():
    spy = Spy()
    s, _ = sched(blocks=4, tokens=1000, policy=spy)
    old, new = seq("old", 16, 40), seq("new", 16, 40)
    old.t_prefill_dispatch, new.t_prefill_dispatch = 0.25, 0.5
    s.submit(old)
    s.submit(new)
    s.schedule(2.0)
    assert spy.calls == [(2.0, [("old", 16, 0.25, 0), ("new", 16, 0.5, 0)])]
    run_all(s, now=3.0)  # the prefill ends at 4.0, the 15 decode steps at 19.0
    # new was preempted at step 15 with 16 tokens: it asks for 32 again, all of them to compute
    assert (19.0, [("new", 32, 0.5, 1)]) in spy.calls


def test_an_engine_policy_budget_of_one_token_is_valid():
    class OneToken(FCFS):
        def plan(self, waiting, budget, now):
            return list(range(len(waiting))), 1

    s, _ = sched(policy=OneToken())
    a = seq("a", 3, 1)
    s.submit(a)
    assert [c for _, c in s.schedule(0.0).chunks] == [1]


# -- stale step events: a request preempted twice, or aborted after a preemption, must not cut others' runs ------------
def _three(blocks=6, outputs=(60, 20, 40), abort_at=None):
    """y, z, x (newest), 16-token prompts, 2 blocks each after their prefill; x is the one preempted when KV runs
    out. The driver cuts a run at ``abort_at`` and aborts x there. Returns the plans as (step, steps run, chunks,
    running, decode context)."""
    s, _ = sched(blocks=blocks, tokens=1000)
    y, z, x = (seq(rid, 16, out) for rid, out in zip("yzx", outputs))
    for q in (y, z, x):
        s.submit(q)
    log, now = [], 0.0
    while (plan := s.schedule(now)) is not None:
        k = plan.steps
        if abort_at is not None and s.steps < abort_at < s.steps + k:
            k = abort_at - s.steps  # the driver cuts the run, as new work would
        log.append((s.steps, k, tuple((q.id, c) for q, c in plan.chunks), tuple(s.running), plan.decode_context))
        now += k
        s.complete(plan, k, now, now)
        if s.steps == abort_at and x.t_finish != x.t_finish:
            assert s.abort(x, now)
    return s, log, (x, y, z)


def test_a_request_preempted_twice_leaves_no_live_step_event_behind():
    s, log, (x, y, z) = _three()
    assert log == [
        (0, 1, (("y", 16), ("z", 16), ("x", 16)), (), 0),
        (0, 15, (), ("y", "z", "x"), 3 * 17),  # all three fill their 2 blocks at step 15: x is preempted
        (15, 4, (), ("y", "z"), 2 * 32),  # z ends at 19
        (19, 1, (("x", 32),), ("y",), 36),
        (20, 11, (), ("y", "x"), 37 + 33),  # y needs a block at 31: x is preempted again
        (31, 16, (), ("y",), 48),  # y alone to its next block at 47 (not cut by x's old events at 35 and 43)
        (47, 12, (), ("y",), 64),
        (59, 1, (("x", 44),), (), 0),
        (59, 11, (), ("x",), 45),
    ]
    assert (x.preemptions, x.generated, y.generated, z.generated, s.bm.used) == (2, 40, 60, 20, 0)


def test_aborting_a_request_that_was_preempted_drops_all_its_step_events():
    s, log, (x, y, z) = _three(abort_at=22)
    assert log[4:] == [(20, 2, (), ("y", "x"), 70), (22, 9, (), ("y",), 39), (31, 16, (), ("y",), 48),
                       (47, 12, (), ("y",), 64)]
    assert x.t_finish == 23.0 and x.generated == 17 + 2 and y.generated == 60 and s.bm.used == 0


def test_a_recomputed_request_ignores_the_finish_planned_before_its_preemption():
    s, log, (x, y, z) = _three(blocks=7, outputs=(40, 30, 40))
    # x is preempted at step 15 with 16 tokens (its finish was then planned for step 39), recomputes when z ends at
    # 29 and joins at 30 with 17: it finishes at step 53, having made all its 40 tokens
    assert log[3:] == [(29, 1, (("x", 32),), ("y",), 46), (30, 1, (), ("y", "x"), 47 + 33),
                       (31, 8, (), ("y", "x"), 48 + 34), (39, 6, (), ("x",), 42), (45, 8, (), ("x",), 48)]
    assert (x.preemptions, x.generated, x.t_finish) == (1, 40, 54.0)


# -- abort in each place -------------------------------------------------------------------------------------------
def test_abort_of_a_queued_request_returns_its_expected_uncached_tokens():
    s, _ = sched(blocks=4)
    s.submit(seq("a", 64, 1, (1, 2, 3, 4)))
    run_all(s)  # a's 4 blocks stay cached (LRU)
    s.submit(seq("big", 64, 1))  # takes all 4 blocks (evicting a's): b below cannot be admitted
    b = seq("b", 64, 1, (1, 2, 3, 4))
    s.submit(b)  # counted as 16 uncached tokens: 48 cached when it was queued
    assert s.pending_prefill == 64 + 16
    plan = s.schedule(0.0)
    assert [x.id for x, _ in plan.chunks] == ["big"] and list(s.waiting) == [b]
    s.dirty = False
    assert s.abort(b, 0.5) and b.t_finish == 0.5 and s.dirty
    assert s.pending_prefill == 64 and not s.waiting
    assert b.row()[3:5] == (0, 0)  # no token generated, nothing cached


def test_abort_of_a_chunked_prefill_returns_only_its_uncomputed_tokens():
    s, _ = sched(tokens=40)
    a = seq("a", 100, 5)
    s.submit(a)
    step(s, s.schedule(0.0))
    assert a.computed == 40 and s.pending_prefill == 60
    assert s.abort(a, 1.0) and s.pending_prefill == 0 and s.bm.used == 0


def test_abort_of_a_running_request_keeps_the_tokens_it_made_after_a_late_join():
    s, ev = sched(reserve=1024)
    a = seq("a", 10, 20)
    s.submit(a)
    step(s, s.schedule(0.0))
    step(s, s.schedule(1.0), 3)  # a's run of 19 steps cut after 3
    c = seq("c", 10, 20)
    s.submit(c)
    step(s, s.schedule(2.0))  # c prefilled in step 4: joins at step 4 with its first token
    assert (s.steps, c.join_step, s.generated(a), s.generated(c)) == (4, 4, 5, 1)
    plan = s.schedule(3.0)
    assert plan.steps == 15  # to a's last token at step 19
    step(s, plan, 5)
    assert s.generated(c) == 6 and s.generated(a) == 10
    assert s.abort(c, 4.0) and c.generated == 6 and s.ctx_sum == 10 + 10
    assert s.generated(c) == 6 and s.generated(seq("never", 5, 5)) == 0  # not running: its own count
    assert s.schedule(4.0).steps == 10 and s.bm.used == a.held_blocks


def test_abort_of_pd_decodes_waiting_for_blocks_or_for_the_batch():
    s, ev = sched(blocks=10, reserve=2 * B)
    x, y, w = seq("x", 40, 10), seq("y", 30, 10), seq("w", 50, 10)
    for q in (x, y, w):
        s.submit_remote(q)  # 4 and 3 blocks (prompt + reserve, capped at prompt + output): w's 4 must wait
    assert ev.pulled == ["x", "y"] and list(s.remote) == [w] and s.remote_tokens == 120 and s.bm.free == 3
    s.kv_arrived(x)
    s.dirty = False
    assert s.abort(w, 1.0) and not s.remote and s.remote_tokens == 70 and s.dirty
    assert s.abort(x, 1.0) and not s.ready and s.remote_tokens == 30 and s.bm.free == 7
    assert s.num_waiting == 1 and s.transferring == 1


# -- PD: seats and blocks of the decode side, hold and release on the prefill side -----------------------------------
def test_pd_decodes_hold_seats_while_their_kv_moves_and_waits_to_join():
    s, ev = sched(seqs=2)
    x, y, z = seq("x", 40, 10), seq("y", 40, 10), seq("z", 40, 10)
    s.submit_remote(x)
    s.submit_remote(y)
    s.submit_remote(z)
    assert ev.pulled == ["x", "y"] and s.transferring == 2 and list(s.remote) == [z]
    s.kv_arrived(x)  # x ready, y transferring: still two seats taken
    s.admit_remote()
    assert ev.pulled == ["x", "y"] and s.transferring == 1 and s.ready == [x]
    s.schedule(0.0)  # x joins the batch
    assert list(s.running) == ["x"] and ev.pulled == ["x", "y"]
    local = seq("local", 10, 2)
    s.submit(local)  # a colocated prompt finds no seat either: x runs, y transfers
    assert not s.schedule(0.0).chunks and list(s.waiting) == [local]


def test_pd_decode_blocks_are_the_prompt_plus_reserve_capped_at_the_whole_sequence():
    s, ev = sched(blocks=100, reserve=2 * B)
    long_out, short_out = seq("long", 40, 100), seq("short", 40, 10)
    s.submit_remote(long_out)
    assert s.bm.free == 100 - 5 and long_out.held_blocks == 5  # 3 blocks for 40 tokens + 2 reserved
    s.submit_remote(short_out)
    assert s.bm.free == 95 - 4 and short_out.held_blocks == 4  # 50 tokens in all need 4 blocks


def test_pd_queue_admits_when_blocks_come_back_and_tells_the_driver():
    s, ev = sched(blocks=7, reserve=2 * B)
    x, y = seq("x", 40, 2), seq("y", 40, 100)
    s.submit_remote(x)  # 3 blocks (42 tokens in all)
    s.dirty = False
    s.submit_remote(y)  # 5 blocks, 4 free: y waits, still a change (one more waiting, its prompt tokens counted)
    assert s.dirty and list(s.remote) == [y] and s.num_waiting == 2 and s.remote_tokens == 80
    s.kv_arrived(x)
    plan = s.schedule(1.0)
    assert plan.steps == 2 and plan.decode_seqs == 1
    step(s, plan)  # x's two tokens: its blocks come back
    assert ev.done == ["x"] and s.bm.free == 7 and ev.pulled == ["x"]
    s.dirty = False
    assert s.schedule(5.0) is None  # nothing to run yet, but y got its blocks and its pull starts
    assert ev.pulled == ["x", "y"] and s.dirty and s.bm.free == 2
    s.dirty = False
    s.kv_arrived(y)
    assert s.dirty and s.ready == [y]


def test_pd_prefill_side_releases_cached_units_to_the_lru_and_says_whether_work_waits():
    s, ev = sched(blocks=10)
    x = seq("x", 40, 10, (1, 2), local=False)  # two full blocks are cacheable, the third is private
    s.submit(x)
    step(s, s.schedule(0.0))
    assert ev.done_prefill == ["x"] and x.sent_keys == (1, 2) and x.sent_blocks == 1 and s.bm.used == 3
    s.dirty = False
    assert s.release_sent(x) is False and s.dirty
    assert s.bm.used == 0 and s.bm.lru_blocks == 2 and s.bm.refs == {1: 0, 2: 0}
    assert (x.sent_keys, x.sent_blocks) == ((), 0)
    y = seq("y", 40, 10, (1, 2), local=False)
    s.submit(y)
    step(s, s.schedule(1.0))
    assert y.cached == 32
    s.submit(seq("z", 10, 1))
    assert s.release_sent(y) is True  # z waits here: the driver must wake the engine


# -- a step's budget and seats at their edges --------------------------------------------------------------------
def _decoding(n, tokens, seqs=8):
    """A scheduler with ``n`` requests decoding (long outputs) and nothing else."""
    s, _ = sched(tokens=1000, seqs=seqs, reserve=1024)
    for i in range(n):
        s.submit(seq(f"d{i}", 4, 100))
    step(s, s.schedule(0.0))
    s.max_tokens = tokens
    return s


def test_no_admission_when_running_decodes_take_the_whole_budget():
    s = _decoding(2, tokens=2)
    w = seq("w", 10, 1)
    s.submit(w)
    free = s.bm.free
    plan = s.schedule(1.0)
    assert not plan.chunks and plan.decode_seqs == 2 and list(s.waiting) == [w]
    assert s.bm.free == free and math.isnan(w.t_prefill_start)  # not admitted: no KV, no start time


def test_a_single_token_of_budget_admits_and_chunks_one_token():
    s = _decoding(2, tokens=3)
    w = seq("w", 10, 1)
    s.submit(w)
    plan = s.schedule(1.0)
    assert [(x.id, c) for x, c in plan.chunks] == [("w", 1)] and w.t_prefill_start == 1.0


def test_a_prefill_left_without_budget_stays_waiting_and_one_left_token_gets_a_chunk():
    # vLLM v1 admits waiting requests only while token budget is left (`while self.waiting and token_budget > 0`),
    # each taking its chunk: a request is never admitted (its KV allocated) into a step that computes none of it
    s, _ = sched(tokens=20)
    a, b = seq("a", 20, 1), seq("b", 10, 1)
    s.submit(a)
    s.submit(b)
    free = s.bm.free
    plan = s.schedule(0.0)
    assert [(x.id, c) for x, c in plan.chunks] == [("a", 20)] and s.prefilling == [a] and list(s.waiting) == [b]
    assert math.isnan(b.t_prefill_start) and free - s.bm.free == 20 // s.block_size + (20 % s.block_size > 0)
    s, _ = sched(tokens=21)
    s.submit(seq("a", 20, 1))
    s.submit(seq("b", 10, 1))
    assert [c for _, c in s.schedule(0.0).chunks] == [20, 1]


def test_running_requests_take_seats_from_new_prompts():
    s = _decoding(1, tokens=1000, seqs=2)
    for rid in ("p", "q"):
        s.submit(seq(rid, 10, 1))
    plan = s.schedule(1.0)
    assert [x.id for x, _ in plan.chunks] == ["p"] and [x.id for x in s.waiting] == ["q"]


def test_a_plan_sums_the_work_of_all_its_chunks():
    s, _ = sched(tokens=1000)
    s.submit(seq("a", 10, 1))
    s.submit(seq("b", 20, 1))
    plan = s.schedule(0.0)
    assert (plan.prefill_tokens, plan.prefill_context) == (30, 30)
    assert plan.prefill_attention == pytest.approx(10 * 11 / 2 + 20 * 21 / 2)
    s, _ = sched(tokens=1000, reserve=1024)
    s.submit(seq("a", 10, 50))
    step(s, s.schedule(0.0))
    plan = s.schedule(1.0)  # decode only: no prefill work at all
    assert (plan.prefill_tokens, plan.prefill_attention, plan.prefill_context) == (0, 0.0, 0)
    assert StepPlan((), 3, 1, 11).prefill_tokens == 0


def test_an_abort_during_a_step_drops_only_that_requests_chunk():
    s, _ = sched(tokens=1000)
    a, b = seq("a", 10, 5), seq("b", 20, 5)
    s.submit(a)
    s.submit(b)
    plan = s.schedule(0.0)
    s.abort(a, 0.5)
    step(s, plan)
    assert b.computed == 20 and b.generated == 1 and list(s.running) == ["b"]
    assert s.prefill_tokens_done == 20 and s.pending_prefill == 0


def test_admission_reconciles_the_hit_expected_when_queued_with_the_hit_found():
    s, _ = sched(tokens=1000)
    a = seq("a", 64, 1, (1, 2, 3, 4))
    s.submit(a)
    plan = s.schedule(0.0)
    b = seq("b", 64, 1, (1, 2, 3, 4))
    s.submit(b)  # a is still computing: nothing is cached yet, b counts all 64 tokens
    assert s.pending_prefill == 64 + 64
    step(s, plan)  # a done, its 4 blocks cached
    assert s.pending_prefill == 64
    s.dirty = False
    s.schedule(1.0)  # b admitted with 48 cached tokens
    assert b.cached == 48 and s.pending_prefill == 16 and s.dirty


def test_a_prompt_larger_than_the_cache_is_a_clear_error_even_with_a_cached_prefix():
    s, _ = sched(blocks=4)
    s.submit(seq("a", 32, 1, (1, 2)))
    run_all(s)  # 2 blocks cached
    s.submit(seq("huge", 80, 1, (1, 2)))  # 5 blocks: 2 cached + 3 new, more than the 4 the instance has
    with pytest.raises(AssertionError, match="i: huge needs more KV than the instance has"):
        s.schedule(0.0)


# -- KV reservation ------------------------------------------------------------------------------------------------
def test_a_prefilled_request_reserves_decode_kv_when_it_joins():
    s, _ = sched(reserve=B)
    a = seq("a", 20, 40)
    s.submit(a)
    step(s, s.schedule(0.0))
    assert a.held_blocks == 3 and s.bm.used == 3  # 2 for 21 tokens of context + 1 reserved at once
    assert s.schedule(1.0).steps == 48 - 21  # its next block is needed when its context reaches 48


def test_a_pd_decode_whose_kv_already_has_the_reserve_waits_to_extend():
    s, _ = sched(reserve=2 * B)
    x = seq("x", 32, 100)
    s.submit_remote(x)
    assert x.held_blocks == 4
    s.kv_arrived(x)
    plan = s.schedule(0.0)
    assert x.held_blocks == 4 and plan.steps == 64 - 32  # 32 reserved tokens are exactly the reserve


def test_the_last_reservation_stops_at_the_sequences_final_size():
    s, _ = sched(reserve=2 * B)
    a = seq("a", 16, 40)  # 56 tokens in all: 4 blocks
    s.submit(a)
    step(s, s.schedule(0.0))
    assert a.held_blocks == 1 + 2
    plan = s.schedule(1.0)
    assert plan.steps == 48 - 17
    step(s, plan)
    assert a.held_blocks == 4 and s.bm.used == 4  # one more block, not the 2 of a full reservation
    assert s.schedule(2.0).steps == 40 - 1 - 31


def test_an_aborted_request_holds_no_kv_and_leaves_its_prefix_cached():
    s, _ = sched(blocks=10)
    a = seq("a", 40, 10, (1, 2))
    s.submit(a)
    step(s, s.schedule(0.0))
    assert a.held_blocks == 4 and s.bm.used == 4
    assert s.abort(a, 1.0) and a.held_blocks == 0 and s.bm.used == 0 and s.bm.lru_blocks == 2


def test_reserve_tokens_round_up_to_blocks_and_default_to_256():
    s, _ = sched(reserve=40)
    a = seq("a", 16, 500)
    s.submit(a)
    step(s, s.schedule(0.0))
    assert s.reserve_blocks == 3 and a.held_blocks == 1 + 3
    d = Scheduler("d", BlockManager(1000, B), Events(), max_num_seqs=4, max_num_batched_tokens=100)
    assert d.reserve_blocks == 256 // B and d.caching and d.dirty is True and d.steps == 0
    d.submit(seq("b", 16, 500))
    d.complete(d.schedule(0.0), 1, 1.0, 1.0)
    assert d.bm.used == 1 + 16


def test_a_late_joiner_extends_its_kv_when_its_own_context_fills_it():
    s, _ = sched(reserve=B)
    a = seq("a", 16, 200)
    s.submit(a)
    step(s, s.schedule(0.0))
    step(s, s.schedule(1.0), 5)  # 5 decode steps
    c = seq("c", 20, 200)
    s.submit(c)
    step(s, s.schedule(2.0))  # c joins at step 6 with 21 tokens in 3 blocks
    assert (s.steps, c.join_step, c.held_blocks) == (6, 6, 3)
    # a fills its 2 blocks at step 15 and its third at 31; c fills its 3 blocks (48 tokens) at step 6 + 27
    plans = run_all(s, now=3.0)
    assert [p.steps for p in plans[:3]] == [15 - 6, 31 - 15, 33 - 31]


# -- statistics and the policy-facing view -------------------------------------------------------------------------
def test_statistics_count_tokens_and_the_peak_kv_usage():
    s, _ = sched(blocks=10, tokens=1000)
    a, b = seq("a", 32, 3), seq("b", 16, 2)
    s.submit(a)
    s.submit(b)
    assert s.prefill_tokens_done == 0 and s.decode_tokens_done == 0 and s.peak_kv_usage == 0.0
    step(s, s.schedule(0.0))
    assert s.prefill_tokens_done == 48 and s.peak_kv_usage == pytest.approx(5 / 10)  # 2 + 1 and 1 + 1 blocks
    run_all(s, now=1.0)
    assert s.decode_tokens_done == 2 + 1 and s.prefill_tokens_done == 48 and s.peak_kv_usage == pytest.approx(0.5)


def test_kv_usage_counts_referenced_blocks_only():
    s, _ = sched(blocks=10)
    s.submit(seq("a", 32, 1, (1, 2)))
    run_all(s)  # 2 cached units left in the LRU
    assert s.bm.lru_blocks == 2 and s.kv_usage() == 0.0
    s.submit(seq("b", 48, 1))
    s.schedule(0.0)
    assert s.kv_usage() == pytest.approx(3 / 10)


def test_every_change_a_policy_sees_marks_the_scheduler_dirty():
    s, _ = sched()
    a = seq("a", 20, 3)
    s.submit(a)
    s.dirty = False
    plan = s.schedule(0.0)  # admission: a moves from waiting to prefilling
    assert s.dirty
    s.dirty = False
    step(s, plan)
    assert s.dirty


def test_the_trace_records_the_step_counter_from_zero():
    s, _ = sched(reserve=1024)
    s.trace = []
    s.submit(seq("a", 10, 4))
    run_all(s)
    assert s.trace == [(0, 1, (("a", 10),), ()), (0, 3, (), ("a",))] and s.steps == 3


# -- the closed-form run -------------------------------------------------------------------------------------------
def _boundary(a, b, e):
    """The first m >= 1 whose end (m * a + b * m * (m - 1) / 2, as DecodeRun computes it) is at or after e."""
    m = 1
    while m * a + b * m * (m - 1) / 2 < e:
        m += 1
    return m


@pytest.mark.timeout(20)
def test_decode_run_boundaries_match_stepping_one_step_at_a_time():
    rng = random.Random(7)
    for _ in range(3000):
        a = rng.choice([0.1, 0.3, 0.7, 1e-3, 0.02, rng.uniform(1e-3, 1.0)])
        b = rng.choice([0.0, 0.0, 1e-4, 0.1, rng.uniform(0, 0.05)])
        run = DecodeRun(5.0, a, b, 400)
        m = rng.randint(1, 300)
        for t in (run.end_of(m), run.end_of(m) - 1e-12, run.end_of(m) + 1e-12, 5.0 + rng.uniform(0, run.end_of(m) - 5)):
            assert run.boundary_after(t) == _boundary(a, b, t - 5.0), (a, b, t)
        assert run.elapsed(m) == pytest.approx(run.end_of(m) - 5.0) and run.elapsed(m) >= 0
    assert DecodeRun(0.0, 0.5, 0.25).elapsed(4) == pytest.approx(4 * 0.5 + 0.25 * 6)


@pytest.mark.timeout(10)
def test_decode_run_boundary_is_closed_form_however_long_the_run():
    """A billion steps in: the boundary comes from the quadratic's root (rounding settled by a step or two either
    way), not from walking the run step by step."""
    for b in (0.0, 1e-12, 1e-9, 2.0):
        run = DecodeRun(0.0, 1e-3, b, 10 ** 12)
        for m in range(10 ** 9, 10 ** 9 + 200):
            end, step_s = run.end_of(m), run.end_of(m) - run.end_of(m - 1)
            assert run.boundary_after(end) == m
            assert run.boundary_after(end - 1e-7 * step_s) == m
            assert run.boundary_after(end - (1 - 1e-7) * step_s) == m


def test_decode_runs_are_equal_only_when_all_their_fields_are():
    run = DecodeRun(1.0, 0.5, 0.01, 20)
    assert run == DecodeRun(1.0, 0.5, 0.01, 20)
    for other in (run.cut(7), DecodeRun(2.0, 0.5, 0.01, 20), DecodeRun(1.0, 0.4, 0.01, 20),
                  DecodeRun(1.0, 0.5, 0.0, 20)):
        assert run != other
    assert DecodeRun(0.0, 1.0) == DecodeRun(0.0, 1.0, 0.0, 1)


def test_kv_link_queue_chains_transfers_that_arrive_as_the_egress_frees():
    from omnisim.cluster import KVLink

    q = KVLinkQueue(KVLink(bandwidth_GBps=1.0, latency_s=0.1))
    assert q.send(0.0, 1e9) == pytest.approx(1.1) and q.free_s == pytest.approx(1.0)
    assert q.send(1.0, 1e9) == pytest.approx(2.1)  # exactly when the egress frees: no wait, no gap


# -- KV events and the block manager's own checks ------------------------------------------------------------------
def test_stored_blocks_carry_the_token_size_of_a_unit():
    events = []
    bm = BlockManager(10, B, events.extend)
    assert bm.acquire((), 4)
    bm.store((7, 8), 2)
    assert [(e.block_hashes, e.parent_block_hash, e.block_size) for e in events] == [((7, 8), None, 2 * B)]


def test_block_manager_check_catches_lost_and_negative_blocks():
    bm = BlockManager(4, B)
    bm.check()
    bm.lru_blocks = -1
    bm.lru[99] = -1
    bm.refs[99] = 0
    bm.unit_blocks[99] = -1
    with pytest.raises(AssertionError):
        bm.check()
    bm = BlockManager(4, B)
    assert bm.acquire((), 2)
    bm.store((1, 2), 1)
    bm.free = 3  # 3 free + 2 cached > 4
    with pytest.raises(AssertionError):
        bm.check()


def test_lru_eviction_takes_just_enough_units_oldest_first():
    events = []
    bm = BlockManager(4, B, events.extend)
    assert bm.acquire((), 4)
    bm.store((1, 2, 3), 1)
    bm.release((3,))
    bm.release((1, 2))  # LRU: 3, then 2, then 1
    bm.give(1)
    assert bm.take(1) and events[-1].block_hashes == (1, 2, 3)  # the free block: no eviction
    assert bm.take(1) and events[-1].block_hashes == (3,) and bm.free == 0
    assert bm.acquire((1,), 1) and events[-1].block_hashes == (2,)  # reviving 1 leaves 2 to evict


# -- a request that was never served -------------------------------------------------------------------------------
def test_a_never_served_request_has_an_empty_record():
    req = Request("r", 2.5, 100, 10)
    row = Sequence(req, B).row("error", "too long")
    assert row[:7] == ("r", 2.5, 100, 0, 0, "", "")
    assert all(math.isnan(t) for t in row[7:14])
    assert row[14:] == (0, "error", "too long")
    assert Sequence(req, B).row()[-2:] == ("ok", "")
    assert Sequence(req, B).held_blocks == 0


def test_a_hash_block_size_that_is_not_a_multiple_of_the_kv_block_is_a_clear_error():
    with pytest.raises(ValueError, match="hash_block_tokens=24 is not a multiple of the KV block size 16"):
        Sequence(Request("r", 0.0, 100, 10, (1, 2), 24), B)
