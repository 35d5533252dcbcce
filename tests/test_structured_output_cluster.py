"""Structured output through a 1P1D cluster (`LocalCluster`, what `splitserve up` runs: Redis,
router, one prefill and one decode node as processes, real gRPC and NIXL, the tiny llama on
CPU) with the official `openai` client: every output parses and validates, greedy outputs
equal the aggregated engine's, an unsatisfiable grammar ends on "length" and leaks nothing,
a bad schema is a 400; forced tool calls (tool_choice "required" and a named function)
validate, streamed and not, and equal the aggregated engine's at temperature 0; "auto"
(router --tool-call-parser hermes) on a model that writes no call returns content;
logit_bias reaches the first token, which the prefill node samples."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from structured_schemas import SCHEMAS

from splitserve.engine.sampling_params import GrammarSpec, SamplingParams
from splitserve.launch.local_cluster import ClusterConfig, LocalCluster, NodeProcess
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc
from splitserve.protocol.messages import sampling_params_to_proto

# Real node processes: `-m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

MODEL = "tiny"
MAX_TOKENS = 96
NUM_PER_SCHEMA = 20


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    config = ClusterConfig(
        model=str(tiny_llama),
        served_model_name=MODEL,
        num_prefill=1,
        num_decode=1,
        router_port=0,
        node_args=("--dtype", "float32", "--num-blocks", "1024"),
        # Every prompt is prefilled on the prefill node, however short.
        router_args=("--disagg-min-tokens", "0", "--tool-call-parser", "hermes"),
    )
    with LocalCluster(config) as running:
        yield running


def async_client(cluster: LocalCluster) -> openai.AsyncOpenAI:
    """A client for one event loop (each test runs its own)."""
    return openai.AsyncOpenAI(
        base_url=f"{cluster.router_url}/v1", api_key="unused", max_retries=0, timeout=180
    )


def node_stats(node: NodeProcess) -> pb.StatsResponse:
    stub_cls = node_pb2_grpc.PrefillStub if node.role == "prefill" else node_pb2_grpc.DecodeStub
    with grpc.insecure_channel(node.address) as channel:
        return stub_cls(channel).Stats(pb.StatsRequest(), timeout=10)


def wait_idle(nodes: list[NodeProcess], timeout_s: float = 30.0) -> list[pb.StatsResponse]:
    """The nodes' stats once no block is owned by a request (or at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [node_stats(n) for n in nodes]
        busy = any(s.kv_usage > 0 or s.num_running or s.num_waiting for s in stats)
        if not busy or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


async def one_request(client: openai.AsyncOpenAI, schema: dict, i: int) -> tuple[str, str]:
    """(text, finish_reason) of request i for `schema`: chat with response_format (some
    streamed), plain completions with vLLM's guided_json or structured_outputs."""
    content = f"Reply with a JSON record, variant {i}."
    if i % 2 == 0:
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": "r", "schema": schema, "strict": True},
        }
        kwargs = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0.8, response_format=fmt)
        messages = [{"role": "user", "content": content}]
        if i % 4 == 0:
            stream = await client.chat.completions.create(messages=messages, stream=True, **kwargs)
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].choices[0].finish_reason
        reply = await client.chat.completions.create(messages=messages, **kwargs)
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason
    completion = await client.completions.create(
        model=MODEL,
        prompt=content,
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        extra_body={"guided_json": schema}
        if i % 4 == 1
        else {"structured_outputs": {"json": schema}},
    )
    return completion.choices[0].text, completion.choices[0].finish_reason


def first_token_id(decode: NodeProcess, rid: str, prompt: list[int], params) -> int:
    """The first token id Decode.Generate samples with no prefill node (aggregated)."""
    request = pb.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, sampling_params=sampling_params_to_proto(params)
    )
    with grpc.insecure_channel(decode.address) as channel:
        for message in node_pb2_grpc.DecodeStub(channel).Generate(request, timeout=120):
            for delta in message.deltas:
                if delta.token_ids:
                    return delta.token_ids[0]
    raise AssertionError(f"{rid}: no token came back")


