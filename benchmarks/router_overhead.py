"""The router's CPU time per streamed token, with a real decode node on the CPU behind it.

    python -m splitserve.benchmarks.router_overhead [--streams 115] [--tokens 256] \
        [--runs 3] [--model DIR] [--router-arg=--no-multiplex-streams] [--out router.json]

Starts a redis-server, one decode node (`--device cpu`, the built-in tiny model unless
`--model`, prefix caching off) and one router, each its own process, then `--runs` times
opens `--streams` streaming completions at once (random 32-token prompts, `--tokens` out,
ignore_eos, usage in a last chunk) over raw sockets and reads them to the end, counting
the SSE data frames and the completion tokens their usage chunks report. The router's CPU
time (user + system, from /proc) over each run, divided by the tokens it streamed, is its
cost per streamed token: the node stream's read, the hand-over to the request, the SSE
frame and its write. A router that fell behind sends a prompt's queued tokens in one frame
(router/coalesce.py), so a run may have fewer frames than tokens. A warm-up run comes first
and is not counted.

The node's steps and the client share the machine with the router, so wall times depend
on the machine; CPU time per frame much less. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.benchmarks.thread_cpu import read_cpu_stat
from splitserve.launch.processes import ManagedProcess
from splitserve.launch.redis_server import RedisServer

logger = logging.getLogger(__name__)
PROMPT_TOKENS = 32
PROMPT_ID_LIMIT = 1000  # below the tiny model's vocabulary
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (Linux /proc)."""
    return read_cpu_stat(f"/proc/{pid}/stat")[1]


async def _one_stream(host: str, port: int, model: str, tokens: int, seed: int) -> tuple[int, int]:
    """One streaming completion read to its end: the data frames it carried, and the
    completion tokens its usage chunk counts."""
    rng = random.Random(seed)
    body = json.dumps(
        {
            "model": model,
            "prompt": [rng.randrange(5, PROMPT_ID_LIMIT) for _ in range(PROMPT_TOKENS)],
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    data = b""
    while b"data: [DONE]" not in data:
        chunk = await reader.read(1 << 16)
        if not chunk:
            break
        data += chunk
    writer.close()
    usage = _COMPLETION_TOKENS.findall(data)
    return data.count(b'data: {"') - 1, int(usage[-1]) if usage else 0  # less the usage chunk


async def _run(url: str, model: str, streams: int, tokens: int, seed: int) -> tuple[int, int]:
    """Frames and completion tokens of `streams` completions run at once."""
    host, port = url.split("://", 1)[-1].rsplit(":", 1)
    counts = await asyncio.gather(
        *(_one_stream(host, int(port), model, tokens, seed * 100_000 + i) for i in range(streams))
    )
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def measure(router: ManagedProcess, model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    url = router.address
    asyncio.run(_run(url, model, args.streams, args.tokens, seed=0))  # warm-up
    runs = []
    for index in range(1, args.runs + 1):
        cpu, started = cpu_seconds(router.pid), time.monotonic()
        frames, tokens = asyncio.run(_run(url, model, args.streams, args.tokens, seed=index))
        wall_s = time.monotonic() - started
        cpu_s = cpu_seconds(router.pid) - cpu
        runs.append(
            {
                "frames": frames,
                "tokens": tokens,
                "wall_s": wall_s,
                "router_cpu_s": cpu_s,
                "router_cpu_us_per_token": cpu_s / max(1, tokens) * 1e6,
            }
        )
        logger.info("run %d: %s", index, runs[-1])
    return runs


def start_cluster(stack: ExitStack, model: str, router_args: list[str]) -> ManagedProcess:
    redis = RedisServer()
    redis.start()
    stack.callback(redis.stop)
    node = ManagedProcess.splitserve(
        "decode", "decode", "--model", model, "--redis", redis.url, "--device", "cpu",
        "--max-num-seqs", "256", "--no-prefix-caching",
    ).start()  # fmt: skip
    stack.callback(node.stop)
    router = ManagedProcess.splitserve(
        "router", "router", "--redis", redis.url, "--port", "0", "--model", model,
        "--tokenizer", model, *router_args,
    ).start()  # fmt: skip
    stack.callback(router.stop)
    return router


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=115, help="concurrent completions")
    parser.add_argument("--tokens", type=int, default=256, help="output tokens of each")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", help="model directory (default: the built-in tiny model)")
    parser.add_argument(
        "--router-arg", action="append", default=[], help="extra router flag (repeatable)"
    )
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    if min(args.streams, args.tokens, args.runs) < 1:
        parser.error("--streams, --tokens and --runs must be >= 1")
    if not Path("/proc/self/stat").exists():
        parser.error("reads CPU times from /proc: Linux only")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.model is None:
        from splitserve.launch.up_cmd import tiny_model_dir

        args.model = str(tiny_model_dir())
    with ExitStack() as stack:
        router = start_cluster(stack, args.model, args.router_arg)
        runs = measure(router, args.model, args)
    per_token = statistics.median(r["router_cpu_us_per_token"] for r in runs)
    result = {
        **provenance("cpu"),
        "streams": args.streams,
        "tokens": args.tokens,
        "router_args": args.router_arg,
        "runs": runs,
        "router_cpu_us_per_token_median": per_token,
    }
    logger.info("router CPU per streamed token: %.1f us (median of %d runs)", per_token, len(runs))
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
