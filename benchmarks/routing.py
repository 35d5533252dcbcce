"""Routing-decision latency: the prefix-index lookup against a loopback redis-server.

    python -m splitserve.benchmarks.routing [--tokens 1024,8192] [--nodes 2,16] [--iters 300]

For each node count the benchmark fills a fresh cluster in Redis the way nodes would:
every node holds a shared system prompt, a few long documents up to a random depth, and
unrelated blocks of its own; one document is held in full by every node (the worst case,
where the walk never drops a candidate). For each prompt length it then times
`PrefixIndex.longest_prefixes` (key building, one EVALSHA, parsing) on prompts that are a
document prefix plus a fresh user suffix, and reports p50/p99 per case, plus the hashing
time of the prompt, the mean time Redis itself spent per lookup, and the round trip of a
bare PING as the floor. Target: p99 < 2 ms at 8k tokens and 16 nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import redis

from splitserve.benchmarks.arg_types import positive_ints
from splitserve.engine.hashing import BlockHash, hash_blocks, seed_hash
from splitserve.launch.redis_server import RedisServer
from splitserve.node.prefix_index import AsyncPrefixIndex, PrefixIndex
from splitserve.node.registry import (
    NodeCapacity,
    NodeRecord,
    NodeRegistry,
    async_redis_client,
    make_node_id,
    redis_client,
)

BLOCK_SIZE = 16
SYSTEM_TOKENS = 512
DOC_TOKENS = 32768
NUM_DOCS = 8  # partially held documents; document 0 is held in full by every node
DOCS_PER_NODE = 3
NOISE_BLOCKS_PER_NODE = 1000
SUFFIX_TOKENS = 256
SEED = seed_hash("bench-model", BLOCK_SIZE)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(128_000) for _ in range(n)]


def _populate(index: PrefixIndex, registry: NodeRegistry, num_nodes: int, rng: random.Random):
    """Register `num_nodes` nodes and publish their caches; returns the documents' tokens."""
    system = _tokens(rng, SYSTEM_TOKENS)
    docs = [system + _tokens(rng, DOC_TOKENS - SYSTEM_TOKENS) for _ in range(NUM_DOCS + 1)]
    doc_hashes = [hash_blocks(d, BLOCK_SIZE, SEED) for d in docs]
    for port in range(num_nodes):
        record = NodeRecord(
            node_id=make_node_id("decode", "10.0.0.1", 9000 + port),
            role="decode",
            grpc_address=f"10.0.0.1:{9000 + port}",
            nixl_agent_name=f"agent-{port}",
            model="bench-model",
            block_size=BLOCK_SIZE,
            capacity=NodeCapacity(num_kv_blocks=100_000, max_num_seqs=256),
        )
        registry.register(record)
        held: set[BlockHash] = set(doc_hashes[0])
        for d in rng.sample(range(1, NUM_DOCS + 1), DOCS_PER_NODE):
            depth = int(len(doc_hashes[d]) * rng.uniform(0.05, 1.0))
            held.update(doc_hashes[d][:depth])
        held.update(BlockHash(rng.getrandbits(128)) for _ in range(NOISE_BLOCKS_PER_NODE))
        index.publish(record.node_id, stored=list(held), removed=[])
    return docs


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _queries(docs: list[list[int]], num_tokens: int, rng: random.Random, worst: bool, n: int):
    out = []
    for _ in range(n):
        doc = docs[0] if worst else docs[rng.randrange(1, len(docs))]
        prompt = doc[: num_tokens - SUFFIX_TOKENS] + _tokens(rng, SUFFIX_TOKENS)
        out.append(prompt)
    return out


def _time_case(index: PrefixIndex, prompts: list[list[int]], warmup: int) -> dict[str, float]:
    lookup_ms, hash_ms, decision_ms = [], [], []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        hashes = hash_blocks(prompt, BLOCK_SIZE, SEED)
        t1 = time.perf_counter()
        index.longest_prefixes(hashes)
        t2 = time.perf_counter()
        if i >= warmup:
            hash_ms.append((t1 - t0) * 1e3)
            lookup_ms.append((t2 - t1) * 1e3)
            decision_ms.append((t2 - t0) * 1e3)
    return {
        "p50_ms": _percentile(lookup_ms, 0.50),
        "p99_ms": _percentile(lookup_ms, 0.99),
        "mean_ms": statistics.fmean(lookup_ms),
        "hash_p50_ms": _percentile(hash_ms, 0.50),
        # The whole decision input: hash the prompt's blocks, then the one Redis round trip.
        "decision_p50_ms": _percentile(decision_ms, 0.50),
        "decision_p99_ms": _percentile(decision_ms, 0.99),
    }


