"""Per-request KV block bookkeeping on top of the BlockPool: prefix-cache lookups,
slot allocation for a step's new tokens, caching of blocks as they fill, and freeing.

The scheduler calls, per request and step: `find_cached_prefix` (first admission only),
then `allocate_slots`; after the model ran, `cache_full_blocks`; when the request
finishes or is preempted, `free`.
"""

from __future__ import annotations

from typing import NamedTuple

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.hashing import BlockHash, hash_block
from splitserve.engine.request import Request


class CachedPrefix(NamedTuple):
    block_ids: list[int]

    def num_tokens(self, block_size: int) -> int:
        return len(self.block_ids) * block_size


NO_PREFIX = CachedPrefix([])


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int, hash_seed: BlockHash) -> None:
        self.pool = pool
        self.block_size = block_size
        self.hash_seed = hash_seed
        # Prefix-cache statistics, in prompt tokens.
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        """Hash the request's full blocks among its first `num_tokens` tokens."""
        hashes, bs = request.block_hashes, self.block_size
        num_full = num_tokens // bs
        if len(hashes) >= num_full:
            return
        tokens = request.token_ids_slice(len(hashes) * bs, num_full * bs)
        parent = hashes[-1] if hashes else self.hash_seed
        for i in range(0, len(tokens), bs):
            parent = hash_block(parent, tokens[i : i + bs])
            hashes.append(parent)

    def find_cached_prefix(self, request: Request) -> CachedPrefix:
        """Longest run of leading full blocks already in the cache. The block holding the
        last known token is never a hit: its logits are needed."""
        if not self.pool.enable_caching:
            return NO_PREFIX
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks * self.block_size)
        block_ids: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return CachedPrefix(block_ids)

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Account one prefix-cache query (a request's first admission)."""
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, prefix: CachedPrefix = NO_PREFIX
    ) -> bool:
        """Give `request` blocks for `prefix` plus `num_new_tokens` more tokens.

        Returns False (and changes nothing) when the pool cannot supply them.
        """
        num_tokens = (
            request.num_computed_tokens + prefix.num_tokens(self.block_size) + num_new_tokens
        )
        num_missing = (
            self.blocks_needed(num_tokens) - len(request.block_ids) - len(prefix.block_ids)
        )
        num_prefix_free = sum(self.pool.ref_count(b) == 0 for b in prefix.block_ids)
        if max(num_missing, 0) + num_prefix_free > self.pool.num_free_blocks:
            return False
        self.pool.touch(prefix.block_ids)
        request.block_ids.extend(prefix.block_ids)
        if num_missing > 0:
            request.block_ids.extend(self.pool.allocate(num_missing))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Enter the request's computed full blocks into the prefix cache."""
        if not self.pool.enable_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= request.num_blocks_offered:
            return
        self._extend_hashes(request, num_full * self.block_size)
        for i in range(request.num_blocks_offered, num_full):
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i])
        request.num_blocks_offered = num_full

    def free(self, request: Request) -> None:
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_blocks_offered = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0
