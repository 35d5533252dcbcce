"""Disaggregated serving end to end on CPU: real redis-server, prefill and decode nodes as
separate processes, real gRPC and real NIXL transfers, the tiny llama model. The decode
nodes overlap their steps (`--overlap-output-processing`), as they do on a GPU."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import grpc
import pytest

from splitserve.engine.llm import LLM
from splitserve.engine.sampling_params import SamplingParams
from splitserve.launch.local_cluster import ClusterConfig, LocalCluster, NodeProcess
from splitserve.node.prefix_index import PrefixIndex
from splitserve.node.registry import NodeRegistry, redis_client
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc
from splitserve.protocol.messages import sampling_params_to_proto

# Real node processes (or two NIXL processes): `-m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

NUM_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
NODE_ARGS = ("--dtype", "float32", "--num-blocks", "400", "--prefill-timeout-s", "20")


def shared_prefix_prompts(num: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`num` prompts over 4 system prefixes (40 to 130 tokens) with distinct questions."""
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(40 + 30 * i)] for i in range(4)]
    return [
        systems[i % 4] + [rng.randrange(vocab) for _ in range(rng.randint(5, 90))]
        for i in range(num)
    ]


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    config = ClusterConfig(
        model=str(tiny_llama),
        num_prefill=2,
        num_decode=2,
        router_port=None,
        node_args=NODE_ARGS,
        prefill_args=("--max-num-batched-tokens", "48"),
        # What a decode node does on a GPU: each step launched before the last is read.
        decode_args=("--overlap-output-processing",),
    )
    with LocalCluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def reference(tiny_llama, hf_greedy):
    llm = LLM(str(tiny_llama), dtype="float32")
    prompts = shared_prefix_prompts(32, llm.engine.arch.vocab_size)
    engine_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert engine_tokens == hf_greedy(tiny_llama, prompts, NUM_NEW)
    return prompts, engine_tokens


async def generate(
    decode: NodeProcess,
    rid: str,
    prompt: list[int],
    prefill: NodeProcess | pb.NodeEndpoint | None,
    params: SamplingParams = GREEDY,
    cancel_after: int | None = None,
) -> tuple[list[int], pb.GenerateResponse | None]:
    """Tokens streamed by Decode.Generate and the final message (None when cancelled)."""
    request = pb.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, sampling_params=sampling_params_to_proto(params)
    )
    if isinstance(prefill, NodeProcess):
        prefill = pb.NodeEndpoint(node_id=prefill.node_id, grpc_address=prefill.address)
    if prefill is not None:
        request.prefill_node.CopyFrom(prefill)
    tokens: list[int] = []
    async with grpc.aio.insecure_channel(decode.address) as channel:
        call = node_pb2_grpc.DecodeStub(channel).Generate(request)
        async for message in call:
            for delta in message.deltas:
                tokens.extend(delta.token_ids)
            if cancel_after is not None and len(tokens) >= cancel_after:
                call.cancel()
                return tokens, None
            if message.finished:
                return tokens, message
    raise AssertionError(f"stream of {rid} ended without a final message")


async def node_stats(node: NodeProcess) -> pb.StatsResponse:
    async with grpc.aio.insecure_channel(node.address) as channel:
        stub_cls = node_pb2_grpc.PrefillStub if node.role == "prefill" else node_pb2_grpc.DecodeStub
        return await stub_cls(channel).Stats(pb.StatsRequest())


