"""The contract's own rules (omnisim.core), pinned with concrete numbers where a mutation run (mutmut over
omnisim/core) found them unpinned: the reusable-prefix rule, PrefixIndex event handling, the view's lookups, request
validation, and the placement arrays' invariants and loads."""
from __future__ import annotations

import math

import numpy as np
import pytest

from omnisim.core import (NO_PREFIX_CACHE, AllBlocksCleared, BlockRemoved, BlockStored, ClusterView, ExpertLoad,
                          InstanceState, Phase, Placement, PrefixIndex, Request, Role, Topology)
from omnisim.core.prefix_index import reusable_tokens


def req(prompt, hashes=(), block=512, id="r"):
    return Request(id, 0.0, prompt, 1, tuple(hashes), block if hashes else 0)


# ---- reusable_tokens: whole blocks, leading run, never the last prompt token -----------------------------------------
def test_reusable_tokens_counts_whole_leading_blocks():
    cache = {1, 2, 3, 9}
    assert reusable_tokens(req(2000, (1, 2, 3)), cache) == 3 * 512  # 1536 < 2000: every block
    assert reusable_tokens(req(2000, (1, 5, 3)), cache) == 512      # the run stops at the first miss
    assert reusable_tokens(req(2000, (5, 2, 3)), cache) == 0
    assert reusable_tokens(req(1300, (1, 2, 3)), cache) == 2 * 512  # the third hash names a partial block: not whole
    assert reusable_tokens(req(2000, (1, 2, 3), block=16), cache) == 48


def test_reusable_tokens_never_reuses_the_last_prompt_token():
    # a fully cached prompt of exactly two blocks reuses one: the last token must be computed for the first logits
    assert reusable_tokens(req(1024, (1, 2)), {1, 2}) == 512
    assert reusable_tokens(req(1025, (1, 2)), {1, 2}) == 1024
    assert reusable_tokens(req(512, (1,)), {1}) == 0
    assert reusable_tokens(req(513, (1,)), {1}) == 512


def test_reusable_tokens_without_hashes_or_cache_is_zero():
    assert reusable_tokens(req(2000), {1, 2}) == 0  # a request that names no blocks matches nothing
    assert reusable_tokens(req(2000, (1, 2)), set()) == 0
    assert reusable_tokens(req(2000, (1, 2)), frozenset({1})) == 512  # any container


# ---- PrefixIndex ----------------------------------------------------------------------------------------------------
def test_prefix_index_applies_stored_removed_and_cleared_events_in_order():
    index = PrefixIndex()
    r = req(5000, (11, 12, 13, 14))
    index.apply("a", [BlockStored((11, 12)), BlockStored((13,), parent_block_hash=12, block_size=512)])
    index.apply("b", [BlockStored((11,))])
    assert index.cached_tokens(r, "a") == 3 * 512 and index.cached_tokens(r, "b") == 512
    index.apply("a", [BlockRemoved((12,))])
    assert index.cached_tokens(r, "a") == 512 and index.cached_blocks(r, "a") == 1
    index.apply("a", [BlockStored((12, 14)), BlockRemoved((99,))])  # an unknown hash removed: ignored
    assert index.cached_blocks(r, "a") == 4
    index.apply("a", [BlockRemoved((11,)), BlockStored((11,))])  # one batch, in order: removed, then back
    assert index.cached_blocks(r, "a") == 4
    index.apply("a", [BlockStored((11,)), AllBlocksCleared(), BlockStored((11,))])
    assert index.cached_blocks(r, "a") == 1
    index.apply("a", [AllBlocksCleared()])
    assert index.cached_tokens(r, "a") == 0 and index.cached_tokens(r, "b") == 512  # only that instance


def test_prefix_index_cached_blocks_is_the_leading_run_whatever_the_prompt_length():
    index = PrefixIndex()
    index.apply("a", [BlockStored((1, 2, 4))])
    assert index.cached_blocks(req(5000, (1, 2, 3, 4)), "a") == 2
    assert index.cached_blocks(req(1024, (1, 2)), "a") == 2  # blocks, not the last-token rule ...
    assert index.cached_tokens(req(1024, (1, 2)), "a") == 512  # ... which cached_tokens applies
    assert index.cached_blocks(req(100), "a") == 0


