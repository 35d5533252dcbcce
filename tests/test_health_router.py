"""The router's probes over real HTTP, with a scripted decode node on real gRPC and a real
redis-server: /live is 200 while the process is up; /ready is 200 only with a routable
decode node and Redis answering (503 with a reason otherwise); neither needs the API key.
On the same router, a request's log line in JSON carries its request id. An idle client
connection stays open past the clients' own keep-alive (`http_keep_alive_s`)."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
import uuid
from pathlib import Path

import httpx
from scripted_decode import ScriptedDecodeNode

from splitserve.launch.log_format import JsonFormatter
from splitserve.launch.redis_server import RedisServer
from splitserve.router.config import RouterConfig
from splitserve.router.server import RouterServer
from splitserve.router.tokenizer import RouterTokenizer

MODEL = "tiny"
API_KEY = "sekret"


def _router(
    redis_url: str, tokenizer: RouterTokenizer, cluster: str, **overrides: int
) -> RouterServer:
    config = RouterConfig(
        redis_url=redis_url,
        tokenizer="unused",
        model=MODEL,
        cluster=cluster,
        port=0,
        api_key=API_KEY,
        node_cache_s=0.1,
        **overrides,  # type: ignore[arg-type]
    )
    return RouterServer(config, tokenizer=tokenizer, log_level="warning").start_in_thread()


def _wait_status(url: str, status: int, timeout_s: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        reply = httpx.get(url, timeout=10)
        if reply.status_code == status or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def test_live_and_ready_follow_decode_nodes_and_redis(tiny_llama: Path) -> None:
    tokenizer = RouterTokenizer.load(str(tiny_llama))
    cluster = f"r{uuid.uuid4().hex[:8]}"
    with RedisServer() as redis:
        server = _router(redis.url, tokenizer, cluster)
        node = None
        try:
            live = httpx.get(server.url + "/live")
            assert live.status_code == 200 and live.json() == {"status": "ok"}
            ready = httpx.get(server.url + "/ready")
            assert ready.status_code == 503, ready.text
            assert ready.json()["reason"] == "no routable decode node"
            assert httpx.head(server.url + "/ready").status_code == 503

            node = ScriptedDecodeNode(tokenizer, MODEL).start(redis.url, cluster)
            ready = _wait_status(server.url + "/ready", 200)
            assert ready.status_code == 200 and "reason" not in ready.json(), ready.text
            assert ready.json()["num_decode_nodes"] == 1
            check_request_log_line(server.url)

            redis.stop()  # nodes still serve; the router routes by load, /health stays 200
            ready = _wait_status(server.url + "/ready", 503)
            assert ready.status_code == 503 and ready.json()["reason"] == "Redis does not answer"
            assert httpx.get(server.url + "/health").status_code == 200
            assert httpx.get(server.url + "/live").status_code == 200
        finally:
            if node is not None:
                node.stop()
            server.stop_thread()


def check_request_log_line(url: str) -> None:
    """An unknown request field is logged (and ignored) in the request's own line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    router_logger = logging.getLogger("splitserve.router")
    level = router_logger.level
    router_logger.addHandler(handler)
    router_logger.setLevel(logging.INFO)
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "colour": "blue"}
        headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "req-log-1"}
        reply = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
    finally:
        router_logger.removeHandler(handler)
        router_logger.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ignored = [x for x in lines if "ignoring unknown fields" in x["message"]]
    assert ignored and ignored[0]["request_id"] == "req-log-1", lines


def _get_live(conn: socket.socket) -> bytes:
    """GET /live on an open connection: the reply's bytes, b"" when the router closed it."""
    try:
        conn.sendall(b"GET /live HTTP/1.1\r\nHost: router\r\n\r\n")
        reply = b""
        while not reply.endswith(b'{"status":"ok"}'):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply
    except (ConnectionResetError, BrokenPipeError):
        return b""


def test_idle_connections_outlive_the_clients_keep_alive(tiny_llama: Path) -> None:
    """httpx and the openai client drop an idle pooled connection after 5 s, aiohttp after
    15: a router closing it at the same time fails the request that reuses it."""
    tokenizer = RouterTokenizer.load(str(tiny_llama))
    cluster = f"r{uuid.uuid4().hex[:8]}"
    with RedisServer() as redis:
        servers = [
            _router(redis.url, tokenizer, cluster),
            _router(redis.url, tokenizer, cluster, http_keep_alive_s=1),
        ]
        try:
            conns = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for s in servers]
            with conns[0], conns[1]:
                assert all(_get_live(c).startswith(b"HTTP/1.1 200") for c in conns)
                time.sleep(6.0)  # idle past httpx's pool expiry (and uvicorn's default 5 s)
                assert _get_live(conns[0]).startswith(b"HTTP/1.1 200")
                assert _get_live(conns[1]) == b"", "a 1 s keep-alive closed the connection"
        finally:
            for server in servers:
                server.stop_thread()
