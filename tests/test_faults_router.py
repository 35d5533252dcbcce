"""Router liveness against frozen and stalled decode nodes: real gRPC, real HTTP, real Redis.

A scripted decode node in its own process is frozen with SIGSTOP (only keepalive can tell);
an in-process one goes silent while its process stays alive (only the stream deadlines can
tell). Before the first token the prompt is re-routed; after it the request ends with a
clean error; nothing hangs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from scripted_decode import ScriptedDecodeNode

from splitserve.launch.processes import ManagedProcess
from splitserve.launch.redis_server import RedisServer
from splitserve.router.config import RouterConfig
from splitserve.router.server import RouterServer
from splitserve.router.tokenizer import RouterTokenizer

pytestmark = [pytest.mark.faults, pytest.mark.slow]

MODEL = "tiny"
NODE_READY = re.compile(r"node (\S+) listening on (\S+)")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> RouterTokenizer:
    return RouterTokenizer.load(str(tiny_llama))


def start_router(
    redis_url: str, tokenizer: RouterTokenizer, cluster: str, is_keepalive_only: bool = False
) -> RouterServer:
    """A router with short liveness bounds; `is_keepalive_only`: stream deadlines so long
    that only gRPC keepalive can notice a frozen node in time."""
    deadline_s = 120.0 if is_keepalive_only else 0.0
    config = RouterConfig(
        redis_url=redis_url,
        tokenizer="unused",
        model=MODEL,
        cluster=cluster,
        port=0,
        node_cache_s=0.1,
        keepalive_interval_s=0.5,
        keepalive_timeout_s=1.0,
        stream_idle_timeout_s=deadline_s or 1.5,
        first_message_timeout_s=deadline_s or 3.0,
        suspect_s=3.0,
    )
    return RouterServer(config, tokenizer=tokenizer, log_level="warning").start_in_thread()


def sse_events(response: httpx.Response) -> list[object]:
    events: list[object] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture()
def stalling_pair(
    redis_server: RedisServer, tokenizer: RouterTokenizer
) -> Iterator[tuple[str, list[ScriptedDecodeNode]]]:
    cluster = f"f{uuid.uuid4().hex[:10]}"
    nodes = [
        ScriptedDecodeNode(tokenizer, MODEL).start(redis_server.url, cluster) for _ in range(2)
    ]
    router = start_router(redis_server.url, tokenizer, cluster)
    yield router.url, nodes
    router.stop_thread()
    for node in nodes:
        node.stop()


def test_silent_before_first_token_is_rerouted(stalling_pair) -> None:
    url, nodes = stalling_pair
    nodes[0].stall_after_tokens, nodes[0].stall_s = 0, 30.0
    nodes[1].stall_after_tokens, nodes[1].stall_s = 0, 30.0
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4}
    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", json=body, timeout=20)
    # Both silent: one first-message deadline each, then a clean 503.
    assert r.status_code == 503 and r.json()["error"]["code"] == "node_unresponsive", r.text
    assert time.monotonic() - start < 10
    nodes[1].stall_after_tokens = None  # one healthy node: the prompt lands there
    time.sleep(3.5)  # both suspects expire
    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", json=body, timeout=20)
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    assert time.monotonic() - start < 6
    r = httpx.post(url + "/v1/completions", json=body, timeout=20)
    assert r.status_code == 200  # the silent node is left out now: no wait at all


def test_silent_after_first_token_ends_with_an_error_event(stalling_pair) -> None:
    url, nodes = stalling_pair
    for node in nodes:
        node.stall_after_tokens, node.stall_s = 2, 30.0
    body = {"model": MODEL, "prompt": "x", "max_tokens": 8, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=20) as s:
        assert s.status_code == 200
        events = sse_events(s)
    assert time.monotonic() - start < 8
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]  # type: ignore[index]
    assert error["code"] == "node_unresponsive" and "after its first token" in error["message"]
    assert "choices" in events[0]  # type: ignore[operator]
    r = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=20)
    assert r.status_code == 503 and r.json()["error"]["code"] == "node_unresponsive"


def scripted_process(redis_url: str, cluster: str, tokenizer_dir: Path) -> ManagedProcess:
    args = [
        sys.executable,
        str(Path(__file__).with_name("scripted_decode.py")),
        "--redis",
        redis_url,
        "--cluster",
        cluster,
        "--tokenizer",
        str(tokenizer_dir),
        "--token-delay-s",
        "0.02",
    ]
    return ManagedProcess("scripted", args, ready_pattern=NODE_READY).start(120)


def test_sigstopped_decode_node_costs_seconds_not_a_hang(
    redis_server: RedisServer, tokenizer: RouterTokenizer, tiny_llama: Path
) -> None:
    """Repro 1 of the fault campaign: a frozen decode node must not hold requests."""
    cluster = f"f{uuid.uuid4().hex[:10]}"
    # Started from this thread: a child dies with the thread that started it.
    procs = [scripted_process(redis_server.url, cluster, tiny_llama) for _ in range(2)]
    router = start_router(redis_server.url, tokenizer, cluster, is_keepalive_only=True)
    body = {"model": MODEL, "prompt": "frozen", "max_tokens": 40}
    try:
        for _ in range(4):  # channels to both nodes are open
            assert httpx.post(router.url + "/v1/completions", json=body).status_code == 200
        os.kill(procs[0].pid, signal.SIGSTOP)

        def one(_: int) -> tuple[int, float]:
            start = time.monotonic()
            r = httpx.post(router.url + "/v1/completions", json=body, timeout=30)
            return r.status_code, time.monotonic() - start

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(16)))
        statuses = [s for s, _ in results]
        assert statuses.count(200) >= 14, results  # re-routed before the first token
        assert set(statuses) <= {200, 503}, results
        assert max(t for _, t in results) < 10, results
        health = httpx.get(router.url + "/health").json()
        assert health["num_unresponsive_decode_nodes"] + health["num_decode_nodes"] >= 1
    finally:
        os.kill(procs[0].pid, signal.SIGCONT)
        router.stop_thread()
        for proc in procs:
            proc.stop()


def test_only_decode_node_frozen_gives_a_clean_503(
    redis_server: RedisServer, tokenizer: RouterTokenizer, tiny_llama: Path
) -> None:
    """1P1D repro: `kill -STOP <decode>; curl -m 8` answered nothing; now a 503 in seconds,
    and /health says so at once."""
    cluster = f"f{uuid.uuid4().hex[:10]}"
    proc = scripted_process(redis_server.url, cluster, tiny_llama)
    router = start_router(redis_server.url, tokenizer, cluster, is_keepalive_only=True)
    body = {"model": MODEL, "prompt": "frozen", "max_tokens": 4}
    try:
        assert httpx.post(router.url + "/v1/completions", json=body).status_code == 200
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(1)
        start = time.monotonic()
        r = httpx.post(router.url + "/v1/completions", json=body, timeout=8)
        assert r.status_code == 503, r.text
        assert time.monotonic() - start < 6
        assert httpx.get(router.url + "/health").status_code == 503
        os.kill(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 15
        while httpx.post(router.url + "/v1/completions", json=body).status_code != 200:
            assert time.monotonic() < deadline, "no recovery after SIGCONT"
            time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        router.stop_thread()
        proc.stop()


def small_request_latencies(url: str, stop_after_s: float, gap_s: float = 0.05) -> list[float]:
    body = {"model": MODEL, "prompt": "small", "max_tokens": 2}
    out = []
    with httpx.Client(timeout=30) as http:
        end = time.monotonic() + stop_after_s
        while time.monotonic() < end:
            start = time.monotonic()
            assert http.post(url + "/v1/completions", json=body).status_code == 200
            out.append(time.monotonic() - start)
            time.sleep(gap_s)
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def p99_while_posting(url: str, path: str, body: bytes, expect: int) -> float:
    """Small requests' p99 latency while another client posts `body` to `path` 3 times."""

    def flood() -> list[int]:
        headers = {"content-type": "application/json"}
        with httpx.Client(timeout=60) as http:
            return [http.post(url + path, content=body, headers=headers).status_code for _ in "abc"]

    with ThreadPoolExecutor(1) as pool:
        flooding = pool.submit(flood)
        during = small_request_latencies(url, 3.0)
        assert flooding.result() == [expect] * 3
    return p99(during)


