"""Physical KV blocks: reference counts, the prefix cache, and free lists.

Every block is in exactly one of three states (`check_invariants` verifies it):

- free-clean: refcount 0, no hash; kept in a min-heap so allocation takes the lowest ids
  first, which keeps a request's blocks in adjacent runs (one transfer descriptor per run);
- cached-free: refcount 0, holds a hash; kept in LRU order and evicted lazily, only when
  no clean block is left;
- owned: refcount > 0 (shared by every request whose prefix hit it).

The pool records KV events (hashes stored and removed) for the node to publish to the
router's prefix index; `take_events` drains them.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from splitserve.engine.hashing import BlockHash


class KVEvents(NamedTuple):
    stored: list[BlockHash]
    removed: list[BlockHash]


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._block_of: dict[BlockHash, int] = {}
        self._clean: list[int] = list(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._stored: list[BlockHash] = []
        self._removed: list[BlockHash] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._clean) + len(self._lru)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by requests (cached-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` fresh blocks (lowest clean ids first, then LRU evictions)."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(
                f"cannot allocate {num_blocks} KV blocks: only {self.num_free_blocks} free; "
                "free blocks first or size the pool larger"
            )
        out: list[int] = []
        for _ in range(num_blocks):
            block_id = heapq.heappop(self._clean) if self._clean else self._evict_lru()
            self._ref_counts[block_id] = 1
            out.append(block_id)
        return out

    def _evict_lru(self) -> int:
        block_id, _ = self._lru.popitem(last=False)
        block_hash = self._hash_of[block_id]
        if block_hash is None:
            raise RuntimeError(f"block {block_id} in the LRU list has no hash")
        self._hash_of[block_id] = None
        del self._block_of[block_hash]
        self._removed.append(block_hash)
        return block_id

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block. Pass a request's blocks tail first, so
        that its last blocks are evicted before its prefix."""
        for block_id in block_ids:
            ref = self._ref_counts[block_id]
            if ref <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            self._ref_counts[block_id] = ref - 1
            if ref == 1:
                if self._hash_of[block_id] is None:
                    heapq.heappush(self._clean, block_id)
                else:
                    self._lru[block_id] = None

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._block_of.get(block_hash) if self.enable_caching else None

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks a request reuses (cache hits)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._lru[block_id]
            self._ref_counts[block_id] += 1

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Record that owned block `block_id` holds the full block with `block_hash`.

        A second block with the same contents stays uncached (it returns to the clean
        list when freed): the index keeps one block per hash.
        """
        if not self.enable_caching or self._hash_of[block_id] is not None:
            return
        if block_hash in self._block_of:
            return
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id
        self._stored.append(block_hash)

    def cached_hashes(self) -> list[BlockHash]:
        """Every hash the pool holds (a node republishes these after a Redis restart)."""
        return list(self._block_of)

    def take_events(self) -> KVEvents:
        events = KVEvents(self._stored, self._removed)
        self._stored, self._removed = [], []
        return events

    def check_invariants(self, expected_refs: dict[int, int] | None = None) -> None:
        """Raise if any block is not in exactly one state, or if `expected_refs`
        (block id -> number of requests holding it) disagrees with the refcounts."""
        clean, lru = set(self._clean), set(self._lru)
        if len(clean) != len(self._clean) or clean & lru:
            raise RuntimeError("a KV block sits twice in the free lists")
        for block_id in range(self.num_blocks):
            ref, block_hash = self._ref_counts[block_id], self._hash_of[block_id]
            states = (block_id in clean) + (block_id in lru) + (ref > 0)
            if states != 1 or ref < 0:
                raise RuntimeError(f"KV block {block_id} is in {states} states (ref {ref})")
            if block_id in clean and block_hash is not None:
                raise RuntimeError(f"clean KV block {block_id} still holds a hash")
            if block_id in lru and block_hash is None:
                raise RuntimeError(f"cached-free KV block {block_id} has no hash")
            if block_hash is not None and self._block_of.get(block_hash) != block_id:
                raise RuntimeError(f"KV block {block_id}'s hash does not map back to it")
            if expected_refs is not None and expected_refs.get(block_id, 0) != ref:
                raise RuntimeError(
                    f"KV block {block_id} has refcount {ref}, "
                    f"requests hold {expected_refs.get(block_id, 0)}"
                )
        if len(self._block_of) != sum(h is not None for h in self._hash_of):
            raise RuntimeError("prefix-cache index and block hashes disagree")