async def wait_idle(nodes: list[NodeProcess], timeout_s: float = 15.0) -> list[pb.StatsResponse]:
    """Poll until no node owns a KV block; returns the last stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [await node_stats(n) for n in nodes]
        if all(s.kv_usage == 0 and s.num_running == 0 for s in stats):
            return stats
        if time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


def test_32_concurrent_requests_prefilled_remotely_match_the_engine(cluster, reference) -> None:
    prompts, expected = reference
    decode, prefill = cluster.decode[0], cluster.prefill[0]

    async def run() -> tuple[list, pb.StatsResponse, pb.StatsResponse]:
        before = await node_stats(decode)
        results = await asyncio.gather(
            *(generate(decode, f"c{i}", p, prefill) for i, p in enumerate(prompts))
        )
        return results, before, await node_stats(decode)

    results, before, after = asyncio.run(run())
    assert [tokens for tokens, _ in results] == expected
    finals = [final for _, final in results]
    assert all(f is not None and f.metrics.is_prefill_remote for f in finals)
    assert all(f.usage.completion_tokens == NUM_NEW for f in finals)
    # The KV arrived by NIXL: the decode node computed none of these prompt tokens.
    assert after.prompt_tokens_computed == before.prompt_tokens_computed
    received = after.prompt_tokens_received - before.prompt_tokens_received
    assert 0 < received <= sum(len(p) for p in prompts)
    assert after.num_transfers_completed - before.num_transfers_completed == len(prompts)
    assert after.transfer_bytes_total > before.transfer_bytes_total


def test_two_by_two_every_pair(cluster, reference) -> None:
    prompts, expected = reference
    pairs = [(d, p) for d in cluster.decode for p in cluster.prefill]

    async def run() -> list[list[int]]:
        jobs = [
            generate(pairs[i % 4][0], f"pair{i}", prompt, pairs[i % 4][1])
            for i, prompt in enumerate(prompts[:16])
        ]
        return [tokens for tokens, _ in await asyncio.gather(*jobs)]

    assert asyncio.run(run()) == expected[:16]
    stats = asyncio.run(wait_idle([*cluster.decode, *cluster.prefill]))
    assert all(s.num_transfers_completed > 0 for s in stats)


def test_local_prefill_when_no_prefill_node_is_named(cluster, reference) -> None:
    prompts, expected = reference
    tokens, final = asyncio.run(generate(cluster.decode[1], "local0", prompts[5], None))
    assert tokens == expected[5]
    assert final is not None and not final.metrics.is_prefill_remote


def test_aborting_half_the_requests_frees_every_block(cluster) -> None:
    """Half the requests are cancelled: some while their KV is still being prefilled and
    pushed (a timer), others after a few tokens. Afterwards neither node owns a block."""
    rng = random.Random(1)
    decode, prefill = cluster.decode[0], cluster.prefill[1]
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = shared_prefix_prompts(20, 500, seed=7)

    async def cancelled_early(rid: str, prompt: list[int], delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(generate(decode, rid, prompt, prefill, long), delay_s)

    async def run() -> list[pb.StatsResponse]:
        jobs = []
        for i, prompt in enumerate(prompts):
            if i % 4 == 0:
                jobs.append(cancelled_early(f"ab{i}", prompt, rng.uniform(0.002, 0.05)))
            elif i % 4 == 2:
                cancel = rng.choice([1, 5, 30])
                jobs.append(generate(decode, f"ab{i}", prompt, prefill, long, cancel_after=cancel))
            else:
                jobs.append(generate(decode, f"ab{i}", prompt, prefill, long))
        results = await asyncio.gather(*jobs)
        finished = [r for r in results if r is not None and r[1] is not None]
        assert len(finished) == 10 and all(len(tokens) == 60 for tokens, _ in finished)
        return await wait_idle([decode, prefill])

    for stats in asyncio.run(run()):
        assert stats.kv_usage == 0.0, stats
        assert stats.num_running == 0 and stats.num_waiting == 0


def test_prefill_node_killed_mid_request_falls_back_to_local_prefill(cluster, reference) -> None:
    prompts, expected = reference
    # A 2-token step budget makes the victim's prefills take many steps, so the kill
    # lands while they are in flight.
    victim = cluster.start_node("prefill", 9, extra_args=("--max-num-batched-tokens", "2"))
    decode = cluster.decode[1]

    async def run() -> tuple[list[tuple[list[int], pb.GenerateResponse | None]], int]:
        before = (await node_stats(decode)).num_prefill_fallbacks
        jobs = [
            asyncio.ensure_future(generate(decode, f"kill{i}", p, victim))
            for i, p in enumerate(prompts[:6])
        ]
        await asyncio.sleep(0.3)
        victim.process.kill()
        results = await asyncio.gather(*jobs)
        return results, (await node_stats(decode)).num_prefill_fallbacks - before

    results, num_fallbacks = asyncio.run(run())
    assert [tokens for tokens, _ in results] == expected[:6]
    assert num_fallbacks > 0
    assert sum(bool(final and final.metrics.is_prefill_fallback) for _, final in results) > 0
    assert asyncio.run(wait_idle([decode]))[0].kv_usage == 0.0


class HeldPrefill(node_pb2_grpc.PrefillServicer):
    """A prefill node that pushes nothing: each Prefill waits for its request's Abort and
    then ends ABORTED, as a real node does once its pushes drained; it counts the Aborts."""

    def __init__(self) -> None:
        self.aborts: dict[str, int] = {}
        self._aborted: dict[str, asyncio.Event] = {}

    def _event(self, rid: str) -> asyncio.Event:
        return self._aborted.setdefault(rid, asyncio.Event())

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext):
        await asyncio.wait_for(self._event(request.request_id).wait(), 20)
        await context.abort(grpc.StatusCode.ABORTED, "aborted")

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext):
        for rid in request.request_ids:
            self.aborts[rid] = self.aborts.get(rid, 0) + 1
            self._event(rid).set()
        return pb.AbortResponse(num_aborted=len(request.request_ids))


def test_client_gone_during_remote_prefill_aborts_the_prefill_node_once(cluster) -> None:
    """The client leaves while the prefill node holds the request: the decode node forwards
    one Abort, and the Prefill RPC's ABORTED answer (given once the node's pushes drained)
    frees the request's blocks with no second Abort."""
    decode = cluster.decode[1]
    servicer = HeldPrefill()

    async def run() -> pb.StatsResponse:
        server = grpc.aio.server()
        node_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            held = pb.NodeEndpoint(node_id="held-prefill", grpc_address=f"127.0.0.1:{port}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(generate(decode, "gone", list(range(1, 200)), held), 0.5)
            return (await wait_idle([decode]))[0]
        finally:
            await server.stop(None)

    stats = asyncio.run(run())
    assert stats.kv_usage == 0.0 and stats.num_running == 0, stats
    assert servicer.aborts == {"gone": 1}


def test_redis_restart_nodes_reregister_and_republish(cluster, reference) -> None:
    prompts, _ = reference
    decode = cluster.decode[0]
    asyncio.run(generate(decode, "warm-redis", prompts[0], None))
    assert cluster.redis is not None
    cluster.redis.restart()
    client = redis_client(cluster.redis_url)
    registry = NodeRegistry(client, cluster.config.cluster)
    index = PrefixIndex(client, cluster.config.cluster)
    from splitserve.engine.hashing import hash_blocks, seed_hash

    hashes = hash_blocks(prompts[0], 16, seed_hash(cluster.config.model, 16))
    deadline = time.monotonic() + 15
    live: set[str] = set()
    held: dict = {}
    while time.monotonic() < deadline:
        live = {r.node_id for r in registry.list_live_nodes()}
        held = index.longest_prefixes(hashes)
        expected_nodes = {n.node_id for n in [*cluster.decode, *cluster.prefill]}
        if expected_nodes <= live and held.get(decode.node_id, 0) > 0:
            break
        time.sleep(0.3)
    assert {n.node_id for n in cluster.decode} <= live
    assert held.get(decode.node_id, 0) >= len(prompts[0]) // 16 - 1
