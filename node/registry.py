"""Node registry in Redis: who is alive, where to reach it, how loaded it is.

Who calls what (key schema: docs/redis_schema.md):

- A node, through `NodePublisher` (node/publisher.py), calls `register(record)` at
  start, `heartbeat(node_id, load)` every second, `deregister(node_id)` at stop. The record
  key expires `ttl_s` after the last heartbeat, so a node that stops heartbeating drops out of
  `list_live_nodes` (and out of prefix routing) within `ttl_s`.
- The router calls `list_live_nodes(role)` (sync `NodeRegistry`, asyncio `AsyncNodeRegistry`),
  one round trip each.

A node id is unique per process start (`make_node_id`), so a restarted node never inherits
the index entries of its previous life. Registration also gives the node a small integer
slot, its position in the prefix index's per-block holder strings (node/prefix_index.py).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NewType, get_args

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

NodeId = NewType("NodeId", str)
Role = Literal["prefill", "decode"]
ROLES: tuple[str, ...] = get_args(Role)

DEFAULT_CLUSTER = "default"
# Record lifetime without heartbeat (s); heartbeats come every second, so 5 s rides out a
# few missed beats (a GC pause, a busy step) and still drops a dead node within seconds.
DEFAULT_TTL_S = 5.0


@dataclass(frozen=True)
class NodeCapacity:
    num_kv_blocks: int
    max_num_seqs: int


@dataclass(frozen=True)
class NodeLoad:
    num_running: int = 0
    num_waiting: int = 0
    # Fraction of KV blocks owned by requests (cached free blocks do not count).
    kv_usage: float = 0.0


@dataclass(frozen=True)
class NodeRecord:
    node_id: NodeId
    role: Role
    grpc_address: str  # host:port
    nixl_agent_name: str
    model: str
    block_size: int  # tokens per KV block; one value for the cluster
    capacity: NodeCapacity
    load: NodeLoad = field(default_factory=NodeLoad)
    started_at: float = field(default_factory=time.time)  # unix seconds
    max_model_len: int = 0  # context length in tokens; 0 = unknown
    metrics_url: str = ""  # the node's Prometheus endpoint (http://host:port/metrics)
    # Serves Decode.GenerateMany (decode/multiplex.py): the router multiplexes onto it.
    serves_generate_many: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"NodeRecord.role must be one of {ROLES}, got {self.role!r}")
        if not self.node_id:
            raise ValueError("NodeRecord.node_id must be non-empty (use make_node_id)")
        if self.block_size < 1:
            raise ValueError(f"NodeRecord.block_size must be >= 1, got {self.block_size}")

    def static_json(self) -> str:
        """The record without its load (the load is stored and refreshed on its own)."""
        fields = asdict(self)
        del fields["load"]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, static_json: str | bytes, load_json: str | bytes) -> NodeRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        # Fields a newer node wrote are left out, so that routers and nodes of different
        # versions share a cluster.
        fields = {k: v for k, v in json.loads(static_json).items() if k in known}
        fields["capacity"] = NodeCapacity(**fields["capacity"])
        fields["load"] = NodeLoad(**json.loads(load_json))
        return cls(**fields)


def make_node_id(role: Role, host: str, port: int) -> NodeId:
    """`{role}-{host}:{port}-{random}`: unique per process start."""
    return NodeId(f"{role}-{host}:{port}-{secrets.token_hex(4)}")


def load_json(load: NodeLoad) -> str:
    return json.dumps(asdict(load), sort_keys=True)


class RedisKeys:
    """Key names for one cluster (docs/redis_schema.md)."""

    def __init__(self, cluster: str = DEFAULT_CLUSTER) -> None:
        if not cluster or any(c in cluster for c in ": \t\n{}"):
            raise ValueError(
                f"cluster name {cluster!r} must be non-empty without ':', braces or spaces"
            )
        self.prefix = f"splitserve:{cluster}:"
        self.slots = self.prefix + "slots"
        self.node_prefix = self.prefix + "node:"
        self.node_blocks_prefix = self.prefix + "nodeblk:"
        self.block_prefix = self.prefix + "blk:"

    def node(self, node_id: str) -> str:
        return self.node_prefix + node_id

    def node_blocks(self, node_id: str) -> str:
        return self.node_blocks_prefix + node_id


def redis_client(url: str, timeout_s: float = 1.0) -> redis.Redis:
    """A sync client that fails fast (no backoff; one immediate retry that reconnects)."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1)
    )


def async_redis_client(url: str, timeout_s: float = 1.0) -> redis.asyncio.Redis:
    """The asyncio twin of `redis_client`, for the router."""
    from redis.asyncio.retry import Retry as AsyncRetry

    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=AsyncRetry(NoBackoff(), 1),
    )


