"""Prefix index and NodePublisher against a real redis-server.

Longest prefixes against a brute-force reference on random chains, dead nodes ignored,
clear_node, garbage collection, and the publisher riding out Redis restarts and outages.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.engine.hashing import BlockHash, hash_blocks, seed_hash
from splitserve.launch.redis_server import RedisServer
from splitserve.node.prefix_index import MAX_ENTRIES_PER_CALL, AsyncPrefixIndex, PrefixIndex
from splitserve.node.publisher import NodePublisher
from splitserve.node.registry import (
    NodeCapacity,
    NodeId,
    NodeLoad,
    NodeRecord,
    NodeRegistry,
    RedisKeys,
    make_node_id,
    redis_client,
)

BLOCK_SIZE = 16


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_client(redis_server.url)
    yield c
    c.close()


def new_cluster() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def make_record(port: int, role: str = "decode") -> NodeRecord:
    return NodeRecord(
        node_id=make_node_id(role, "127.0.0.1", port),  # type: ignore[arg-type]
        role=role,  # type: ignore[arg-type]
        grpc_address=f"127.0.0.1:{port}",
        nixl_agent_name=f"agent-{port}",
        model="tiny",
        block_size=BLOCK_SIZE,
        capacity=NodeCapacity(num_kv_blocks=4096, max_num_seqs=32),
    )


def chain(rng: random.Random, num_blocks: int) -> list[BlockHash]:
    tokens = [rng.randrange(32000) for _ in range(num_blocks * BLOCK_SIZE)]
    return hash_blocks(tokens, BLOCK_SIZE, seed_hash("tiny", BLOCK_SIZE))


def reference(query: list[BlockHash], held: dict[NodeId, set[BlockHash]]) -> dict[NodeId, int]:
    out = {}
    for node_id, hashes in held.items():
        n = 0
        while n < len(query) and query[n] in hashes:
            n += 1
        if n:
            out[node_id] = n
    return out


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


node_plans = st.fixed_dictionaries(
    {
        "prefix": st.integers(0, 40),
        "holes": st.sets(st.integers(0, 39), max_size=3),
        "extra": st.sets(st.integers(0, 39), max_size=3),
        "removed": st.sets(st.integers(0, 39), max_size=3),
        "is_alive": st.booleans(),
        "other_chain": st.booleans(),
    }
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32),
    num_blocks=st.integers(1, 40),
    shared=st.integers(0, 40),
    plans=st.lists(node_plans, min_size=1, max_size=6),
    query_len=st.integers(0, 40),
)
def test_longest_prefixes_match_reference(
    client: redis.Redis,
    seed: int,
    num_blocks: int,
    shared: int,
    plans: list[dict],
    query_len: int,
) -> None:
    rng = random.Random(seed)
    cluster = new_cluster()
    registry, index = NodeRegistry(client, cluster), PrefixIndex(client, cluster)
    main = chain(rng, num_blocks)
    # A second prompt that shares its first `shared` blocks with the main one.
    other = main[: min(shared, num_blocks)] + chain(rng, num_blocks)[min(shared, num_blocks) :]
    held_live: dict[NodeId, set[BlockHash]] = {}
    for port, plan in enumerate(plans):
        record = make_record(port)
        registry.register(record)
        source = other if plan["other_chain"] else main
        idx = (set(range(min(plan["prefix"], num_blocks))) - plan["holes"]) | plan["extra"]
        stored = {source[i] for i in idx if i < num_blocks}
        removed = {source[i] for i in plan["removed"] if i < num_blocks}
        assert index.publish(record.node_id, stored=list(stored), removed=[])
        assert index.publish(record.node_id, stored=[], removed=list(removed))
        if plan["is_alive"]:
            held_live[record.node_id] = stored - removed
        else:  # a crash: the record is gone, the index entries stay behind
            registry.deregister(record.node_id)
    query = main[: min(query_len, num_blocks)]
    assert index.longest_prefixes(query) == reference(query, held_live)


def test_walk_across_mget_chunk_boundaries(client: redis.Redis) -> None:
    cluster = new_cluster()
    registry, index = NodeRegistry(client, cluster), PrefixIndex(client, cluster)
    hashes = chain(random.Random(10), 1200)
    depths = [1, 15, 16, 17, 47, 48, 49, 111, 112, 113, 496, 497, 1199, 1200]
    expected = {}
    for port, depth in enumerate(depths):
        record = make_record(port)
        registry.register(record)
        index.publish(record.node_id, hashes[:depth] + hashes[depth + 1 :], [])
        expected[record.node_id] = depth
    assert index.longest_prefixes(hashes) == expected
    assert index.longest_prefixes(hashes[:100]) == {k: min(v, 100) for k, v in expected.items()}


def test_dead_node_excluded_after_ttl(client: redis.Redis) -> None:
    cluster = new_cluster()
    short, long = NodeRegistry(client, cluster, ttl_s=1.0), NodeRegistry(client, cluster)
    index = PrefixIndex(client, cluster)
    hashes = chain(random.Random(1), 8)
    dying, staying = make_record(1), make_record(2)
    short.register(dying)
    long.register(staying)
    index.publish(dying.node_id, hashes, [])
    index.publish(staying.node_id, hashes[:5], [])
    assert index.longest_prefixes(hashes) == {dying.node_id: 8, staying.node_id: 5}
    time.sleep(1.2)
    assert index.longest_prefixes(hashes) == {staying.node_id: 5}
    assert index.collect_garbage() == [dying.node_id]
    keys = RedisKeys(cluster)
    assert client.exists(keys.node_blocks(dying.node_id)) == 0
    assert client.hvals(keys.slots) == [staying.node_id.encode()]
    assert client.exists(keys.block_prefix + f"{hashes[7]:032x}") == 0
    assert client.exists(keys.block_prefix + f"{hashes[4]:032x}") == 1


def test_publish_requires_registration_and_applies_removals_first(client: redis.Redis) -> None:
    cluster = new_cluster()
    index = PrefixIndex(client, cluster)
    hashes = chain(random.Random(2), 4)
    record = make_record(1)
    assert index.publish(record.node_id, hashes, []) is False
    assert client.keys(f"splitserve:{cluster}:*") == []
    NodeRegistry(client, cluster).register(record)
    assert index.publish(record.node_id, stored=hashes, removed=hashes[1:2])
    assert index.longest_prefixes(hashes) == {record.node_id: 4}
    assert index.publish(record.node_id, stored=[], removed=hashes[2:3])
    assert index.longest_prefixes(hashes) == {record.node_id: 2}


def test_clear_node_and_large_batches(client: redis.Redis) -> None:
    cluster = new_cluster()
    registry, index = NodeRegistry(client, cluster), PrefixIndex(client, cluster)
    num_blocks = 2 * MAX_ENTRIES_PER_CALL + 100
    hashes = chain(random.Random(3), num_blocks)
    a, b = make_record(1), make_record(2)
    registry.register(a)
    registry.register(b)
    assert index.publish(a.node_id, hashes, [])
    assert index.publish(b.node_id, hashes[:10], [])
    assert index.longest_prefixes(hashes) == {a.node_id: num_blocks, b.node_id: 10}
    assert index.clear_node(a.node_id) == num_blocks
    assert index.longest_prefixes(hashes) == {b.node_id: 10}
    assert index.clear_node(b.node_id) == 10
    assert client.keys(f"splitserve:{cluster}:blk:*") == []
    assert index.longest_prefixes(hashes) == {}


def test_collect_garbage_in_bounded_steps(client: redis.Redis) -> None:
    cluster = new_cluster()
    registry, index = NodeRegistry(client, cluster), PrefixIndex(client, cluster)
    hashes = chain(random.Random(4), MAX_ENTRIES_PER_CALL + 500)
    dead = [make_record(p) for p in range(3)]
    live = make_record(9)
    for r in [*dead, live]:
        registry.register(r)
        index.publish(r.node_id, hashes, [])
    for r in dead:
        registry.deregister(r.node_id)
    assert sorted(index.collect_garbage()) == sorted(r.node_id for r in dead)
    keys = RedisKeys(cluster)
    assert client.hgetall(keys.slots) == {b"3": live.node_id.encode()}
    block_keys = client.keys(keys.block_prefix + "*")
    assert len(block_keys) == len(hashes)
    assert {client.get(k) for k in block_keys} == {b"\0\0\0\1"}
    assert index.collect_garbage() == []


def test_slot_reused_only_after_collection(client: redis.Redis) -> None:
    cluster = new_cluster()
    registry, index = NodeRegistry(client, cluster), PrefixIndex(client, cluster)
    hashes = chain(random.Random(9), 6)
    dead, b, c = make_record(1), make_record(2), make_record(3)
    assert registry.register(dead) == 0
    index.publish(dead.node_id, hashes, [])
    registry.deregister(dead.node_id)  # entries left behind: slot 0 stays taken
    assert registry.register(b) == 1
    assert index.collect_garbage() == [dead.node_id]
    assert registry.register(c) == 0  # the freed slot, with nothing inherited
    assert index.longest_prefixes(hashes) == {}
    index.publish(c.node_id, hashes[:2], [])
    assert index.longest_prefixes(hashes) == {c.node_id: 2}


def test_async_lookup_matches_sync(redis_server: RedisServer, client: redis.Redis) -> None:
    cluster = new_cluster()
    registry, index = NodeRegistry(client, cluster), PrefixIndex(client, cluster)
    hashes = chain(random.Random(5), 30)
    for port, n in enumerate([30, 12, 1]):
        r = make_record(port)
        registry.register(r)
        index.publish(r.node_id, hashes[:n], [])

    async def lookup() -> dict[NodeId, int]:
        from splitserve.node.registry import async_redis_client

        aclient = async_redis_client(redis_server.url)
        try:
            return await AsyncPrefixIndex(aclient, cluster).longest_prefixes(hashes)
        finally:
            await aclient.aclose()

    result = asyncio.run(lookup())
    assert result == index.longest_prefixes(hashes)
    assert sorted(result.values()) == [1, 12, 30]


# ------------------------------------------------------------------ NodePublisher


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def start_publisher(url: str, cluster: str, record: NodeRecord, snapshot: list[BlockHash]):
    publisher = NodePublisher(
        url, cluster, ttl_s=1.0, heartbeat_interval_s=0.1, retry_interval_s=0.1
    )
    publisher.start(record, lambda: list(snapshot))
    return publisher


def test_publisher_snapshot_events_and_stop(private_redis: RedisServer) -> None:
    cluster, client = new_cluster(), redis_client(private_redis.url)
    index, registry = PrefixIndex(client, cluster), NodeRegistry(client, cluster)
    hashes = chain(random.Random(6), 20)
    record = make_record(1)
    publisher = start_publisher(private_redis.url, cluster, record, hashes[:8])
    try:
        assert publisher.is_synced
        assert index.longest_prefixes(hashes) == {record.node_id: 8}
        publisher.publish_events(stored=hashes[8:15], removed=[])
        publisher.publish_events(stored=[], removed=hashes[12:13])
        wait_until(lambda: index.longest_prefixes(hashes) == {record.node_id: 12}, 2.0, "events")
        publisher.heartbeat(NodeLoad(num_running=7, num_waiting=2, kv_usage=0.5))
        wait_until(lambda: registry.get(record.node_id).load.num_running == 7, 2.0, "load")
    finally:
        publisher.stop()
    assert registry.list_live_nodes() == []
    assert client.keys(f"splitserve:{cluster}:*") == []
    client.close()


def test_publisher_republishes_after_redis_restart(private_redis: RedisServer) -> None:
    cluster, client = new_cluster(), redis_client(private_redis.url)
    index = PrefixIndex(client, cluster)
    hashes = chain(random.Random(7), 16)
    record = make_record(1)
    publisher = start_publisher(private_redis.url, cluster, record, hashes[:4])
    try:
        publisher.publish_events(stored=hashes[4:10], removed=[])
        assert publisher.flush()
        run_id = client.info("server")["run_id"]
        private_redis.restart()
        # A new server with no persistence: its data set starts empty. (Reading the index
        # here instead would race the publisher, which may republish within 0.1 s.)
        assert client.info("server")["run_id"] != run_id
        wait_until(lambda: index.longest_prefixes(hashes) == {record.node_id: 10}, 3.0, "republish")
        # The record was deleted behind its back (as an expired record): it registers again.
        client.delete(RedisKeys(cluster).node(record.node_id))
        wait_until(lambda: index.longest_prefixes(hashes) == {record.node_id: 10}, 3.0, "again")
    finally:
        publisher.stop()
    client.close()


def test_publisher_never_raises_while_redis_is_down(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = new_cluster()
    hashes = chain(random.Random(8), 12)
    record = make_record(1)
    private_redis.stop()
    caplog.set_level(logging.WARNING, logger="splitserve.node.publisher")
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    publisher = start_publisher(url, cluster, record, hashes[:3])
    client = redis_client(url)
    try:
        publisher.publish_events(stored=hashes[3:6], removed=hashes[0:1])
        publisher.heartbeat(NodeLoad(num_running=1))
        assert publisher.flush() is False
        wait_until(
            lambda: any("Redis unreachable" in r.getMessage() for r in caplog.records), 3, "warning"
        )
        private_redis.start()
        index = PrefixIndex(client, cluster)
        wait_until(lambda: index.longest_prefixes(hashes[1:]) == {record.node_id: 5}, 3, "resync")
        # hashes[0] was removed while Redis was down.
        assert index.longest_prefixes(hashes) == {}
        private_redis.stop()
    finally:
        publisher.stop()  # with Redis down again: logs, does not raise
        client.close()
    assert any("could not deregister" in r.getMessage() for r in caplog.records)
