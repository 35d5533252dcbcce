"""KV transfer micro-benchmark: one prompt's KV blocks pushed between two processes.

    python -m splitserve.benchmarks.kv_transfer --model-shape llama-3.1-8b --tokens 4096 \\
        --block-size 16 --chunks 1 --ids allocator --device cuda --reps 10 --out result.json

The sender (this process; cuda:0 with --device cuda) pushes the prompt's blocks into the
receiver's pool (a child process; cuda:1), split into --chunks pushes issued back to back,
as chunked prefill will. A request is done when the receiver has every chunk's
notification. Block ids come as the engine's allocator hands them out after churn
(`allocator`) or as a random permutation (`random`). The ceiling is measured in the same
run: a torch peer copy cuda:0 -> cuda:1 of the same bytes (GPU) or a one-process memcpy
(CPU). Bytes are verified (sha256 of source vs destination blocks, poison elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import random
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch

from splitserve.benchmarks.results_io import device_name, git_commit
from splitserve.engine.block_pool import BlockPool
from splitserve.kv_transfer import PushResult, TransferAgent, TransferConfig, encode_tag
from splitserve.kv_transfer.layout import coalesce_runs, split_runs
from splitserve.kv_transfer.peer_process import PeerProcess, PoolSpec, pool_digest

logger = logging.getLogger(__name__)

POISON = -3.0


class ModelShape(NamedTuple):
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str


MODEL_SHAPES = {
    "llama-3.1-8b": ModelShape(32, 8, 128, "bfloat16"),
    "llama-3.2-1b": ModelShape(16, 8, 64, "bfloat16"),
    "qwen2.5-7b": ModelShape(28, 4, 128, "bfloat16"),
    "llama-3.1-70b": ModelShape(80, 8, 128, "bfloat16"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    p.add_argument("--tokens", type=int, default=4096, help="prompt length in tokens")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunks", type=int, default=1, help="chunk pushes per request")
    p.add_argument("--ids", choices=("allocator", "random"), default="allocator")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0, help="layer count multiplier (CPU)")
    p.add_argument("--pool-factor", type=float, default=2.0, help="pool blocks / prompt blocks")
    p.add_argument("--progress-thread", choices=("auto", "on", "off"), default="auto")
    p.add_argument(
        "--max-desc-mib",
        type=float,
        default=0,
        help="split runs into descriptors of at most this many MiB (0: one descriptor per run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    if min(args.tokens, args.block_size, args.chunks, args.reps) < 1 or args.scale <= 0:
        p.error("--tokens, --block-size, --chunks, --reps must be >= 1 and --scale > 0")
    if args.pool_factor < 1:
        p.error("--pool-factor must be >= 1 (the pool must hold the prompt)")
    return args


def churned_allocation(num_blocks: int, n: int, rng: random.Random) -> list[int]:
    """Block ids for an n-block request after requests of random size came and went."""
    pool, live = BlockPool(num_blocks), list[list[int]]()
    for _ in range(200):
        if live and (rng.random() < 0.5 or pool.num_free_blocks < n):
            pool.free(reversed(live.pop(rng.randrange(len(live)))))
        size = rng.randint(1, max(1, n // 4))
        if pool.num_free_blocks - size >= n:
            live.append(pool.allocate(size))
    return pool.allocate(n)


def block_ids(kind: str, num_blocks: int, n: int, rng: random.Random) -> list[int]:
    if kind == "random":
        return rng.sample(range(num_blocks), n)
    return churned_allocation(num_blocks, n, rng)


def split_chunks(ids: list[int], num_chunks: int) -> list[list[int]]:
    bounds = [round(i * len(ids) / num_chunks) for i in range(num_chunks + 1)]
    return [ids[bounds[i] : bounds[i + 1]] for i in range(num_chunks)]


class Bench:
    def __init__(self, agent: TransferAgent, receiver: PeerProcess) -> None:
        self.agent, self.receiver = agent, receiver
        self.results: list[PushResult] = []
        # Per request: first push posted -> the sender saw every push complete.
        self.sender_seconds: list[float] = []

        self.num_expected = 0
        self.sender_done = 0.0

    def pump(self) -> None:
        self.results.extend(self.agent.poll())
        if self.num_expected and len(self.results) >= self.num_expected and not self.sender_done:
            self.sender_done = time.perf_counter()

    def one_request(self, rid: str, src: list[list[int]], dst: list[list[int]]) -> float:
        """Seconds from the first push to the receiver seeing every chunk."""
        peer = self.receiver.name
        self.receiver.call("expect", rid, pump=self.pump)
        self.results.clear()
        self.num_expected, self.sender_done = len(src), 0.0
        start = time.perf_counter()
        for i, (s, d) in enumerate(zip(src, dst, strict=True)):
            self.agent.push(peer, s, d, encode_tag(rid, i, i == len(src) - 1))
        arrival = self.receiver.wait_event(
            "arrival", lambda a: a.request_id == rid, pump=self.pump, timeout_s=120
        )
        elapsed = self.receiver.last_event_time - start
        while len(self.results) < len(src):
            self.pump()
        self.sender_seconds.append(self.sender_done - start)
        failed = [r for r in self.results if not r.ok]
        if not arrival.ok or failed:
            raise RuntimeError(f"transfer failed: {arrival.error or failed[0].error}")
        return elapsed


def measure_ceiling(num_bytes: int, device: str, reps: int) -> tuple[float, str]:
    """Best GB/s of a plain copy of `num_bytes`: peer copy cuda:0 -> cuda:1, or memcpy."""
    dev_src, dev_dst = ("cuda:0", "cuda:1") if device == "cuda" else ("cpu", "cpu")
    src = torch.empty(num_bytes, dtype=torch.uint8, device=dev_src).random_()
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=dev_dst)
    best = math.inf
    for _ in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize(dev_src)
            torch.cuda.synchronize(dev_dst)
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize(dev_dst)
            torch.cuda.synchronize(dev_src)
        best = min(best, time.perf_counter() - start)
    what = "torch peer copy cuda:0 -> cuda:1" if device == "cuda" else "torch memcpy, one process"
    return num_bytes / best / 1e9, what


def pair_device_name(device: str) -> str:
    """Sender and receiver devices."""
    if device == "cuda":
        return " -> ".join(torch.cuda.get_device_name(i) for i in (0, 1))
    return device_name("cpu")


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = MODEL_SHAPES[args.model_shape]
    num_layers = max(1, round(preset.num_layers * args.scale))
    n = math.ceil(args.tokens / args.block_size)
    num_blocks = math.ceil(n * args.pool_factor)
    shape = (num_blocks, num_layers, 2, args.block_size, preset.num_kv_heads, preset.head_dim)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("--device cuda needs two GPUs (sender cuda:0, receiver cuda:1)")
    rng = random.Random(args.seed)
    src, dst = (block_ids(args.ids, num_blocks, n, rng) for _ in range(2))
    src_chunks, dst_chunks = split_chunks(src, args.chunks), split_chunks(dst, args.chunks)
    thread = {"auto": None, "on": True, "off": False}[args.progress_thread]
    recv_dev, send_dev = ("cuda:1", "cuda:0") if args.device == "cuda" else ("cpu", "cpu")
    receiver = PeerProcess(
        TransferConfig("bench-recv", enable_progress_thread=thread, arrival_timeout_s=120),
        PoolSpec(shape, preset.dtype, recv_dev),
    )
    pool = _random_pool(shape, preset.dtype, send_dev, args.seed)
    config = TransferConfig(
        "bench-send",
        enable_progress_thread=thread,
        push_timeout_s=120,
        max_descriptor_bytes=int(args.max_desc_mib * (1 << 20)),
    )
    try:
        times, sender_times, verified, block_bytes = _measure(
            config, pool, receiver, (src, dst), (src_chunks, dst_chunks), args.reps
        )
    finally:
        receiver.close()
    num_bytes = n * block_bytes
    return {
        "command": _command(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": pair_device_name(args.device),
        "versions": _versions(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "pool": {
            "shape": list(shape),
            "dtype": preset.dtype,
            "block_bytes": block_bytes,
            "bytes_per_token": block_bytes // args.block_size,
        },
        "request": {
            "tokens": args.tokens,
            "blocks": n,
            "bytes": num_bytes,
            "descriptors": _num_descriptors(config, block_bytes, src_chunks, dst_chunks),
        },
        **_rates(
            num_bytes, times, sender_times, measure_ceiling(num_bytes, args.device, args.reps)
        ),
        "verified": verified,
    }


def _rates(
    num_bytes: int, times: list[float], sender_times: list[float], ceiling: tuple[float, str]
) -> dict[str, Any]:
    ceiling_gbps, ceiling_what = ceiling
    best_gbps = num_bytes / min(times) / 1e9
    return {
        "seconds": times,
        # First push posted -> every push reported done on the sender (no notification leg).
        "sender_seconds": sender_times,
        "sender_best_gbps": num_bytes / min(sender_times) / 1e9,
        "best_gbps": best_gbps,
        "median_gbps": num_bytes / statistics.median(times) / 1e9,
        "ceiling": {"what": ceiling_what, "gbps": ceiling_gbps},
        "achieved_over_ceiling": best_gbps / ceiling_gbps,
    }


def _random_pool(shape: tuple[int, ...], dtype: str, device: str, seed: int) -> torch.Tensor:
    pool = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    pool.view(torch.uint8).random_(generator=gen)
    return pool


def _command() -> str:
    return " ".join([sys.executable, "-m", "splitserve.benchmarks.kv_transfer", *sys.argv[1:]])


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nixl": metadata.version("nixl"),
    }


def _num_descriptors(
    config: TransferConfig,
    block_bytes: int,
    src_chunks: list[list[int]],
    dst_chunks: list[list[int]],
) -> int:
    max_blocks = config.max_descriptor_blocks(block_bytes)
    return sum(
        len(split_runs(coalesce_runs(s, d), max_blocks))
        for s, d in zip(src_chunks, dst_chunks, strict=True)
    )


def _measure(
    config: TransferConfig,
    pool: torch.Tensor,
    receiver: PeerProcess,
    ids: tuple[list[int], list[int]],
    chunks: tuple[list[list[int]], list[list[int]]],
    reps: int,
) -> tuple[list[float], list[float], bool, int]:
    """(seconds per request, sender seconds, verified, block bytes) of `reps` requests."""
    (src, dst), (src_chunks, dst_chunks) = ids, chunks
    with TransferAgent(config, pool) as agent:
        agent.connect(receiver.metadata, receiver.descriptor)
        bench = Bench(agent, receiver)
        receiver.call("poison", POISON, pump=bench.pump)
        bench.one_request("warmup", src_chunks, dst_chunks)
        times = [bench.one_request(f"rep{i}", src_chunks, dst_chunks) for i in range(reps)]
        verified = receiver.call("digest", dst, pump=bench.pump) == pool_digest(pool, src)
        untouched = receiver.call("untouched", dst, POISON, pump=bench.pump)
        return (
            times,
            bench.sender_seconds[1:],
            bool(verified and untouched),
            (agent.pool_descriptor.block_bytes),
        )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    result = run(parse_args(argv))
    req = result["request"]
    print(
        f"{req['tokens']} tokens = {req['blocks']} blocks, {req['bytes'] / 2**20:.1f} MiB, "
        f"{req['descriptors']} descriptors"
    )
    print(
        f"time per request: best {min(result['seconds']) * 1e3:.3f} ms, "
        f"median {statistics.median(result['seconds']) * 1e3:.3f} ms"
    )
    print(
        f"bandwidth: best {result['best_gbps']:.2f} GB/s, median {result['median_gbps']:.2f} "
        f"GB/s; ceiling ({result['ceiling']['what']}) {result['ceiling']['gbps']:.2f} GB/s "
        f"-> {100 * result['achieved_over_ceiling']:.1f}%; sender-side completion best "
        f"{result['sender_best_gbps']:.2f} GB/s"
    )
    print(f"bytes verified: {result['verified']}")
    if result["args"]["out"] is not None:
        Path(result["args"]["out"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
