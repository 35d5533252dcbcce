"""Prefix-cache index in Redis: which live node holds how many leading blocks of a prompt.

Who calls what (key schema: docs/redis_schema.md):

- Nodes publish through `NodePublisher` (node/publisher.py): the full snapshot of their
  cached block hashes at start and after any Redis restart, then batches of stored/removed
  hashes; `clear_node` at start and stop.
- The router calls `longest_prefixes(block_hashes)` once per routing decision: one EVALSHA
  that walks the prompt's hash chain and stops when no live node holds the next block, so the
  cost is linear in the prompt's block count. Liveness is read in the same script (the node's
  registry record must exist), so entries of a dead node are never used.
- The router calls `collect_garbage()` now and then (say every 30 s): it removes the entries of
  nodes whose registry record expired and frees their slots. Every script call touches a
  bounded number of entries.

Each registered node owns a small integer slot (node_registry.register); a block's key holds
a string with byte 1 at offset `slot` for each node that caches it. A slot is freed only once
its node's entries are cleared, so a new node never inherits a dead node's entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

from splitserve.engine.hashing import BlockHash
from splitserve.node.registry import DEFAULT_CLUSTER, SLOT_OF_LUA, NodeId, RedisKeys

# Entries one script call adds, removes or collects at most, so Redis never stalls on one call.
MAX_ENTRIES_PER_CALL = 2048
# Most blocks per MGET in the lookup walk (chunks grow from 16 to this), which stops at the
# first chunk where no node is left: a prompt nobody holds costs one 16-key MGET.
LOOKUP_CHUNK_BLOCKS = 256
_HEX_PER_HASH = 32

# ARGV: block key prefix, hex blob (32 hex digits per block, prompt order), node record
# prefix, slots hash, most blocks per MGET. A block's value is a string with byte 1 at offset
# `slot` for every node holding it (0 elsewhere); consecutive blocks usually have equal
# values, and equal Lua strings compare in O(1), so the walk costs about one MGET entry a block.
# Returns [node_id, num_leading_blocks, ...] for the live nodes holding block 0.
_LONGEST_PREFIXES_LUA = """
local prefix, blob = ARGV[1], ARGV[2]
local n = #blob / 32
local out, cand, ids = {}, {}, {}
local prev = nil
local i = 0
local size = 16
while i < n do
  local last = math.min(n, i + size)
  size = math.min(size * 2, tonumber(ARGV[5]))
  local keys = {}
  for j = i, last - 1 do keys[#keys + 1] = prefix .. string.sub(blob, j * 32 + 1, j * 32 + 32) end
  local vals = redis.call('MGET', unpack(keys))
  for k = 1, #vals do
    local v = vals[k]
    if prev == nil then
      if not v then return {} end
      for pos = 1, #v do
        if string.byte(v, pos) == 1 then
          local id = redis.call('HGET', ARGV[4], pos - 1)
          if id and redis.call('EXISTS', ARGV[3] .. id) == 1 then
            cand[#cand + 1] = pos
            ids[#ids + 1] = id
          end
        end
      end
      if #cand == 0 then return {} end
      prev = v
    elseif v ~= prev then
      local kept_pos, kept_ids = {}, {}
      for c = 1, #cand do
        if v and string.byte(v, cand[c]) == 1 then
          kept_pos[#kept_pos + 1] = cand[c]
          kept_ids[#kept_ids + 1] = ids[c]
        else
          out[#out + 1] = ids[c]
          out[#out + 1] = i + k - 1
        end
      end
      cand, ids = kept_pos, kept_ids
      if #cand == 0 then return out end
      prev = v
    end
  end
  i = last
end
for c = 1, #cand do
  out[#out + 1] = ids[c]
  out[#out + 1] = n
end
return out
"""

# Lua: clear `slot` in the block key `key`; delete the key when no holder is left.
_UNSET_LUA = """
local function unset(key, slot)
  redis.call('SETRANGE', key, slot, '\\0')
  if redis.call('BITCOUNT', key) == 0 then redis.call('DEL', key) end
end
"""

# KEYS: node record, node's block set. ARGV: block key prefix, number removed, hex blob of
# the removed hashes then the stored ones (removals apply first). 0 when not registered.
_PUBLISH_LUA = (
    _UNSET_LUA
    + """
local slot = redis.call('HGET', KEYS[1], 'slot')
if not slot then return 0 end
local blob = ARGV[3]
local num_removed = tonumber(ARGV[2])
for j = 0, #blob / 32 - 1 do
  local h = string.sub(blob, j * 32 + 1, j * 32 + 32)
  if j < num_removed then
    unset(ARGV[1] .. h, slot)
    redis.call('SREM', KEYS[2], h)
  else
    redis.call('SETRANGE', ARGV[1] .. h, slot, '\\1')
    redis.call('SADD', KEYS[2], h)
  end
end
return 1
"""
)

# KEYS: node's block set, slots hash. ARGV: block key prefix, node id, budget.
# Returns the number of entries removed.
_CLEAR_LUA = (
    SLOT_OF_LUA
    + _UNSET_LUA
    + """
local slot = slot_of(KEYS[2], ARGV[2])
if not slot then
  redis.call('DEL', KEYS[1])
  return 0
end
local hashes = redis.call('SPOP', KEYS[1], ARGV[3])
for _, h in ipairs(hashes) do unset(ARGV[1] .. h, slot) end
return #hashes
"""
)

# KEYS[1]: slots hash. ARGV: node record prefix, node block-set prefix, block prefix, budget.
# Clears the entries of nodes whose record is gone, then frees their slot.
# Returns [more_work (0|1), collected node ids...].
_COLLECT_LUA = (
    _UNSET_LUA
    + """
local budget = tonumber(ARGV[4])
local out = {0}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local slot, id = all[i], all[i + 1]
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then
    if budget <= 0 then
      out[1] = 1
      break
    end
    local set = ARGV[2] .. id
    local hashes = redis.call('SPOP', set, budget)
    for _, h in ipairs(hashes) do unset(ARGV[3] .. h, slot) end
    budget = budget - #hashes
    if redis.call('EXISTS', set) == 0 then
      redis.call('HDEL', KEYS[1], slot)
      out[#out + 1] = id
    else
      out[1] = 1
    end
  end
end
return out
"""
)


def _hex_blob(hashes: Sequence[BlockHash]) -> str:
    """hash_hex of every hash, concatenated (big-endian bytes in hex are the same digits)."""
    return b"".join(h.to_bytes(16, "big") for h in hashes).hex()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse_prefixes(flat: list[Any]) -> dict[NodeId, int]:
    return {NodeId(_text(flat[i])): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _publish_batches(
    stored: Sequence[BlockHash], removed: Sequence[BlockHash]
) -> list[tuple[int, str]]:
    """(num_removed, hex blob of removed + stored) per script call, removals first."""
    items = [*removed, *stored]
    batches = []
    for start in range(0, len(items), MAX_ENTRIES_PER_CALL):
        chunk = items[start : start + MAX_ENTRIES_PER_CALL]
        num_removed = max(0, min(len(removed) - start, len(chunk)))
        batches.append((num_removed, _hex_blob(chunk)))
    return batches


class _IndexBase:
    def __init__(self, cluster: str) -> None:
        self.keys = RedisKeys(cluster)

    def _lookup_args(self, block_hashes: Sequence[BlockHash]) -> list[str | int]:
        k = self.keys
        blob = _hex_blob(block_hashes)
        return [k.block_prefix, blob, k.node_prefix, k.slots, LOOKUP_CHUNK_BLOCKS]

    def _collect_args(self) -> list[str | int]:
        k = self.keys
        return [k.node_prefix, k.node_blocks_prefix, k.block_prefix, MAX_ENTRIES_PER_CALL]


class PrefixIndex(_IndexBase):
    """Sync index operations: nodes publish, tools and tests read."""

    def __init__(self, client: redis.Redis, cluster: str = DEFAULT_CLUSTER) -> None:
        super().__init__(cluster)
        self.client = client
        self._lookup = client.register_script(_LONGEST_PREFIXES_LUA)
        self._collect = client.register_script(_COLLECT_LUA)
        self._publish = client.register_script(_PUBLISH_LUA)
        self._clear = client.register_script(_CLEAR_LUA)

    def publish(
        self, node_id: NodeId, stored: Sequence[BlockHash], removed: Sequence[BlockHash]
    ) -> bool:
        """Apply one batch of KV events (removals before stores); False if not registered.

        A batch larger than MAX_ENTRIES_PER_CALL takes several round trips.
        """
        keys = [self.keys.node(node_id), self.keys.node_blocks(node_id)]
        for num_removed, blob in _publish_batches(stored, removed):
            if not self._publish(keys=keys, args=[self.keys.block_prefix, num_removed, blob]):
                return False
        return True

    def clear_node(self, node_id: NodeId) -> int:
        """Remove every entry of `node_id`; returns how many there were."""
        keys = [self.keys.node_blocks(node_id), self.keys.slots]
        args: list[str | int] = [self.keys.block_prefix, node_id, MAX_ENTRIES_PER_CALL]
        total = 0
        while True:
            removed = int(self._clear(keys=keys, args=args))
            total += removed
            if removed < MAX_ENTRIES_PER_CALL:
                return total

    def longest_prefixes(self, block_hashes: Sequence[BlockHash]) -> dict[NodeId, int]:
        """{live node: number of leading blocks of the prompt it holds}; nodes with 0 are absent."""
        if not block_hashes:
            return {}
        return _parse_prefixes(self._lookup(keys=[], args=self._lookup_args(block_hashes)))

    def collect_garbage(self) -> list[NodeId]:
        """Remove the entries of dead nodes; returns the node ids fully collected."""
        collected: list[NodeId] = []
        while True:
            out = self._collect(keys=[self.keys.slots], args=self._collect_args())
            collected += [NodeId(_text(x)) for x in out[1:]]
            if not int(out[0]):
                return collected


class AsyncPrefixIndex(_IndexBase):
    """The router's side of the index, on redis.asyncio."""

    def __init__(self, client: redis.asyncio.Redis, cluster: str = DEFAULT_CLUSTER) -> None:
        super().__init__(cluster)
        self.client = client
        self._lookup = client.register_script(_LONGEST_PREFIXES_LUA)
        self._collect = client.register_script(_COLLECT_LUA)

    async def longest_prefixes(self, block_hashes: Sequence[BlockHash]) -> dict[NodeId, int]:
        """{live node: number of leading blocks of the prompt it holds}; nodes with 0 are absent."""
        if not block_hashes:
            return {}
        flat = await self._lookup(keys=[], args=self._lookup_args(block_hashes))
        return _parse_prefixes(flat)

    async def collect_garbage(self) -> list[NodeId]:
        collected: list[NodeId] = []
        while True:
            out = await self._collect(keys=[self.keys.slots], args=self._collect_args())
            collected += [NodeId(_text(x)) for x in out[1:]]
            if not int(out[0]):
                return collected