def test_prefix_index_unknown_instances_and_forget():
    index = PrefixIndex()
    r = req(5000, (1, 2))
    assert index.cached_blocks(r, "nobody") == 0 and index.cached_tokens(r, "nobody") == 0
    index.forget("nobody")  # no-op
    index.apply("a", [BlockStored((1, 2))])
    index.apply("c", [])
    assert index.cached_tokens(r, "c") == 0
    index.forget("a")
    assert index.cached_blocks(r, "a") == 0 and index.cached_tokens(r, "a") == 0
    index.apply("a", [BlockStored((1,))])  # a forgotten instance starts empty
    assert index.cached_blocks(r, "a") == 1


def test_prefix_index_rejects_what_is_not_a_kv_event():
    index = PrefixIndex()
    with pytest.raises(TypeError, match="not a KV event"):
        index.apply("a", [BlockStored((1,)), ("stored", 2)])


# ---- ClusterView ----------------------------------------------------------------------------------------------------
class Lookup:
    def cached_tokens(self, request, instance_id):
        return {"p0": 100, "m0": 7}.get(instance_id, 0)


def test_cluster_view_lookups():
    states = (InstanceState("p0", Role.PREFILL), InstanceState("p1", Role.PREFILL, healthy=False),
              InstanceState("d0", Role.DECODE), InstanceState("m0", Role.MIXED))
    v = ClusterView(now_s=1.0, instances=states, prefix=Lookup())
    assert [s.id for s in v.candidates(Phase.PREFILL)] == ["p0", "m0"]
    assert [s.id for s in v.candidates(Phase.DECODE)] == ["d0", "m0"]
    assert v.instance("d0") is states[2] and v.instance("p1") is states[1]  # unhealthy ones are still in the view
    with pytest.raises(KeyError, match="p9"):
        v.instance("p9")
    r = req(1000)
    assert v.cached_tokens(r, "p0") == 100 and v.cached_tokens(r, "m0") == 7 and v.cached_tokens(r, "d0") == 0
    plain = ClusterView(now_s=0.0, instances=states)  # a driver that knows no cache contents
    assert plain.prefix is NO_PREFIX_CACHE
    assert all(plain.cached_tokens(r, s.id) == 0 for s in states)


# ---- Request --------------------------------------------------------------------------------------------------------
def test_request_validation_boundaries_and_messages():
    r = Request("ok", 0.0, 1, 1, (5,), 1)  # the smallest valid request: one prompt token, one output, 1-token block
    assert r.total_tokens == 2
    assert Request("t", 2.5, 300, 20).total_tokens == 320
    for kw, field in ((dict(prompt_tokens=0), "prompt_tokens"), (dict(output_tokens=0), "output_tokens"),
                      (dict(arrival_s=-0.1), "arrival_s"), (dict(arrival_s=math.nan), "arrival_s"),
                      (dict(prefix_hashes=(1,), hash_block_tokens=0), "hash_block_tokens")):
        args = dict(id="bad7", arrival_s=0.0, prompt_tokens=10, output_tokens=10) | kw
        with pytest.raises(ValueError, match=rf"bad7: .*{field}"):
            Request(**args)


# ---- Topology, ExpertLoad, Placement --------------------------------------------------------------------------------
def test_topology_checks_and_slots():
    t = Topology(num_ranks=4, slots_per_rank=3, num_nodes=2, num_groups=8)
    assert t.num_slots == 12
    Topology(1, 1)
    for kw, field in ((dict(num_ranks=0), "num_ranks"), (dict(slots_per_rank=0), "slots_per_rank"),
                      (dict(num_nodes=0), "num_nodes"), (dict(num_groups=0), "num_groups")):
        with pytest.raises(ValueError, match=f"Topology.{field} must be >= 1"):
            Topology(**(dict(num_ranks=4, slots_per_rank=2) | kw))
    with pytest.raises(ValueError, match="num_ranks=6 is not divisible by num_nodes=4"):
        Topology(6, 2, num_nodes=4)


