"""The router's view of the cluster: live nodes, their load, and prefix lookups, from Redis.

Who calls what: the request path calls `nodes()` (cached `node_cache_s`; a stale list is
refreshed in the background, so requests wait on Redis only when no decode node is known)
and `longest_prefixes(hashes)` (one EVALSHA, None when Redis is unusable). The app starts
`run_janitor()` (prefix-index garbage collection every `gc_interval_s`) and calls `close()`.

Every Redis call is bounded (socket timeout `redis_timeout_s`, one reconnecting retry, and an
outer asyncio timeout), so a dead or hung Redis never holds a request. While Redis is down
the router keeps the last known nodes that still answer `Stats` (with their fresh load from
it) and routes by load only; the transition is logged once each way and /health reports it.
A node that vanishes from the Redis list is kept for `vanish_grace_s` while it answers Stats:
after a Redis restart the nodes need about a heartbeat to re-register. With TLS or a
cluster token, a node enters the list only once it passed an authenticated Health call
(router/admission.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import redis
import redis.asyncio

from splitserve.engine.hashing import BlockHash
from splitserve.node.prefix_index import AsyncPrefixIndex
from splitserve.node.registry import (
    DEFAULT_TTL_S,
    AsyncNodeRegistry,
    NodeId,
    NodeLoad,
    NodeRecord,
    async_redis_client,
)
from splitserve.protocol import node_pb2 as pb
from splitserve.router.admission import NodeAdmission
from splitserve.router.config import RouterConfig
from splitserve.router.node_clients import NodeClients

logger = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.RedisError, OSError, asyncio.TimeoutError)


class NodeSnapshot(NamedTuple):
    decode: tuple[NodeRecord, ...]
    prefill: tuple[NodeRecord, ...]
    is_redis_up: bool
    fetched_at: float  # time.monotonic()


def load_from_stats(stats: pb.StatsResponse) -> NodeLoad:
    return NodeLoad(
        num_running=stats.num_running,
        num_waiting=stats.num_waiting + stats.num_waiting_for_remote_kv,
        kv_usage=stats.kv_usage,
    )


class ClusterView:
    def __init__(
        self, config: RouterConfig, clients: NodeClients, vanish_grace_s: float = DEFAULT_TTL_S
    ) -> None:
        self.config = config
        self.clients = clients
        self.vanish_grace_s = vanish_grace_s
        self._client = async_redis_client(config.redis_url, config.redis_timeout_s)
        self._registry = AsyncNodeRegistry(self._client, config.cluster)
        self._index = AsyncPrefixIndex(self._client, config.cluster)
        # Outer bound of one Redis call: two attempts plus slack.
        self._call_timeout_s = 3 * config.redis_timeout_s
        self.is_redis_up = True
        self._snapshot: NodeSnapshot | None = None
        self._last_seen: dict[NodeId, tuple[NodeRecord, float]] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        security = config.security
        self.admission = NodeAdmission(
            clients.admit,
            is_enabled=security.is_tls or bool(security.token),
            retry_s=config.suspect_s,
        )

    async def nodes(self) -> NodeSnapshot:
        snap = self._snapshot
        if snap is not None and time.monotonic() - snap.fetched_at < self.config.node_cache_s:
            return snap
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())
        if snap is None or not snap.decode:
            await asyncio.shield(self._refresh_task)
            snap = self._snapshot
        if snap is None:
            raise RuntimeError("ClusterView: the node list refresh finished without a snapshot")
        return snap

    @property
    def last_snapshot(self) -> NodeSnapshot | None:
        """The node list as last read (no Redis call)."""
        return self._snapshot

    async def refresh(self) -> NodeSnapshot:
        """Read the node list now (start-up, tests)."""
        await self._refresh()
        if self._snapshot is None:
            raise RuntimeError("ClusterView.refresh produced no snapshot")
        return self._snapshot

    async def _refresh(self) -> None:
        now = time.monotonic()
        try:
            fresh = await asyncio.wait_for(
                self._registry.list_live_nodes(), timeout=self._call_timeout_s
            )
        except _REDIS_ERRORS as exc:
            self._set_redis_up(False, exc)
            kept = await self._verified([rec for rec, _ in self._last_seen.values()])
            self._store(kept, now, is_redis_up=False)
            return
        self._set_redis_up(True)
        fresh = await self.admission.filter(fresh)
        fresh_ids = {r.node_id for r in fresh}
        vanished = [
            rec
            for node_id, (rec, seen) in self._last_seen.items()
            if node_id not in fresh_ids and now - seen < self.vanish_grace_s
        ]
        for rec in fresh:
            self._last_seen[rec.node_id] = (rec, now)
        for node_id in [i for i, (_, seen) in self._last_seen.items() if now - seen > 60.0]:
            del self._last_seen[node_id]
        kept = await self._verified(vanished) if vanished else []
        self._store([*fresh, *kept], now, is_redis_up=True)

    async def _verified(self, records: Sequence[NodeRecord]) -> list[NodeRecord]:
        """The records whose node answers Stats, with the load it reports."""
        stats = await self.clients.stats_many(records)
        return [
            replace(rec, load=load_from_stats(st))
            for rec, st in zip(records, stats, strict=True)
            if st is not None
        ]

    def _store(self, records: Sequence[NodeRecord], now: float, is_redis_up: bool) -> None:
        ordered = sorted(records, key=lambda r: r.node_id)
        self._snapshot = NodeSnapshot(
            decode=tuple(r for r in ordered if r.role == "decode"),
            prefill=tuple(r for r in ordered if r.role == "prefill"),
            is_redis_up=is_redis_up,
            fetched_at=now,
        )

    def _set_redis_up(self, is_up: bool, exc: BaseException | None = None) -> None:
        if is_up == self.is_redis_up:
            return
        self.is_redis_up = is_up
        if is_up:
            logger.warning("Redis reachable again: cache-aware routing resumes")
        else:
            logger.warning(
                "Redis unreachable (%s: %s): serving with the last known nodes that answer "
                "Stats, routing by load only",
                type(exc).__name__,
                exc,
            )

    async def longest_prefixes(self, block_hashes: Sequence[BlockHash]) -> dict[NodeId, int] | None:
        """{node: leading blocks held}, or None when Redis is down (the caller routes by load)."""
        if not self.is_redis_up:
            return None
        try:
            return await asyncio.wait_for(
                self._index.longest_prefixes(block_hashes), timeout=self._call_timeout_s
            )
        except _REDIS_ERRORS as exc:
            self._set_redis_up(False, exc)
            return None

    async def run_janitor(self) -> None:
        """Collect dead nodes' index entries every gc_interval_s, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.config.gc_interval_s)
            if not self.is_redis_up:
                continue
            try:
                collected = await asyncio.wait_for(
                    self._index.collect_garbage(), timeout=10 * self._call_timeout_s
                )
            except _REDIS_ERRORS as exc:
                self._set_redis_up(False, exc)
                continue
            if collected:
                logger.info("prefix index: collected the entries of dead nodes %s", collected)

    async def close(self) -> None:
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_task.cancel()
        await self._client.aclose()
