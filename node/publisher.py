"""NodePublisher: a node's one handle on Redis (registry record, heartbeat, KV events).

Who calls what, in what order (a prefill or decode node):

    publisher = NodePublisher(redis_url, cluster)
    publisher.start(record, snapshot_fn)      # register + publish the cache snapshot
    publisher.heartbeat(load)                 # any time; the latest load goes out every second
    publisher.publish_events(stored, removed) # per engine step; never blocks on Redis
    publisher.stop()                          # clear this node's index entries, deregister

All Redis I/O happens on the publisher's own thread, so the engine loop never waits on the
network, and no call raises when Redis is down: the publisher logs a warning and retries.
It mirrors the node's cached hashes from the events it is given (`snapshot_fn` is called
once, in `start`, on the caller's thread), so whenever its view of Redis may be stale
(connection lost, Redis restarted: run_id changed, or its record expired) it re-registers
and republishes the whole mirror, without calling back into the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import redis

from splitserve.engine.hashing import BlockHash
from splitserve.node.prefix_index import PrefixIndex
from splitserve.node.registry import (
    DEFAULT_CLUSTER,
    DEFAULT_TTL_S,
    NodeId,
    NodeLoad,
    NodeRecord,
    NodeRegistry,
    redis_client,
)

logger = logging.getLogger(__name__)


class NodePublisher:
    """Registry record, heartbeat and KV events of one node, written from a background thread."""

    def __init__(
        self,
        redis_url: str,
        cluster: str = DEFAULT_CLUSTER,
        ttl_s: float = DEFAULT_TTL_S,
        heartbeat_interval_s: float = 1.0,
        retry_interval_s: float = 0.5,
    ) -> None:
        if not 0 < heartbeat_interval_s < ttl_s:
            raise ValueError(
                f"heartbeat_interval_s ({heartbeat_interval_s}) must be > 0 and below ttl_s "
                f"({ttl_s}), or the record expires between heartbeats"
            )
        self._client = redis_client(redis_url)
        self._registry = NodeRegistry(self._client, cluster, ttl_s)
        self._index = PrefixIndex(self._client, cluster)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.retry_interval_s = retry_interval_s
        self._lock = threading.Lock()  # guards the state below
        self._io_lock = threading.Lock()  # one Redis exchange at a time, in order
        self._record: NodeRecord | None = None
        self._load = NodeLoad()
        self._cached: set[BlockHash] = set()
        self._pending: dict[BlockHash, bool] = {}  # hash -> stored (True) / removed (False)
        self._needs_sync = True
        self._run_id: str | None = None
        self._is_failing = False
        self._retry_at = 0.0
        self._next_beat = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_synced(self) -> bool:
        """True when Redis holds this node's record and every event given so far."""
        with self._lock:
            return not self._needs_sync and not self._pending

    def start(self, record: NodeRecord, snapshot_fn: Callable[[], Iterable[BlockHash]]) -> None:
        """Register and publish the snapshot (first attempt inline), then start the thread."""
        if self._thread is not None:
            raise RuntimeError("NodePublisher.start called twice")
        with self._lock:
            self._record = record
            self._load = record.load
            self._cached = set(snapshot_fn())
        self.flush()
        self._thread = threading.Thread(
            target=self._run, name=f"publisher-{record.node_id}", daemon=True
        )
        self._thread.start()

    def heartbeat(self, load: NodeLoad) -> None:
        """Set the load the next heartbeat carries."""
        with self._lock:
            self._load = load

    def publish_events(self, stored: Sequence[BlockHash], removed: Sequence[BlockHash]) -> None:
        """Queue one batch of KV events; `removed` happened before `stored`."""
        with self._lock:
            for h in removed:
                self._cached.discard(h)
                if not self._needs_sync:
                    self._pending[h] = False
            for h in stored:
                self._cached.add(h)
                if not self._needs_sync:
                    self._pending[h] = True
        self._wake.set()

    def flush(self) -> bool:
        """Write what is pending now, on the caller's thread; returns is_synced.

        For start-up, shutdown and tests: it waits on Redis, so the engine loop never calls it.
        """
        with self._io_lock:
            self._tick(is_beat_due=False)
        return self.is_synced

    def stop(self) -> None:
        """Stop the thread, then remove this node's index entries and record (best effort)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if self._record is not None:
            node_id = self._record.node_id
            try:
                self._index.clear_node(node_id)
                self._registry.deregister(node_id)
            except redis.RedisError as exc:
                logger.warning(
                    "could not deregister %s (%s): its record expires with its TTL and the "
                    "router's collect_garbage removes its index entries",
                    node_id,
                    exc,
                )
        self._client.close()

    def _run(self) -> None:
        self._next_beat = time.monotonic() + self.heartbeat_interval_s
        while not self._stopping.is_set():
            wake_at = self._next_beat
            with self._lock:
                if self._needs_sync:
                    wake_at = min(wake_at, self._retry_at)
            self._wake.wait(timeout=max(0.0, wake_at - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                return
            is_beat_due = time.monotonic() >= self._next_beat
            if is_beat_due:
                self._next_beat = time.monotonic() + self.heartbeat_interval_s
            with self._io_lock:
                self._tick(is_beat_due)

    def _tick(self, is_beat_due: bool) -> None:
        with self._lock:
            needs_sync = self._needs_sync
        if needs_sync and time.monotonic() < self._retry_at:
            return
        try:
            if needs_sync:
                self._sync()
            else:
                if is_beat_due:
                    self._beat()
                self._flush_pending()
        except redis.RedisError as exc:
            self._on_error(exc)
            return
        if self._is_failing:
            self._is_failing = False
            logger.info("Redis reachable again: %s re-registered and republished", self._node())

    def _sync(self) -> None:
        """Re-register and republish the whole mirror (start, or Redis state unknown)."""
        with self._lock:
            record = replace(self._require_record(), load=self._load)
            snapshot = list(self._cached)
            self._pending.clear()
            self._needs_sync = False
        self._run_id = self._read_run_id()
        self._index.clear_node(record.node_id)
        self._registry.register(record)
        if not self._index.publish(record.node_id, stored=snapshot, removed=[]):
            raise redis.RedisError(f"record of {record.node_id} vanished while republishing")
        logger.info("%s registered with %d cached blocks", record.node_id, len(snapshot))

    def _beat(self) -> None:
        with self._lock:
            load = self._load
        is_alive = self._registry.heartbeat(self._node(), load)
        run_id = self._read_run_id()
        if not is_alive or run_id != self._run_id:
            logger.warning(
                "Redis lost the state of %s (%s); republishing",
                self._node(),
                "Redis restarted" if run_id != self._run_id else "record expired",
            )
            self._mark_needs_sync()
            self._sync()

    def _flush_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        stored = [h for h, is_stored in pending.items() if is_stored]
        removed = [h for h, is_stored in pending.items() if not is_stored]
        if not self._index.publish(self._node(), stored=stored, removed=removed):
            logger.warning("record of %s is gone; re-registering", self._node())
            self._mark_needs_sync()
            self._sync()

    def _on_error(self, exc: redis.RedisError) -> None:
        self._mark_needs_sync()
        self._retry_at = time.monotonic() + self.retry_interval_s
        if not self._is_failing:
            self._is_failing = True
            logger.warning("Redis unreachable for %s (%s); retrying", self._node(), exc)
        else:
            logger.debug("Redis still unreachable for %s: %s", self._node(), exc)

    def _mark_needs_sync(self) -> None:
        with self._lock:
            self._needs_sync = True
            self._pending.clear()

    def _read_run_id(self) -> str:
        return str(self._client.info("server")["run_id"])

    def _require_record(self) -> NodeRecord:
        if self._record is None:
            raise RuntimeError("NodePublisher used before start()")
        return self._record

    def _node(self) -> NodeId:
        return self._record.node_id if self._record is not None else NodeId("<unstarted node>")
