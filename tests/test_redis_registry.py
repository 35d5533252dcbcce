"""Node registry against a real redis-server: register, heartbeat, TTL expiry, roles, async."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from splitserve.launch.redis_server import RedisServer
from splitserve.node.registry import (
    AsyncNodeRegistry,
    NodeCapacity,
    NodeLoad,
    NodeRecord,
    NodeRegistry,
    RedisKeys,
    async_redis_client,
    make_node_id,
    redis_client,
)


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_client(redis_server.url)
    yield c
    c.close()


@pytest.fixture
def cluster() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def make_record(role: str = "decode", port: int = 7000, running: int = 0) -> NodeRecord:
    return NodeRecord(
        node_id=make_node_id(role, "127.0.0.1", port),  # type: ignore[arg-type]
        role=role,  # type: ignore[arg-type]
        grpc_address=f"127.0.0.1:{port}",
        nixl_agent_name=f"agent-{port}",
        model="tiny-llama",
        block_size=16,
        capacity=NodeCapacity(num_kv_blocks=1024, max_num_seqs=64),
        load=NodeLoad(num_running=running, num_waiting=1, kv_usage=0.25),
    )


def test_register_and_list_round_trips_every_field(client: redis.Redis, cluster: str) -> None:
    registry = NodeRegistry(client, cluster, ttl_s=5.0)
    decode, prefill = make_record("decode", 7001, running=3), make_record("prefill", 7002)
    assert registry.register(decode) == 0
    assert registry.register(prefill) == 1
    assert registry.register(decode) == 0  # registering again keeps the slot
    assert registry.list_live_nodes() == sorted([decode, prefill], key=lambda r: r.node_id)
    assert registry.list_live_nodes("prefill") == [prefill]
    assert registry.list_live_nodes("decode") == [decode]
    assert registry.get(decode.node_id) == decode
    ttl_ms = client.pttl(RedisKeys(cluster).node(decode.node_id))
    assert 4000 < ttl_ms <= 5000


def test_clusters_are_isolated(client: redis.Redis, cluster: str) -> None:
    NodeRegistry(client, cluster).register(make_record())
    assert NodeRegistry(client, cluster + "x").list_live_nodes() == []


def test_record_expires_without_heartbeat(client: redis.Redis, cluster: str) -> None:
    registry = NodeRegistry(client, cluster, ttl_s=1.0)
    record = make_record()
    registry.register(record)
    assert [r.node_id for r in registry.list_live_nodes()] == [record.node_id]
    time.sleep(1.2)
    assert registry.list_live_nodes() == []
    assert registry.heartbeat(record.node_id, NodeLoad()) is False
    # A heartbeat never resurrects an expired record: the node must register again.
    assert registry.list_live_nodes() == []


def test_heartbeat_keeps_alive_and_updates_load(client: redis.Redis, cluster: str) -> None:
    registry = NodeRegistry(client, cluster, ttl_s=1.0)
    record = make_record()
    registry.register(record)
    for i in range(5):
        time.sleep(0.3)  # 0.7 s of slack per beat on a loaded runner
        assert registry.heartbeat(record.node_id, NodeLoad(num_running=i, kv_usage=0.5)) is True
    (live,) = registry.list_live_nodes()
    assert live.load == NodeLoad(num_running=4, num_waiting=0, kv_usage=0.5)
    assert live.capacity == record.capacity and live.started_at == record.started_at


def test_deregister(client: redis.Redis, cluster: str) -> None:
    registry = NodeRegistry(client, cluster)
    a, b = make_record(port=1), make_record(port=2)
    registry.register(a)
    registry.register(b)
    registry.deregister(a.node_id)
    assert registry.list_live_nodes() == [b]
    assert client.hvals(RedisKeys(cluster).slots) == [b.node_id.encode()]


def test_async_registry_matches_sync(redis_server: RedisServer, cluster: str) -> None:
    sync_client = redis_client(redis_server.url)
    records = [make_record("decode", 1), make_record("prefill", 2), make_record("prefill", 3)]
    for r in records:
        NodeRegistry(sync_client, cluster).register(r)

    async def read() -> tuple[list[NodeRecord], list[NodeRecord]]:
        aclient = async_redis_client(redis_server.url)
        try:
            registry = AsyncNodeRegistry(aclient, cluster)
            return await registry.list_live_nodes(), await registry.list_live_nodes("prefill")
        finally:
            await aclient.aclose()

    everyone, prefills = asyncio.run(read())
    assert everyone == NodeRegistry(sync_client, cluster).list_live_nodes()
    assert [r.role for r in prefills] == ["prefill", "prefill"]
    sync_client.close()


def test_node_ids_are_unique_per_start() -> None:
    ids = {make_node_id("decode", "h", 1) for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("decode-h:1-") for i in ids)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"role": "router"}, "role must be one of"),
        ({"node_id": ""}, "node_id must be non-empty"),
        ({"block_size": 0}, "block_size must be >= 1"),
    ],
)
def test_record_validation(change: dict[str, object], message: str) -> None:
    fields = {**make_record().__dict__, **change}
    with pytest.raises(ValueError, match=message):
        NodeRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("cluster", ["", "a:b", "a b", "{x}"])
def test_bad_cluster_name(cluster: str) -> None:
    with pytest.raises(ValueError, match="cluster name"):
        RedisKeys(cluster)


def test_redis_server_restart_empties_data_on_same_port() -> None:
    with RedisServer() as server:
        url, port = server.url, server.port
        c = redis_client(url)
        c.set("k", "v")
        server.restart()
        assert server.port == port and server.url == url
        assert c.get("k") is None
        server.stop()
        assert not server.is_running
        with pytest.raises(redis.ConnectionError):
            c.ping()
        c.close()
