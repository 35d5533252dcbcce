"""The controller of one cluster on Ray: a detached actor named `<cluster>:controller` in
the Ray namespace `splitserve`, which owns every server actor of the cluster and keeps its
state, so that `splitserve ray scale|status|down` from any process find it by name.

Who calls what, in order:
- `splitserve ray up` (ray_cluster/client.py) creates the controller, then calls `up()`:
  Redis (a RedisActor, unless the config names a Redis) -> the router and every node at
  once (ServerActor, ray_cluster/server_actor.py), each node on the Ray node
  ray_cluster/placement.py chooses -> wait until each serves. A failure stops whatever
  started and raises.
- Every server actor's constructor calls `server_starting(name)` (its restart count, for
  its backoff), also while `up()` or `scale()` waits for it: the controller runs up to
  MAX_CONCURRENCY calls at once; `up`, `scale` and `down` hold one lock.
- `scale(num_prefill, num_decode)` starts the missing nodes, or stops the newest ones of a
  role (drain: the node deregisters first, so the router stops sending to it), then kills
  their actors.
- `status()`: every member's ServerInfo, or its state when it does not answer.
- `down()`: router -> every node at once (drain) -> Redis; then, when the Redis was given,
  deletes what is left under the cluster's key prefix (the index entries of a node that
  crashed). The caller then kills the controller itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import redis
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from splitserve.node.registry import RedisKeys
from splitserve.ray_cluster.config import (
    HEAD_RESOURCE,
    NAMESPACE,
    RayClusterConfig,
    Role,
    actor_name,
    check_counts,
)
from splitserve.ray_cluster.placement import Placed, RayNode, choose_node, node_demand
from splitserve.ray_cluster.server_actor import RedisActor, ServerActor
from splitserve.ray_cluster.status import ClusterStatus, Kind, MemberStatus, ServerInfo

logger = logging.getLogger(__name__)

MAX_CONCURRENCY = 16
# How long `status` waits for one member's answer (s); a draining one answers after.
INFO_TIMEOUT_S = 5.0


@dataclass
class Member:
    name: str
    kind: Kind
    handle: ray.actor.ActorHandle
    target_node: str  # the Ray node it was placed on ("" : wherever Ray put it)
    info: ServerInfo | None = None


class ClusterController:
    def __init__(self, config: RayClusterConfig) -> None:
        self.config = config
        self.redis_url = config.redis_url or ""
        self.members: list[Member] = []
        self._next_index: dict[Kind, int] = {"prefill": 0, "decode": 0}
        self._starts: dict[str, int] = {}
        self._starts_lock = threading.Lock()
        self._lock = threading.Lock()

    def server_starting(self, name: str) -> int:
        """How many times `name` started, this start included (1: the first)."""
        with self._starts_lock:
            self._starts[name] = self._starts.get(name, 0) + 1
            return self._starts[name]

    def up(self, redis_port: int) -> ClusterStatus:
        with self._lock:
            try:
                if not self.redis_url:
                    self.redis_url = self._start_redis(redis_port)
                router = self._create("router", "router")
                prefill = self._add_nodes(self.config.num_prefill, "prefill")
                self._wait([router, *prefill, *self._add_nodes(self.config.num_decode, "decode")])
            except BaseException:
                self._stop_all()
                raise
        return self.status()

    def _add_nodes(self, count: int, role: Role) -> list[Member]:
        return [self._create_node(role) for _ in range(count)]

    def scale(self, num_prefill: int, num_decode: int) -> ClusterStatus:
        check_counts(num_prefill, num_decode)
        with self._lock:
            added: list[Member] = []
            removed: list[Member] = []
            wanted: tuple[tuple[Role, int], ...] = (
                ("prefill", num_prefill),
                ("decode", num_decode),
            )
            for role, want in wanted:
                have = self._nodes(role)
                added += self._add_nodes(want - len(have), role)
                removed += have[want:][::-1]
            try:
                self._wait(added)
            except BaseException:
                self._stop(added)  # the cluster stays as it was
                raise
            self._stop(removed)
        return self.status()

    def status(self) -> ClusterStatus:
        members = list(self.members)
        refs = [m.handle.info.remote() for m in members]
        out = [self._member_status(m, ref) for m, ref in zip(members, refs, strict=True)]
        router = next((s.info for s in out if s.kind == "router" and s.info is not None), None)
        return ClusterStatus(
            cluster=self.config.cluster,
            router_url=router.address if router is not None else "",
            redis_url=self.redis_url,
            num_prefill=len(self._nodes("prefill")),
            num_decode=len(self._nodes("decode")),
            members=tuple(out),
        )

    def down(self) -> int:
        """Stop everything; the number of leftover Redis keys deleted."""
        with self._lock:
            self._stop_all()
            if self.config.redis_url:
                return delete_cluster_keys(self.config.redis_url, self.config.cluster)
            return 0

    def _nodes(self, role: Role) -> list[Member]:
        return [m for m in self.members if m.kind == role]

    def _member_status(self, member: Member, ref: ray.ObjectRef) -> MemberStatus:
        try:
            member.info = ray.get(ref, timeout=INFO_TIMEOUT_S)
            return MemberStatus(member.name, member.kind, "serving", member.info)
        except ray.exceptions.GetTimeoutError:
            return MemberStatus(member.name, member.kind, "not answering", member.info)
        except ray.exceptions.RayActorError as exc:
            error = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            return MemberStatus(member.name, member.kind, "dead", member.info, error)

    def _start_redis(self, port: int) -> str:
        member = self._create("redis", "redis", redis_port=port)
        self._wait([member])
        if member.info is None:
            raise RuntimeError("Redis started but did not report its address")
        return member.info.address

    def _create_node(self, role: Role) -> Member:
        index = self._next_index[role]
        self._next_index[role] = index + 1
        return self._create(role, f"{role}-{index}")

    def _create(self, kind: Kind, member: str, redis_port: int = 0) -> Member:
        cfg = self.config
        name = actor_name(cfg.cluster, member)
        options, target = self._options(kind)
        options = {**options, "name": name, "namespace": NAMESPACE}
        options["max_restarts"] = cfg.max_restarts
        handle: Any  # Ray's actor handles type each actor class apart
        if kind == "redis":
            handle = ray.remote(RedisActor).options(**options).remote(cfg, name, redis_port)
        else:
            remote = ray.remote(ServerActor).options(**options)
            handle = remote.remote(cfg, name, kind, self.redis_url)
        created = Member(name, kind, handle, target)
        self.members.append(created)
        logger.info("created %s (target Ray node %s)", name, target or "any")
        return created

    def _options(self, kind: Kind) -> tuple[dict, str]:
        """Ray actor options of a `kind` server, and the Ray node it is placed on."""
        cfg = self.config
        if kind in ("router", "redis"):
            resource = cfg.router_resource or HEAD_RESOURCE
            return {"num_cpus": 0, "resources": {resource: 0.001}}, ""
        demand = node_demand(cfg)
        options: dict = {
            "num_cpus": demand.pop("CPU", 0),
            "num_gpus": demand.pop("GPU", 0),
            "resources": demand,
        }
        node = choose_node(
            live_ray_nodes(),
            self._placed(),
            kind,  # type: ignore[arg-type]
            cfg.placement(kind),  # type: ignore[arg-type]
            node_demand(cfg),
        )
        if node is None:
            logger.warning("no Ray node has room for another %s node: Ray queues it", kind)
            return options, ""
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node.node_id, soft=True)
        return options, node.node_id

    def _placed(self) -> list[Placed]:
        out = []
        for m in self.members:
            where = m.info.ray_node_id if m.info is not None else m.target_node
            if m.kind in ("prefill", "decode") and where:
                out.append(Placed(where, m.kind))  # type: ignore[arg-type]
        return out

    def _wait(self, members: Sequence[Member]) -> None:
        """Until each serves; RuntimeError naming the first that could not start (as soon
        as one fails, without waiting for the others)."""
        pending = {m.handle.info.remote(): m for m in members}
        deadline = (
            time.monotonic() + self.config.start_timeout_s + self.config.max_restart_backoff_s
        )
        while pending:
            remaining_s = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=remaining_s)
            if not ready:
                names = ", ".join(m.name for m in pending.values())
                raise RuntimeError(f"{names} did not start within {self.config.start_timeout_s} s")
            member = pending.pop(ready[0])
            try:
                member.info = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                raise RuntimeError(f"{member.name} did not start: {_reason(exc)}") from None
            logger.info("%s serving at %s on %s", member.name, member.info.address, member.info.ip)

    def _stop(self, members: Sequence[Member]) -> None:
        """Drain and stop each that served (all at once), then kill every actor for good
        (one that never served has nothing to drain; its server dies with it)."""
        refs = [m.handle.stop.remote() if m.info is not None else None for m in members]
        timeout_s = (self.config.drain_timeout_s or 0.0) + self.config.stop_grace_s + 10.0
        for member, ref in zip(members, refs, strict=True):
            try:
                if ref is not None:
                    ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                logger.warning("%s did not stop cleanly (%s): killing it", member.name, exc)
            ray.kill(member.handle, no_restart=True)
            self.members.remove(member)
            logger.info("stopped %s", member.name)

    def _stop_all(self) -> None:
        self._stop([m for m in self.members if m.kind == "router"])
        self._stop([m for m in self.members if m.kind in ("prefill", "decode")])
        self._stop([m for m in self.members if m.kind == "redis"])


def live_ray_nodes() -> list[RayNode]:
    nodes = [
        RayNode(n["NodeID"], n["NodeManagerAddress"], n["Resources"])
        for n in ray.nodes()
        if n.get("Alive")
    ]
    return sorted(nodes, key=lambda n: (n.address, n.node_id))


def delete_cluster_keys(redis_url: str, cluster: str) -> int:
    """Delete every key under the cluster's prefix (docs/redis_schema.md); how many."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    try:
        keys = list(client.scan_iter(match=RedisKeys(cluster).prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        return len(keys)
    finally:
        client.close()


def _reason(exc: BaseException) -> str:
    """The last lines of a Ray error: the server's own output when it failed to start."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return "\n".join(lines[-25:]) if lines else type(exc).__name__