# How much a small request's p99 may grow while 10 MB prompts are refused, and while a
# 3 MB /tokenize is served.
BIG_BODY_BOUND_S = 0.1
TOKENIZE_BOUND_S = 0.5


def test_huge_prompts_do_not_stall_the_router(redis_server: RedisServer, tokenizer, tiny_llama):
    """Repro 2: a 10 MB prompt (413 before parsing) leaves other requests' p99 within 100 ms
    of what it was; a 3 MB /tokenize (1.4M tokens: seconds of tokenizer work, off the event
    loop and outside the GIL) costs them a fraction of a second, not the 3.7 s it did."""
    cluster = f"f{uuid.uuid4().hex[:10]}"
    node = ScriptedDecodeNode(tokenizer, MODEL).start(redis_server.url, cluster)
    router = ManagedProcess.splitserve(
        "router",
        *("router", "--port", "0", "--redis", redis_server.url, "--cluster", cluster),
        *("--model", MODEL, "--tokenizer", str(tiny_llama), "--max-body-bytes", str(4 << 20)),
    ).start(120)
    url = f"http://{router.address}"
    huge = "lorem ipsum dolor sit amet " * (10_000_000 // 27)
    # Encoded once, up front: encoding 10 MB of JSON in this process while it times the
    # small requests would hold its GIL and show up as their latency.
    big = json.dumps({"model": MODEL, "prompt": huge}).encode()
    text = json.dumps({"model": MODEL, "prompt": huge[:3_000_000]}).encode()
    try:
        small_request_latencies(url, 1.0)  # warm
        for attempt in (1, 2):
            baseline = p99(small_request_latencies(url, 3.0))
            during_big = p99_while_posting(url, "/v1/completions", big, expect=413)
            during_tokenize = p99_while_posting(url, "/tokenize", text, expect=200)
            print(
                f"attempt {attempt}: small requests p99: {baseline * 1e3:.1f} ms; with 10 MB "
                f"prompts {during_big * 1e3:.1f} ms; with 3 MB /tokenize "
                f"{during_tokenize * 1e3:.1f} ms"
            )
            # A router that stalls on these bodies is over the bounds in every attempt; a
            # busy test machine (other workers' models and clusters on the same cores)
            # can push one 3-second window's p99 over them, so one more is measured.
            if during_big - baseline < BIG_BODY_BOUND_S and (
                during_tokenize - baseline < TOKENIZE_BOUND_S
            ):
                break
        assert during_big - baseline < BIG_BODY_BOUND_S
        assert during_tokenize - baseline < TOKENIZE_BOUND_S
    finally:
        router.stop()
        node.stop()
