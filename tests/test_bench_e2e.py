"""End to end: `splitserve bench` against a real OpenAI-compatible HTTP server started here.

The server (FastAPI + uvicorn on a free loopback port, in a thread) streams with known
delays read from the request body: ``fake_ttft_ms`` before the first content chunk and
``fake_itl_ms`` between content chunks. Chat streams start with a role-only chunk sent at
once and carry an empty chunk mid-stream, and the usage chunk comes ``USAGE_DELAY_S`` after
the last content chunk, so a tool that counted any of those would be visibly off.
``fake_pool`` makes requests share a server of limited capacity (queueing raises TTFT).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from splitserve.launch.cli import main

# Real node processes (or two NIXL processes): run serially, see the Makefile.
pytestmark = pytest.mark.slow

USAGE_DELAY_S = 0.1
POOL_SIZES = {"one": 1}


def _chunk(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def make_app() -> FastAPI:
    app = FastAPI()
    state: dict[str, Any] = {"requests": 0, "pools": {}}

    def pool(name: str | None) -> asyncio.Semaphore | None:
        if name is None:
            return None
        return state["pools"].setdefault(name, asyncio.Semaphore(POOL_SIZES[name]))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = f"# TYPE fake_requests_total counter\nfake_requests_total {state['requests']}\n"
        return PlainTextResponse(text + "# TYPE fake_up gauge\nfake_up 1\n")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:  # byte-level tokenizer
        return {"tokens": list((await request.json())["prompt"].encode())}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return {"prompt": bytes((await request.json())["tokens"]).decode(errors="ignore")}

    async def stream(body: dict[str, Any], is_chat: bool, n: int) -> AsyncIterator[bytes]:
        ttft, itl = body["fake_ttft_ms"] / 1e3, body["fake_itl_ms"] / 1e3
        slots = pool(body.get("fake_pool"))
        if slots is not None:
            await slots.acquire()
        try:
            if is_chat:
                yield _chunk(
                    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                )
            await asyncio.sleep(ttft)
            for i in range(n):
                if i:
                    await asyncio.sleep(itl)
                text = chr(ord("a") + i % 26)
                choice = (
                    {"index": 0, "delta": {"content": text}}
                    if is_chat
                    else {"index": 0, "text": text}
                )
                choice["finish_reason"] = "length" if i == n - 1 else None
                yield _chunk({"choices": [choice]})
                if is_chat and i == n // 2:
                    yield _chunk({"choices": [{"index": 0, "delta": {"content": ""}}]})
        finally:
            if slots is not None:
                slots.release()
        if (body.get("stream_options") or {}).get("include_usage") and not body.get(
            "fake_no_usage"
        ):
            await asyncio.sleep(USAGE_DELAY_S)
            yield _chunk(
                {
                    "choices": [],
                    "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5},
                }
            )
        yield b": keep-alive comment\n\ndata: [DONE]\n\n"

    async def handle(request: Request, is_chat: bool) -> Any:
        body = await request.json()
        state["requests"] += 1
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        if body.get("fake_status"):
            return JSONResponse({"error": {"message": "nope"}}, status_code=body["fake_status"])
        if body.get("stream"):
            return StreamingResponse(stream(body, is_chat, n), media_type="text/event-stream")
        await asyncio.sleep(body["fake_ttft_ms"] / 1e3 + (n - 1) * body["fake_itl_ms"] / 1e3)
        text = "".join(chr(ord("a") + i % 26) for i in range(n))
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}}
            if is_chat
            else {"index": 0, "text": text}
        )
        return {"choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": n}}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, is_chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle(request, is_chat=True)

    return app


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start within 10 s")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def bench(*argv: str) -> int:
    return main(["bench", *argv])


def run_args(url: str, out: Path, extra: dict[str, Any], *more: str) -> list[str]:
    return [
        "--url",
        url,
        "--num-requests",
        "20",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--extra-body",
        json.dumps(extra),
        "--output-dir",
        str(out),
        "--no-progress",
        *more,
    ]


def value(summary: dict[str, Any], metric: str, q: str = "p50") -> float:
    return float(summary["metrics"][f"{metric}_ms"][q]["value"])


def test_chat_stream_recovers_known_latencies(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "chat"
    extra = {"fake_ttft_ms": 200, "fake_itl_ms": 20}
    rc = bench(
        "run",
        *run_args(
            server_url,
            out,
            extra,
            "--endpoint",
            "chat",
            "--rate",
            "20",
            "--slo",
            # Generous against the injected 200 ms / 20 ms, so that a loaded CI machine
            # still meets them; the tight cases are in test_bench_metrics.py.
            "ttft=2s,tpot=250ms,e2e:p90=5s",
            "--label",
            "chat",
        ),
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["num_completed"] == 20 and summary["counts"]["num_failed"] == 0
    assert 195 <= value(summary, "ttft") <= 260  # role chunk at t=0 must not count
    assert 19 <= value(summary, "itl") <= 30  # the empty chunk must not split a gap
    assert 19 <= value(summary, "tpot") <= 30
    # E2E = TTFT + 7 ITL; the usage chunk 100 ms later must not count
    assert 335 <= value(summary, "e2e") <= 420
    assert summary["counts"]["output_token_sources"] == {"usage": 20}
    assert summary["throughput"]["num_output_tokens"] == 160
    assert summary["slo"]["attainment"] == 1.0 and summary["slo"]["meets"]
    assert summary["server_metrics"]["deltas"]["fake_requests_total"] == 20
    assert summary["tokenizer"]["is_exact"]  # the server's /tokenize was used
    assert summary["workload"]["prompt_tokens"]["min"] == 16
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(len(r["chunk_times_s"]) == 8 for r in rows)
    for png in ("latency_cdf.png", "over_time.png", "slo_scale.png"):
        assert (out / png).stat().st_size > 1000


def test_completions_without_usage_counts_tokens_and_compare(
    server_url: str, tmp_path: Path
) -> None:
    extra = {"fake_ttft_ms": 100, "fake_itl_ms": 10, "fake_no_usage": True}
    assert (
        bench(
            "run",
            *run_args(
                server_url,
                tmp_path / "a",
                extra,
                "--label",
                "fast",
                "--no-plots",
                "--arrival",
                "constant",
                "--rate",
                "40",
            ),
        )
        == 0
    )
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert a["counts"]["output_token_sources"] == {"tokenizer": 20}
    assert a["throughput"]["num_output_tokens"] == 160
    assert 95 <= value(a, "ttft") <= 150 and 9 <= value(a, "tpot") <= 18
    assert a["load"]["achieved_rate"] == pytest.approx(40, rel=0.25)
    extra = {"fake_ttft_ms": 150, "fake_itl_ms": 10}
    assert (
        bench(
            "run",
            *run_args(
                server_url, tmp_path / "b", extra, "--label", "slow", "--no-plots", "--no-stream"
            ),
        )
        == 0
    )
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert value(b, "ttft") == pytest.approx(value(b, "e2e"))  # one body: TTFT = E2E
    assert b["metrics"]["tpot_ms"]["n"] == 0
    png = tmp_path / "compare.png"
    assert (
        bench(
            "compare",
            str(tmp_path / "a"),
            str(tmp_path / "b" / "summary.json"),
            "--output",
            str(png),
        )
        == 0
    )
    assert png.stat().st_size > 1000


def test_http_errors_are_counted(server_url: str, tmp_path: Path) -> None:
    extra = {"fake_ttft_ms": 10, "fake_itl_ms": 1, "fake_status": 503}
    assert (
        bench("run", *run_args(server_url, tmp_path, extra, "--no-plots", "--slo", "ttft=1s")) == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"]["errors"] == {"HTTP 503": 20}
    assert summary["slo"]["attainment"] == 0.0 and "failed" in summary["warnings"][0]


def test_sweep_over_concurrency(server_url: str, tmp_path: Path) -> None:
    extra = {"fake_ttft_ms": 50, "fake_itl_ms": 5}
    assert (
        bench(
            "sweep",
            *run_args(server_url, tmp_path, extra, "--concurrencies", "1,4", "--slo", "ttft=200ms"),
        )
        == 0
    )
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["load"] for p in sweep["points"]] == [1, 4]
    one, four = sweep["points"]
    assert four["request_per_s"] > 2.5 * one["request_per_s"]  # 4 users, no server limit
    assert (tmp_path / "attainment_vs_load.png").exists()
    assert (tmp_path / "concurrency-4" / "requests.jsonl").exists()


def test_search_finds_capacity_of_a_limited_server(server_url: str, tmp_path: Path) -> None:
    # one request at a time, 80 ms each: saturates at 12.5 req/s; probes 5, 10, 20, 15
    extra = {"fake_ttft_ms": 50, "fake_itl_ms": 10, "fake_pool": "one"}
    args = run_args(
        server_url,
        tmp_path,
        extra,
        "--arrival",
        "constant",
        "--slo",
        "ttft=150ms",
        "--start-rate",
        "5",
        "--max-probes",
        "4",
    )
    args[args.index("--output-len") + 1] = "4"
    assert bench("search", *args) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    loads = [p["load"] for p in sweep["points"]]
    assert len(loads) == 4 and loads[0] == 5
    cap = sweep["capacity"]
    assert cap["status"] == "found"
    assert 5 <= cap["interpolated_rate"] <= 20
    assert sweep["points"][0]["meets"]  # 5 req/s: 40 % busy
    assert not any(p["meets"] for p in sweep["points"] if p["load"] >= 15)  # over capacity


def test_bench_imports_no_torch() -> None:
    probe = (
        "import sys; import splitserve.benchmarks.commands, splitserve.benchmarks.plots; "
        "assert 'torch' not in sys.modules, 'bench imported torch'"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
