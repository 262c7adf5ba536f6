"""Property tests for the KV block manager and its prefix cache."""
from hypothesis import given, settings
from hypothesis import strategies as st

from omnisim.core import PrefixIndex, Request
from omnisim.engine import BlockManager

prefix = st.lists(st.integers(0, 5), min_size=0, max_size=6).map(
    lambda xs: tuple(sum(xs[: i + 1]) * 7919 + i for i in range(len(xs))))  # chained: position-dependent
ops = st.lists(st.tuples(st.sampled_from(["admit", "finish"]), prefix, st.integers(0, 6), st.integers(0, 50)),
               max_size=60)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(4, 60), unit=st.integers(1, 3), script=ops)
def test_blocks_are_conserved_and_the_index_mirrors_the_cache(num_blocks, unit, script):
    index = PrefixIndex()
    bm = BlockManager(num_blocks, 16, lambda events: index.apply("i", events))
    live = []  # (keys held, private blocks)
    for op, keys, extra, pick in script:
        if op == "admit":
            m = bm.match(keys)
            assert m == index.cached_blocks(Request("q", 0, 10_000, 1, keys, 16 * unit), "i") if keys else True
            before = bm.available
            if bm.acquire(keys[:m], (len(keys) - m) * unit + extra):
                stored = bm.store(keys[m:], unit)
                held = keys[:m] + tuple(stored)
                live.append((held, (len(keys) - m - len(stored)) * unit + extra))
            else:
                assert bm.available == before  # all or nothing
        elif live:
            held, private = live.pop(pick % len(live))
            bm.release(held)
            bm.give(private)
        bm.check()
        assert set(bm.refs) == index._blocks.get("i", set())
        in_use = sum(p for _, p in live) + sum(bm.unit_blocks[k] for k in {k for h, _ in live for k in h})
        assert bm.used == in_use
    for held, private in live:
        bm.release(held)
        bm.give(private)
    assert bm.used == 0 and bm.available == num_blocks


def test_lru_evicts_least_recently_released_unit_first():
    bm = BlockManager(4, 16)
    assert bm.acquire((), 4)
    bm.store((1, 2), 1)
    bm.store((3,), 1)  # 1, 2, 3 cached, one block still private
    bm.release((1, 2))
    bm.release((3,))
    bm.give(1)
    assert bm.acquire((), 2)  # takes the free block, then evicts the oldest released unit: a prefix's tail first
    assert 2 not in bm.refs and 1 in bm.refs and 3 in bm.refs