def test_200_requests_over_10_schemas_all_validate(cluster) -> None:
    prefill, decode = cluster.prefill[0], cluster.decode[0]
    before = [node_stats(prefill), node_stats(decode)]

    async def run() -> list[tuple[str, str]]:
        aclient = async_client(cluster)
        jobs = [one_request(aclient, s, i) for s in SCHEMAS for i in range(NUM_PER_SCHEMA)]
        return await asyncio.gather(*jobs)

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    failures = []
    for k, (text, finish) in enumerate(results):
        schema = SCHEMAS[k // NUM_PER_SCHEMA]
        try:
            assert finish == "stop"
            jsonschema.validate(json.loads(text), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append((k, text, finish, exc))
    assert not failures, failures[:3]
    after = wait_idle([prefill, decode])
    # The prompts were prefilled remotely: computed on the prefill node, received by decode.
    assert after[0].prompt_tokens_computed > before[0].prompt_tokens_computed
    assert after[1].prompt_tokens_received > before[1].prompt_tokens_received
    print(f"200 constrained requests through 1P1D in {elapsed:.1f} s")


def aggregated_output(decode: NodeProcess, rid: str, prompt: list[int], params) -> tuple[str, int]:
    """(text, number of tokens) of Decode.Generate with no prefill node: the decode node
    computes the prompt itself, as an aggregated node (0P1D) does."""
    request = pb.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, sampling_params=sampling_params_to_proto(params)
    )
    text, num_tokens = "", 0
    with grpc.insecure_channel(decode.address) as channel:
        for message in node_pb2_grpc.DecodeStub(channel).Generate(request, timeout=120):
            for delta in message.deltas:
                text += delta.text
                num_tokens += len(delta.token_ids)
    return text, num_tokens


def test_greedy_1p1d_equals_aggregated(cluster) -> None:
    prompts = [[17 + 3 * i, 40, 41, 42, 200 + i, 7, 9, 300] for i in range(len(SCHEMAS))]

    async def run() -> list:
        aclient = async_client(cluster)
        return await asyncio.gather(
            *[
                aclient.completions.create(
                    model=MODEL,
                    prompt=prompt,
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    extra_body={"guided_json": schema},
                )
                for prompt, schema in zip(prompts, SCHEMAS, strict=True)
            ]
        )

    before = node_stats(cluster.prefill[0]).prompt_tokens_computed
    replies = asyncio.run(run())
    assert node_stats(cluster.prefill[0]).prompt_tokens_computed > before
    params = [
        SamplingParams(
            temperature=0, max_tokens=MAX_TOKENS, grammar=GrammarSpec("json", json.dumps(s))
        )
        for s in SCHEMAS
    ]
    decode = cluster.decode[0]
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        jobs = [
            pool.submit(aggregated_output, decode, f"agg-{i}", prompt, p)
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
        ]
        aggregated = [job.result() for job in jobs]
    for i, reply in enumerate(replies):
        choice = reply.choices[0]
        assert (choice.text, reply.usage.completion_tokens) == aggregated[i]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), SCHEMAS[i])


def test_unsatisfiable_grammar_ends_on_length_and_bad_schema_is_400(cluster) -> None:
    prefill, decode = cluster.prefill[0], cluster.decode[0]
    start = wait_idle([prefill, decode])

    async def run() -> list:
        aclient = async_client(cluster)
        return await asyncio.gather(
            *[
                aclient.completions.create(
                    model=MODEL,
                    prompt=f"Spell a very long word, take {i}",
                    max_tokens=8,
                    temperature=0.8,
                    extra_body={"guided_regex": "[a-z]{200}"},
                )
                for i in range(4)
            ]
        )

    for reply in asyncio.run(run()):
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 8
    end = wait_idle([prefill, decode])
    for s0, s1 in zip(start, end, strict=True):
        # Free blocks (cached ones included) back at the start value: every block.
        assert s1.num_blocks_free == s0.num_blocks_free == s0.num_blocks_total
        assert s1.kv_usage == 0.0 and s1.num_running == 0

    async def bad() -> None:
        await async_client(cluster).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "objectx"}},
            },
        )

    with pytest.raises(openai.BadRequestError) as info:
        asyncio.run(bad())
    assert "objectx" in str(info.value)


TOOL_SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city", "unit", "days"],
    },
    "book_table": {
        "type": "object",
        "properties": {
            "people": {"type": "integer", "minimum": 1, "maximum": 8},
            "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
            "outdoor": {"type": "boolean"},
        },
        "required": ["people", "time"],
    },
}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": name, "parameters": schema}}
    for name, schema in TOOL_SCHEMAS.items()
]
NAMED = {"type": "function", "function": {"name": "book_table"}}
TOOL_MAX_TOKENS = 160


async def tool_request(
    client: openai.AsyncOpenAI, i: int, tool_choice: Any, stream: bool, **kwargs: Any
) -> tuple[list[tuple[str, str]], str]:
    """([(name, arguments)], finish_reason) of chat request i with tools."""
    body = dict(
        model=MODEL,
        messages=[{"role": "user", "content": f"Plan my evening, take {i}."}],
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=TOOL_MAX_TOKENS,
        **kwargs,
    )
    if not stream:
        reply = await client.chat.completions.create(**body)
        choice = reply.choices[0]
        assert choice.message.content is None, choice.message.content
        calls = choice.message.tool_calls or []
        return [(c.function.name, c.function.arguments) for c in calls], choice.finish_reason
    calls: dict[int, list[str]] = {}
    finish = ""
    async for chunk in await client.chat.completions.create(stream=True, **body):
        delta = chunk.choices[0].delta
        assert not delta.content
        for call in delta.tool_calls or []:
            if call.index not in calls:
                assert call.id.startswith("call_") and call.function.name
                calls[call.index] = [call.function.name, ""]
            calls[call.index][1] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [(name, args) for name, args in calls.values()], finish