# Lua: the slot (decimal string) that `id` holds in the slots hash `key`, or nil.
SLOT_OF_LUA = """
local function slot_of(key, id)
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if all[i + 1] == id then return all[i] end
  end
  return nil
end
"""

# KEYS: node record, slots hash. ARGV: node id, static JSON, load JSON, ttl ms.
# Keeps the node's slot if it has one, else takes the lowest free slot. Returns the slot.
_REGISTER_LUA = (
    SLOT_OF_LUA
    + """
local slot = slot_of(KEYS[2], ARGV[1])
if not slot then
  local s = 0
  while redis.call('HEXISTS', KEYS[2], s) == 1 do s = s + 1 end
  slot = tostring(s)
  redis.call('HSET', KEYS[2], slot, ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'load', ARGV[3], 'slot', slot)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return tonumber(slot)
"""
)

# KEYS[1] node record. ARGV: load JSON, ttl ms. Refreshes only a record that still exists.
_HEARTBEAT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'load', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] slots hash. ARGV[1] node key prefix. Returns [static, load, static, load, ...].
_LIST_LUA = """
local out = {}
for _, id in ipairs(redis.call('HVALS', KEYS[1])) do
  local rec = redis.call('HMGET', ARGV[1] .. id, 'record', 'load')
  if rec[1] then
    out[#out + 1] = rec[1]
    out[#out + 1] = rec[2]
  end
end
return out
"""

# KEYS: node record, node's block set, slots hash. ARGV[1] node id. The slot stays taken
# while index entries remain, so collect_garbage can still find and clear them.
_DEREGISTER_LUA = (
    SLOT_OF_LUA
    + """
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 0 then
  local slot = slot_of(KEYS[3], ARGV[1])
  if slot then redis.call('HDEL', KEYS[3], slot) end
end
return 1
"""
)


def _parse_records(flat: list[Any], role: Role | None) -> list[NodeRecord]:
    records = [NodeRecord.from_json(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    return sorted((r for r in records if role is None or r.role == role), key=lambda r: r.node_id)


class NodeRegistry:
    """Sync registry operations (nodes' heartbeat thread, tests, tools)."""

    def __init__(
        self, client: redis.Redis, cluster: str = DEFAULT_CLUSTER, ttl_s: float = DEFAULT_TTL_S
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.client = client
        self.keys = RedisKeys(cluster)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._register = client.register_script(_REGISTER_LUA)
        self._heartbeat = client.register_script(_HEARTBEAT_LUA)
        self._list = client.register_script(_LIST_LUA)
        self._deregister = client.register_script(_DEREGISTER_LUA)

    def register(self, record: NodeRecord) -> int:
        """Write (or overwrite) the record with a fresh TTL; returns the node's index slot."""
        keys = [self.keys.node(record.node_id), self.keys.slots]
        args: list[str | int] = [
            record.node_id,
            record.static_json(),
            load_json(record.load),
            self.ttl_ms,
        ]
        return int(self._register(keys=keys, args=args))

    def heartbeat(self, node_id: NodeId, load: NodeLoad) -> bool:
        """Refresh TTL and load; False when the record is gone (expired or Redis restarted)."""
        args: list[str | int] = [load_json(load), self.ttl_ms]
        return bool(self._heartbeat(keys=[self.keys.node(node_id)], args=args))

    def deregister(self, node_id: NodeId) -> None:
        keys = [self.keys.node(node_id), self.keys.node_blocks(node_id), self.keys.slots]
        self._deregister(keys=keys, args=[node_id])

    def list_live_nodes(self, role: Role | None = None) -> list[NodeRecord]:
        """Live records (TTL not expired), sorted by node id, optionally of one role."""
        return _parse_records(
            self._list(keys=[self.keys.slots], args=[self.keys.node_prefix]), role
        )

    def get(self, node_id: NodeId) -> NodeRecord | None:
        fields = self.client.hmget(self.keys.node(node_id), ["record", "load"])
        if fields[0] is None or fields[1] is None:
            return None
        return NodeRecord.from_json(fields[0], fields[1])


class AsyncNodeRegistry:
    """The router's read side of the registry, on redis.asyncio."""

    def __init__(self, client: redis.asyncio.Redis, cluster: str = DEFAULT_CLUSTER) -> None:
        self.client = client
        self.keys = RedisKeys(cluster)
        self._list = client.register_script(_LIST_LUA)

    async def list_live_nodes(self, role: Role | None = None) -> list[NodeRecord]:
        flat = await self._list(keys=[self.keys.slots], args=[self.keys.node_prefix])
        return _parse_records(flat, role)