def test_expert_load_is_a_read_only_float_copy():
    source = np.array([[1, 2, 3], [0, 0, 5]])
    load = ExpertLoad(source)
    source[0, 0] = 100
    assert load.counts.dtype == np.float64 and load.counts[0, 0] == 1.0
    assert (load.num_layers, load.num_experts) == (2, 3)
    with pytest.raises(ValueError):
        load.counts[0, 0] = 7.0
    with pytest.raises(ValueError, match=r"\[layers, experts\]"):
        ExpertLoad(np.ones(3))
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite and non-negative"):
            ExpertLoad(np.array([[1.0, bad]]))


def test_placement_contiguous_and_replicas():
    topo = Topology(3, 3)  # 9 slots for 7 experts: 0..6, then 0, 1 again
    p = Placement.contiguous(2, 7, topo)
    assert p.phy2log.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1]] * 2 and p.num_layers == 2
    assert p.replicas(7).tolist() == [[2, 2, 1, 1, 1, 1, 1]] * 2
    assert p.phy2log.dtype == np.int64 and not p.phy2log.flags.writeable
    p.validate(7, topo)
    with pytest.raises(ValueError, match=r"6 slots cannot hold 7 experts \(3 ranks x 2 slots\)"):
        Placement.contiguous(1, 7, Topology(3, 2))
    with pytest.raises(ValueError, match=r"\[layers, slots\]"):
        Placement(np.arange(4))
    source = np.array([[0, 1]])
    q = Placement(source)
    source[0, 0] = 1
    assert q.phy2log.tolist() == [[0, 1]]  # a copy


def test_placement_rank_loads_split_each_expert_over_its_replicas():
    topo = Topology(2, 2)
    p = Placement(np.array([[0, 1, 2, 0], [0, 0, 1, 2]]))
    load = ExpertLoad(np.array([[4.0, 2.0, 6.0], [4.0, 2.0, 6.0]]))
    # layer 0: expert 0 on slots 0 and 3 (2 tokens each): rank 0 = 2 + 2, rank 1 = 6 + 2
    # layer 1: expert 0 twice on rank 0 (2 + 2), rank 1 = 2 + 6
    assert p.rank_loads(load, topo).tolist() == [[4.0, 8.0], [4.0, 8.0]]
    assert p.max_over_mean(load, topo) == pytest.approx([8 / 6, 8 / 6])
    idle = ExpertLoad(np.zeros((2, 3)))
    assert p.max_over_mean(idle, topo).tolist() == [1.0, 1.0]
    balanced = ExpertLoad(np.array([[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))  # layer 0: 1 + 1 | 1 + 1
    assert p.max_over_mean(balanced, topo) == pytest.approx([1.0, 4 / 3])
    # per layer: a light layer (mean rank load below one token) and a layer of its own peak
    light = ExpertLoad(np.array([[0.25, 0.5, 0.75], [4.0, 0.0, 2.0]]))
    # layer 0: ranks 0.125 + 0.5 | 0.75 + 0.125 -> 0.875 / 0.75; layer 1: 2 + 2 | 0 + 2 -> 4 / 3
    assert p.max_over_mean(light, topo) == pytest.approx([0.875 / 0.75, 4 / 3])
    missing = Placement(np.array([[0, 1, 0, 1], [0, 1, 2, 0]]))
    with pytest.raises(ValueError, match="no replica of expert 2 in layer 0"):
        missing.rank_loads(load, topo)


def test_placement_validate_every_rule():
    topo = Topology(2, 2)
    Placement(np.array([[0, 1, 2, 0]])).validate(3, topo)
    with pytest.raises(ValueError, match="placement has 3 slots, topology has 4"):
        Placement(np.array([[0, 1, 2]])).validate(3, topo)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
            Placement(np.array([[0, 1, 2, bad]])).validate(3, topo)
    with pytest.raises(ValueError, match="no replica of expert 1 in layer 1"):
        Placement(np.array([[0, 1, 2, 0], [0, 2, 2, 0]])).validate(3, topo)