def test_required_and_named_tool_calls_validate(cluster) -> None:
    """Forced calls at temperature 0.8, streamed and not: every call's arguments parse and
    validate against its tool's schema."""

    async def run() -> list[tuple[list[tuple[str, str]], str]]:
        aclient = async_client(cluster)
        jobs = [
            tool_request(aclient, i, choice, stream=i % 2 == 1, temperature=0.8, **extra)
            for i in range(8)
            for choice, extra in ((NAMED, {}), ("required", {"parallel_tool_calls": False}))
        ]
        return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for k, (calls, finish) in enumerate(results):
        assert finish == "tool_calls", (k, calls, finish)
        assert len(calls) == 1
        name, arguments = calls[0]
        if k % 2 == 0:
            assert name == "book_table"
        jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])


def test_greedy_tool_calls_1p1d_equal_aggregated(cluster) -> None:
    """At temperature 0, a forced call through 1P1D is the aggregated node's output under
    the same grammar, token for token."""
    from splitserve.router.tool_request import required_schema

    # One call: with parallel calls the greedy tiny model keeps adding calls to max_tokens.
    cases = [
        (NAMED, TOOL_SCHEMAS["book_table"]),
        ("required", required_schema(TOOL_SCHEMAS, parallel=False)),
    ]

    async def run() -> list:
        aclient = async_client(cluster)
        return await asyncio.gather(
            *[
                tool_request(
                    aclient, 0, choice, stream=False, temperature=0, parallel_tool_calls=False
                )
                for choice, _ in cases
            ]
        )

    before = node_stats(cluster.prefill[0]).prompt_tokens_computed
    results = asyncio.run(run())
    assert node_stats(cluster.prefill[0]).prompt_tokens_computed > before  # prefilled remotely
    messages = [{"role": "user", "content": "Plan my evening, take 0."}]
    body = {"model": MODEL, "messages": messages, "tools": TOOLS}
    prompt = httpx.post(f"{cluster.router_url}/tokenize", json=body, timeout=30).json()["tokens"]
    for k, ((calls, finish), (_, schema)) in enumerate(zip(results, cases, strict=True)):
        params = SamplingParams(
            temperature=0,
            max_tokens=TOOL_MAX_TOKENS,
            grammar=GrammarSpec("json", json.dumps(schema)),
        )
        text, _ = aggregated_output(cluster.decode[0], f"agg-tool-{k}", prompt, params)
        assert finish == "tool_calls"
        if k == 0:
            assert calls == [("book_table", text)]
        else:
            expected = [(c["name"], c["parameters"]) for c in json.loads(text)]
            assert [(name, json.loads(args)) for name, args in calls] == expected


def test_auto_tool_choice_on_a_model_that_writes_no_calls(cluster) -> None:
    """The tiny model never writes a <tool_call> tag: "auto" through 1P1D returns its text
    as content, whole and streamed, and the same text either way at temperature 0."""
    body = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Any tool?"}],
        tools=TOOLS,
        max_tokens=24,
        temperature=0,
    )

    async def run() -> tuple[Any, str]:
        aclient = async_client(cluster)
        reply = await aclient.chat.completions.create(**body)
        chunks = [c async for c in await aclient.chat.completions.create(stream=True, **body)]
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        return reply, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    reply, streamed = asyncio.run(run())
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert choice.message.content == streamed and "<tool_call>" not in streamed


def test_logit_bias_reaches_the_prefill_nodes_first_token(cluster) -> None:
    """logit_bias through 1P1D: +100 on one token makes every sampled token that one, the
    first included (sampled on the prefill node); -100 on the greedy choice moves it."""
    client = openai.OpenAI(
        base_url=f"{cluster.router_url}/v1", api_key="unused", max_retries=0, timeout=120
    )
    forced, prompt = 300, "The harbour at dawn"

    def text_of(token_ids: list[int]) -> str:
        body = {"model": MODEL, "tokens": token_ids}
        return httpx.post(f"{cluster.router_url}/detokenize", json=body, timeout=30).json()[
            "prompt"
        ]

    before = node_stats(cluster.prefill[0]).prompt_tokens_computed
    out = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        temperature=0.8,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert node_stats(cluster.prefill[0]).prompt_tokens_computed > before  # prefilled remotely
    assert out.choices[0].text == text_of([forced] * 6)
    body = {"model": MODEL, "prompt": prompt}
    ids = httpx.post(f"{cluster.router_url}/tokenize", json=body, timeout=30).json()["tokens"]
    greedy = SamplingParams(temperature=0, max_tokens=1)
    first_id = first_token_id(cluster.decode[0], "bias-greedy", ids, greedy)
    moved = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logit_bias={str(first_id): -100}
    )
    assert moved.choices[0].text != text_of([first_id])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=prompt, logit_bias={"99999999": 1})