async def _time_async(url: str, cluster: str, prompts: list[list[int]]) -> dict[str, float]:
    client = async_redis_client(url)
    index = AsyncPrefixIndex(client, cluster)
    all_hashes = [hash_blocks(p, BLOCK_SIZE, SEED) for p in prompts]
    samples = []
    for i, hashes in enumerate(all_hashes):
        t0 = time.perf_counter()
        await index.longest_prefixes(hashes)
        if i >= 20:
            samples.append((time.perf_counter() - t0) * 1e3)
    await client.aclose()
    return {"async_p50_ms": _percentile(samples, 0.5), "async_p99_ms": _percentile(samples, 0.99)}


def _drop_cluster(client: redis.Redis, cluster: str) -> None:
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"splitserve:{cluster}:*", count=10_000):
        batch.append(key)
        if len(batch) == 1000:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


def _server_mean_ms(client: redis.Redis) -> float:
    """Mean time Redis itself spent per lookup script call (INFO commandstats)."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("usec_per_call", 0.0)) / 1e3


def _ping_p50_ms(index: PrefixIndex) -> float:
    samples = []
    for _ in range(300):
        t0 = time.perf_counter()
        index.client.ping()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _percentile(samples, 0.5)


def run_benchmark(args: argparse.Namespace, url: str) -> dict[str, Any]:
    client = redis_client(url, timeout_s=10.0)
    load_at_start = os.getloadavg()[0]  # the host's other work shows in the p99s
    rng = random.Random(0)
    cases = []
    for num_nodes in args.nodes:
        cluster = f"bench{num_nodes}"
        index, registry = PrefixIndex(client, cluster), NodeRegistry(client, cluster, ttl_s=3600)
        docs = _populate(index, registry, num_nodes, rng)
        for num_tokens in args.tokens:
            for worst in (False, True):
                prompts = _queries(docs, num_tokens, rng, worst, args.iters + args.warmup)
                client.config_resetstat()
                case: dict[str, Any] = {
                    "num_nodes": num_nodes,
                    "num_tokens": num_tokens,
                    "num_blocks": num_tokens // BLOCK_SIZE,
                    "scenario": "all_nodes_hold_prefix" if worst else "mixed_prefixes",
                    **_time_case(index, prompts, args.warmup),
                    "server_mean_ms": _server_mean_ms(client),
                }
                if (num_nodes, num_tokens) == (16, 8192):
                    case.update(asyncio.run(_time_async(url, cluster, prompts)))
                cases.append(case)
                _print_case(case)
        _drop_cluster(client, cluster)
    info = client.info("server")
    return {
        "benchmark": "routing",
        "command": " ".join(["python -m splitserve.benchmarks.routing", *args.argv]),
        "redis_version": info["redis_version"],
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "load_average_1m": [load_at_start, os.getloadavg()[0]],  # at start, at end
        "block_size": BLOCK_SIZE,
        "iters_per_case": args.iters,
        "ping_p50_ms": _ping_p50_ms(index),
        "cases": cases,
    }


def _print_case(case: dict[str, Any]) -> None:
    extra = f"  async p99 {case['async_p99_ms']:.3f}" if "async_p99_ms" in case else ""
    print(
        f"{case['num_nodes']:>3} nodes {case['num_tokens']:>6} tok {case['scenario']:<22} "
        f"p50 {case['p50_ms']:.3f} ms  p99 {case['p99_ms']:.3f} ms  "
        f"(in Redis {case['server_mean_ms']:.3f} ms, hash p50 {case['hash_p50_ms']:.3f} ms; "
        f"hash + lookup p99 {case['decision_p99_ms']:.3f} ms){extra}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=positive_ints, default=[1024, 2048, 4096, 8192, 16384, 32768]
    )
    parser.add_argument("--nodes", type=positive_ints, default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--redis", help="use this Redis instead of starting one")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/routing.json"))
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    if any(t <= SUFFIX_TOKENS or t > DOC_TOKENS for t in args.tokens):
        raise ValueError(f"--tokens must lie in ({SUFFIX_TOKENS}, {DOC_TOKENS}]")
    logging.basicConfig(level=logging.WARNING)
    if args.redis:
        result = run_benchmark(args, args.redis)
    else:
        with RedisServer() as server:
            result = run_benchmark(args, server.url)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
