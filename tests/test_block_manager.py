"""Block pool and block manager: exact block ids, prefix cache, and a property test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.hashing import hash_blocks, seed_hash
from splitserve.engine.request import Request, RequestId
from splitserve.engine.sampling_params import SamplingParams

BS = 4
SEED = seed_hash("test-model", BS)


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(RequestId(rid), list(tokens), SamplingParams(), max_new_tokens=8)


def test_allocates_lowest_ids_first_and_frees_tail_first() -> None:
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    pool.free([2, 1, 0])
    assert pool.allocate(2) == [0, 1]
    pool.check_invariants({0: 1, 1: 1, 3: 1, 4: 1})


def test_allocate_more_than_free_raises() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="only 2 free"):
        pool.allocate(3)


def test_double_free_is_an_error() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([block])


def test_cached_blocks_evicted_in_lru_order_after_clean_ones() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, block in enumerate(blocks[:2]):
        pool.cache_block(block, seed_hash(f"h{i}", BS))
    pool.free(reversed(blocks))  # 3, 2 clean; 1 then 0 enter the LRU
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 2
    assert pool.allocate(2) == [2, 3]  # clean first
    assert pool.allocate(1) == [1]  # then the least recently freed cached block
    stored, removed = pool.take_events()
    assert stored == [seed_hash("h0", BS), seed_hash("h1", BS)]
    assert removed == [seed_hash("h1", BS)]
    assert pool.lookup(seed_hash("h0", BS)) == 0


def test_prefix_hit_reuses_blocks_and_never_the_last_block() -> None:
    pool = BlockPool(16)
    mgr = BlockManager(pool, BS, SEED)
    first = make_request("a", list(range(12)))  # exactly 3 blocks
    assert mgr.allocate_slots(first, 12)
    first.num_computed_tokens = 12
    mgr.cache_full_blocks(first)
    assert first.block_ids == [0, 1, 2]
    assert first.block_hashes == hash_blocks(list(range(12)), BS, SEED)

    same = make_request("b", list(range(12)))
    prefix = mgr.find_cached_prefix(same)
    assert prefix.block_ids == [0, 1]  # the block holding the last token is recomputed
    assert mgr.allocate_slots(same, 4, prefix)
    assert same.block_ids == [0, 1, 3]
    assert pool.ref_count(0) == 2 and pool.ref_count(2) == 1

    longer = make_request("c", [*range(12), 99, 98])
    assert mgr.find_cached_prefix(longer).block_ids == [0, 1, 2]
    mgr.free(first)
    mgr.free(same)
    pool.check_invariants({})
    assert pool.num_cached_blocks == 3


def test_allocate_slots_fails_without_side_effects() -> None:
    pool = BlockPool(3)
    mgr = BlockManager(pool, BS, SEED)
    req = make_request("a", list(range(10)))
    assert not mgr.allocate_slots(req, 13)
    assert req.block_ids == [] and pool.num_free_blocks == 3
    assert mgr.allocate_slots(req, 10)
    assert req.block_ids == [0, 1, 2]


def test_cache_hit_on_cached_free_block_counts_against_free_space() -> None:
    pool = BlockPool(3)
    mgr = BlockManager(pool, BS, SEED)
    a = make_request("a", list(range(9)))
    assert mgr.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    mgr.cache_full_blocks(a)
    mgr.free(a)  # blocks 0, 1 cached-free, 2 clean
    b = make_request("b", [*range(8), 50, 51, 52, 53, 54])
    prefix = mgr.find_cached_prefix(b)
    assert prefix.block_ids == [0, 1]
    # 2 cached-free blocks reused + 2 new needed = 4 > 3 blocks in the pool.
    assert not mgr.allocate_slots(b, 5, prefix)
    assert pool.num_free_blocks == 3
    pool.check_invariants({})


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "grow", "free", "compute"]),
            st.integers(0, 7),
            st.lists(st.integers(0, 3), min_size=1, max_size=20),
        ),
        max_size=80,
    )
)
def test_block_invariant_under_random_workloads(ops) -> None:
    """Random admissions (sharing prefixes), growth, completion and frees: after every
    operation each block is exactly one of free, cached-free or owned, with refcounts
    equal to the number of live requests holding it."""
    pool = BlockPool(12)
    mgr = BlockManager(pool, BS, SEED)
    live: dict[int, Request] = {}
    for op, slot, tokens in ops:
        req = live.get(slot)
        if op == "add" and req is None:
            new = make_request(str(slot), tokens)
            prefix = mgr.find_cached_prefix(new)
            computed = len(prefix.block_ids) * BS
            if mgr.allocate_slots(new, new.num_tokens - computed, prefix):
                new.num_computed_tokens = computed
                live[slot] = new
        elif op == "grow" and req is not None:
            if mgr.allocate_slots(req, len(tokens)):
                req.output_token_ids.extend(tokens[: len(tokens)])
        elif op == "compute" and req is not None:
            req.num_computed_tokens = min(req.num_tokens, len(req.block_ids) * BS)
            mgr.cache_full_blocks(req)
        elif op == "free" and req is not None:
            mgr.free(req)
            del live[slot]
        expected: dict[int, int] = {}
        for r in live.values():
            for b in r.block_ids:
                expected[b] = expected.get(b, 0) + 1
        pool.check_invariants(expected)
