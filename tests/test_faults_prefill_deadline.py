"""A prefill node frozen (SIGSTOP) past its requests' Prefill deadline, then thawed: the
decode node prefills them itself, and the pushes the thawed node still had in it never
land in blocks given to other requests. Every request gets the engine's greedy tokens,
and no block is left held.

The decode node's Prefill calls end at their deadline while the frozen node is midway;
their blocks stay set aside until the node's Abort confirmed its pushes drained (or past
the deadline and a grace when it cannot answer), and the thawed node posts no push past
the deadline. Without either, the thawed node's late pushes overwrite the KV of requests
decoding here (wrong tokens in most rounds).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest
from test_nodes_e2e import generate, node_stats, wait_idle

from splitserve.engine.llm import LLM
from splitserve.engine.sampling_params import SamplingParams
from splitserve.launch.local_cluster import ClusterConfig, LocalCluster, NodeProcess

pytestmark = [pytest.mark.faults, pytest.mark.slow]

# Long enough that the requests the freeze touched are still decoding when it ends.
PARAMS = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
PREFILL_TIMEOUT_S = 1.0
FREEZE_S = 1.6  # past the deadline of every Prefill call in flight


async def freeze_midway(
    decode: NodeProcess, prefill: NodeProcess, prompts: list[list[int]], tag: str, at_s: float
) -> list[list[int]]:
    jobs = [
        asyncio.ensure_future(generate(decode, f"{tag}-{i}", p, prefill, PARAMS))
        for i, p in enumerate(prompts)
    ]
    await asyncio.sleep(at_s)
    os.kill(prefill.process.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(FREEZE_S)
    finally:
        os.kill(prefill.process.pid, signal.SIGCONT)
    return [tokens for tokens, _ in await asyncio.gather(*jobs)]


def test_late_pushes_of_a_thawed_prefill_node_corrupt_nothing(tiny_llama) -> None:
    rng = random.Random(1)
    llm = LLM(str(tiny_llama), dtype="float32")
    vocab = llm.engine.arch.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(200, 500))] for _ in range(60)]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]
    config = ClusterConfig(
        model=str(tiny_llama),
        num_prefill=1,
        num_decode=1,
        router_port=None,
        node_args=("--dtype", "float32", "--no-prefix-caching"),
        prefill_args=("--max-num-batched-tokens", "512", "--num-blocks", "3000"),
        decode_args=("--num-blocks", "2500", "--prefill-timeout-s", str(PREFILL_TIMEOUT_S)),
    )
    with LocalCluster(config) as cluster:
        decode, prefill = cluster.decode[0], cluster.prefill[0]
        for round_, at_s in enumerate((0.1, 0.3)):
            got = asyncio.run(freeze_midway(decode, prefill, prompts, f"r{round_}", at_s))
            wrong = [i for i, tokens in enumerate(got) if tokens != expected[i]]
            assert not wrong, f"round {round_}: requests {wrong} got other tokens"
        stats = asyncio.run(node_stats(decode))
        assert stats.num_prefill_fallbacks > 0  # the freeze did cut Prefill calls short
        # Set-aside blocks go once the node confirmed (or PUSH_GRACE_S past the deadline).
        for idle in asyncio.run(wait_idle([decode, prefill], timeout_s=20)):
            assert idle.kv_usage == 0.0 and idle.num_running == 0, idle
