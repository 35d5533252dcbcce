"""Cache-aware routing on a real cluster (2 prefill + 2 decode nodes, processes, Redis):
requests sharing long prefixes (several system prompts, multi-turn conversations) land
where their prefix is cached. Measured as the cluster's prefix-cache hit rate (1 - prompt
tokens computed on any node / prompt tokens sent), against the best possible for the
workload (a perfect, shared, unbounded cache) and against round-robin routing."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import httpx
import pytest

from splitserve.launch.local_cluster import ClusterConfig, LocalCluster, NodeProcess
from splitserve.launch.processes import ManagedProcess
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc

# Real node processes (or two NIXL processes): `-m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

BLOCK = 16
MODEL = "tiny"


def conversation_workload(vocab: int, seed: int) -> list[list[int]]:
    """4 system prompts of 320 tokens; 3 conversations each, 3 turns per conversation,
    each turn resending the history (question + reply) before a new question. Turns are
    interleaved across conversations, as concurrent users would send them."""
    rng = random.Random(seed)

    def words(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    systems = [words(320) for _ in range(4)]
    histories = [list(systems[s]) for s in range(4) for _ in range(3)]
    prompts = []
    for _ in range(3):
        order = list(range(len(histories)))
        rng.shuffle(order)
        for c in order:
            histories[c] += words(rng.randint(20, 40))  # the user's next question
            prompts.append(list(histories[c]))
            histories[c] += words(20)  # the assistant's reply, resent next turn
    return prompts


def best_possible_hit_rate(prompts: list[list[int]]) -> float:
    """Hit rate of a perfect shared cache of full blocks (the block holding the last
    prompt token is always recomputed, as in the engine)."""
    seen: set[tuple[int, ...]] = set()
    hits = total = 0
    for prompt in prompts:
        total += len(prompt)
        max_blocks = (len(prompt) - 1) // BLOCK
        for i in range(max_blocks):
            if tuple(prompt[: (i + 1) * BLOCK]) not in seen:
                break
            hits += BLOCK
        for i in range(len(prompt) // BLOCK):
            seen.add(tuple(prompt[: (i + 1) * BLOCK]))
    return hits / total


async def computed_tokens(nodes: list[NodeProcess]) -> int:
    total = 0
    for node in nodes:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = node_pb2_grpc.PrefillStub if node.role == "prefill" else node_pb2_grpc.DecodeStub
            total += (await stub(channel).Stats(pb.StatsRequest())).prompt_tokens_computed
    return total


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    config = ClusterConfig(
        model=str(tiny_llama),
        served_model_name=MODEL,
        num_prefill=2,
        num_decode=2,
        router_port=None,
        node_args=("--dtype", "float32", "--num-blocks", "2048"),
    )
    with LocalCluster(config) as running:
        yield running


def run_policy(cluster: LocalCluster, policy: str, prompts: list[list[int]]) -> float:
    router = ManagedProcess.splitserve(
        f"router-{policy}",
        "router",
        "--port",
        "0",
        "--redis",
        cluster.redis_url,
        "--model",
        MODEL,
        "--tokenizer",
        cluster.config.model,
        "--routing-policy",
        policy,
    ).start()
    nodes = [*cluster.prefill, *cluster.decode]
    try:
        url = f"http://{router.address}"
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json().get("num_prefill_nodes") != 2:
            assert time.monotonic() < deadline, "router did not see both prefill nodes"
            time.sleep(0.2)
        before = asyncio.run(computed_tokens(nodes))
        with httpx.Client(base_url=url, timeout=60) as client:
            for prompt in prompts:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
                assert client.post("/v1/completions", json=body).status_code == 200
                time.sleep(0.05)  # let the nodes' KV events reach Redis
        computed = asyncio.run(computed_tokens(nodes)) - before
    finally:
        router.stop()
    return 1 - computed / sum(len(p) for p in prompts)


def test_cache_aware_routing_reaches_the_best_possible_hit_rate(cluster) -> None:
    aware_prompts = conversation_workload(1024, seed=1)
    rr_prompts = conversation_workload(1024, seed=2)
    best_aware = best_possible_hit_rate(aware_prompts)
    best_rr = best_possible_hit_rate(rr_prompts)
    aware = run_policy(cluster, "cache_aware", aware_prompts)
    round_robin = run_policy(cluster, "round_robin", rr_prompts)
    print(
        f"hit rate: cache-aware {aware:.3f} (best {best_aware:.3f}), "
        f"round-robin {round_robin:.3f} (best {best_rr:.3f})"
    )
    assert aware >= 0.9 * best_aware
    # Clearly above round-robin: it recomputes (misses) far more of the prompts.
    assert aware > round_robin + 0.08
    assert (1 - round_robin) > 1.4 * (1 - aware)
