"""The router with Redis going away and coming back, and `splitserve router` as a subprocess."""

from __future__ import annotations

import logging
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from scripted_decode import ScriptedDecodeNode

from splitserve.launch.processes import ManagedProcess
from splitserve.launch.redis_server import RedisServer
from splitserve.router.config import RouterConfig
from splitserve.router.server import RouterServer
from splitserve.router.tokenizer import RouterTokenizer

MODEL = "tiny"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> RouterTokenizer:
    return RouterTokenizer.load(str(tiny_llama))


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def served_by(router: str, nodes: list[ScriptedDecodeNode], prompt: list[int], rid: str) -> int:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    r = httpx.post(router + "/v1/completions", json=body, headers={"X-Request-Id": rid}, timeout=5)
    assert r.status_code == 200, r.text
    owners = {i for i, n in enumerate(nodes) for q in n.requests if q.request_id.startswith(rid)}
    assert len(owners) == 1
    return owners.pop()


def test_redis_down_keeps_serving_and_cache_awareness_returns(
    redis_server: RedisServer, tokenizer: RouterTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = f"t{uuid.uuid4().hex[:10]}"
    nodes = [
        ScriptedDecodeNode(tokenizer, MODEL).start(redis_server.url, cluster) for _ in range(2)
    ]
    config = RouterConfig(
        redis_url=redis_server.url, tokenizer="unused", model=MODEL, cluster=cluster, port=0,
        node_cache_s=0.1,
    )  # fmt: skip
    server = RouterServer(config, tokenizer=tokenizer, log_level="warning").start_in_thread()
    router = server.url
    prompt = [200 + i % 500 for i in range(160)]
    try:
        nodes[1].publish_prefix(prompt)
        assert {served_by(router, nodes, prompt, f"up-{k}") for k in range(4)} == {1}

        caplog.set_level(logging.WARNING, logger="splitserve.router.cluster")
        redis_server.stop()
        started = time.monotonic()
        owners = {served_by(router, nodes, prompt, f"down-{k}") for k in range(6)}
        assert time.monotonic() - started < 3.0  # no request waits long on a dead Redis
        assert owners == {0, 1}  # load only: the prefix no longer pulls traffic
        health = httpx.get(router + "/health").json()
        assert health["redis"] == "down" and health["routing_policy"] == "least_load"
        assert health["num_decode_nodes"] == 2
        downs = [
            r
            for r in caplog.records
            if r.name == "splitserve.router.cluster" and "Redis unreachable" in r.getMessage()
        ]
        assert len(downs) == 1  # logged once per transition

        redis_server.start()  # same port, empty: the nodes re-register and republish
        wait_until(lambda: httpx.get(router + "/health").json()["redis"] == "up", 5.0, "redis up")

        def all_to_owner() -> bool:
            rids = [f"back-{uuid.uuid4().hex[:8]}" for _ in range(4)]
            return {served_by(router, nodes, prompt, rid) for rid in rids} == {1}

        wait_until(all_to_owner, 8.0, "cache-aware routing to come back")
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        server.stop_thread()
        for node in nodes:
            node.stop()


def test_router_cli_subprocess(redis_server: RedisServer, tiny_llama: Path) -> None:
    cluster = f"t{uuid.uuid4().hex[:10]}"
    proc = ManagedProcess.splitserve(
        "router", "router", "--port", "0", "--redis", redis_server.url, "--cluster", cluster,
        "--tokenizer", str(tiny_llama), "--routing-policy", "least_load",
        "--disagg-min-tokens", "64", "--log-level", "warning",
    ).start(timeout_s=60)  # fmt: skip
    try:
        url = f"http://{proc.address}"
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["redis"] == "up"
        assert health.json()["routing_policy"] == "least_load"
        tokens = httpx.post(url + "/tokenize", json={"prompt": "hi"}, timeout=5).json()["tokens"]
        assert tokens
        proc.signal(signal.SIGINT)
        wait_until(lambda: not proc.is_alive(), 10.0, "the router to exit on SIGINT")
    finally:
        code = proc.stop()
    assert code == 0
