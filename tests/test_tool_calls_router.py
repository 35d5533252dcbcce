"""Tool calling through the router over real HTTP with the official `openai` client, against a
scripted decode node (real gRPC, real redis-server) that replies with a model's own call
format: tool_choice "auto" read by --tool-call-parser hermes and llama3_json, streamed and
not; what the router sends for "required" and a named function; bad input as 400s.

The tiny models have random weights and never write a call themselves, so "auto" is tested
here with scripted replies; the grammar-enforced modes run on real nodes in
tests/test_structured_output_cluster.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from scripted_decode import ScriptedDecodeNode

from splitserve.launch.redis_server import RedisServer
from splitserve.protocol.messages import sampling_params_from_proto
from splitserve.router.config import RouterConfig
from splitserve.router.server import RouterServer
from splitserve.router.tokenizer import RouterTokenizer
from splitserve.router.tool_request import required_schema

MODEL = "tiny"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": {"type": "object", "properties": {}}}
ARGS = '{"city": "Paris", "unit": "celsius"}'
HERMES_REPLY = (
    "I will look it up.\n"
    f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)
LLAMA_REPLY = (
    f'<|python_tag|>{{"name": "get_weather", "parameters": {ARGS}}}; '
    '{"name": "get_time", "parameters": {}}'
)
MESSAGES = [{"role": "user", "content": "Weather and time in Paris?"}]


def router_config(redis_server: RedisServer, cluster: str, parser: str) -> RouterConfig:
    """A router in front of the scripted node, reading tool calls with `parser`."""
    return RouterConfig(
        redis_url=redis_server.url,
        tokenizer="unused",
        model=MODEL,
        cluster=cluster,
        port=0,
        node_cache_s=0.1,
        tool_call_parser=parser,
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> RouterTokenizer:
    return RouterTokenizer.load(str(tiny_llama))


@pytest.fixture(scope="module")
def cluster() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def node(
    redis_server: RedisServer, tokenizer: RouterTokenizer, cluster: str
) -> Iterator[ScriptedDecodeNode]:
    started = ScriptedDecodeNode(tokenizer, MODEL).start(redis_server.url, cluster)
    started.finish_after_reply = True
    yield started
    started.stop()


@pytest.fixture(scope="module")
def clients(
    redis_server: RedisServer, tokenizer: RouterTokenizer, cluster: str, node: ScriptedDecodeNode
) -> Iterator[dict[str, openai.OpenAI]]:
    """One router per --tool-call-parser ("" for none), all in front of `node`."""
    servers = {}
    for parser in ("", "hermes", "llama3_json"):
        config = router_config(redis_server, cluster, parser)
        servers[parser] = RouterServer(config, tokenizer=tokenizer, log_level="warning")
        servers[parser].start_in_thread()
    yield {
        p: openai.OpenAI(base_url=s.url + "/v1", api_key="any", max_retries=0)
        for p, s in servers.items()
    }
    for server in servers.values():
        server.stop_thread()


def reply_with(node: ScriptedDecodeNode, tokenizer: RouterTokenizer, text: str) -> None:
    node.reply_ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(node.reply_ids) == text


def streamed_calls(stream: Any) -> tuple[str, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish_reason) assembled from chat chunks."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            if call.index not in calls:
                assert call.id.startswith("call_") and call.type == "function"
                calls[call.index] = [call.function.name, ""]
            calls[call.index][1] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [tuple(c) for c in calls.values()], finish


def check_calls(calls: list[tuple[str, str]]) -> None:
    assert [name for name, _ in calls] == ["get_weather", "get_time"]
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize(
    ("parser", "reply", "content"),
    [
        ("hermes", HERMES_REPLY, "I will look it up."),
        ("llama3_json", LLAMA_REPLY, None),
    ],
)
def test_auto_reads_the_models_calls_whole_and_streamed(
    clients, node, tokenizer, parser, reply, content
) -> None:
    reply_with(node, tokenizer, reply)
    client = clients[parser]
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == content
    calls = choice.message.tool_calls
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert len({c.id for c in calls}) == len(calls)
    check_calls([(c.function.name, c.function.arguments) for c in calls])
    # The parser's markers are special tokens in real models: the node keeps them.
    params = sampling_params_from_proto(node.requests[-1].sampling_params)
    assert params.skip_special_tokens is False and params.grammar is None

    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="auto", stream=True
    )
    streamed_content, streamed, finish = streamed_calls(stream)
    assert finish == "tool_calls" and streamed_content == (content or "")
    check_calls(streamed)
    assert streamed == [(c.function.name, c.function.arguments) for c in calls]

    one = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, parallel_tool_calls=False
    )
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]


def test_auto_without_a_call_is_plain_content(clients, node, tokenizer) -> None:
    text = " the weather is fine {not a call} <tool"
    reply_with(node, tokenizer, text)
    for parser in ("hermes", "llama3_json"):
        out = clients[parser].chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
        assert out.choices[0].message.content == text
        assert not out.choices[0].message.tool_calls and out.choices[0].finish_reason == "stop"
        stream = clients[parser].chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True
        )
        assert streamed_calls(stream) == (text, [], "stop")


def test_required_and_named_send_the_calls_grammar(clients, node, tokenizer) -> None:
    client = clients[""]  # no parser needed: the grammar makes the output a call
    reply_with(node, tokenizer, ARGS)
    out = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
    call = out.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGS)
    grammar = sampling_params_from_proto(node.requests[-1].sampling_params).grammar
    assert grammar is not None and json.loads(grammar.source) == WEATHER_SCHEMA

    reply_with(node, tokenizer, f'[{{"name": "get_weather", "parameters": {ARGS}}}]')
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", stream=True
    )
    assert streamed_calls(stream) == ("", [("get_weather", ARGS)], "tool_calls")
    grammar = sampling_params_from_proto(node.requests[-1].sampling_params).grammar
    assert grammar is not None and json.loads(grammar.source) == required_schema(SCHEMAS, True)


def test_history_with_tool_calls_and_results_is_accepted(clients, node, tokenizer) -> None:
    reply_with(node, tokenizer, " it is sunny")
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ARGS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    ]
    out = clients["hermes"].chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    assert out.choices[0].message.content == " it is sunny"
    none = clients[""].chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none"
    )
    assert none.choices[0].finish_reason == "stop"


BAD_REQUESTS = [
    (
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
        "nope",
    ),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}
            ]
        },
        "tools.0.function.parameters",
        "'f'",
    ),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "tools"),
    (
        {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
        "tools.0.function.name",
        "bad name",
    ),
    ({"tool_choice": "auto"}, "tool_choice", "--tool-call-parser"),
    (
        {"tool_choice": "required", "response_format": {"type": "json_object"}},
        "tool_choice",
        "response_format",
    ),
    (
        {"messages": [{"role": "tool", "content": "x"}], "tool_choice": "none"},
        "messages.0.tool_call_id",
        "tool_call_id",
    ),
]


@pytest.mark.parametrize(("fields", "param", "named"), BAD_REQUESTS)
def test_bad_tool_requests_are_400s(clients, node, fields, param, named) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, **fields}
    num_requests = len(node.requests)
    with pytest.raises(openai.BadRequestError) as info:
        clients[""].chat.completions.create(**body)
    error = info.value.body
    assert error["param"] == param and named in error["message"]
    assert error["type"] == "invalid_request_error"
    assert len(node.requests) == num_requests  # refused before any node is asked


# A template that reads `tools` and renders call history the way Qwen's and Llama's do:
# arguments as an object (`tojson` of a string would show an escaped string instead).
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nTools:{% for t in tools %} {{ t.function.name }}: "
    "{{ t.function.description }};{% endfor %}{{ eos_token }}\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_tools_and_call_history_reach_the_chat_template(
    redis_server, tiny_llama, cluster, node, tokenizer
) -> None:
    templated = RouterTokenizer.load(str(tiny_llama))
    templated.hf.chat_template = TOOLS_TEMPLATE
    config = router_config(redis_server, cluster, "hermes")
    server = RouterServer(config, tokenizer=templated, log_level="warning").start_in_thread()
    try:
        history = [
            *MESSAGES,
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ARGS},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
        body = {"model": MODEL, "messages": history, "tools": TOOLS}
        prompt = httpx.post(server.url + "/tokenize", json=body, timeout=30).json()["tokens"]
        text = templated.decode(prompt, skip_special_tokens=False)
        assert "Tools: get_weather: Current weather in a city; get_time: ;" in text
        assert f'<tool_call>{{"name": "get_weather", "arguments": {ARGS}}}</tool_call>' in text
        assert "<|tool|>\nsunny" in text

        reply_with(node, tokenizer, " it is sunny")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="any", max_retries=0)
        client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
        assert list(node.requests[-1].prompt_token_ids) == prompt
        client.chat.completions.create(
            model=MODEL, messages=history, tools=TOOLS, tool_choice="none"
        )
        sent = templated.decode(list(node.requests[-1].prompt_token_ids), False)
        assert "Tools:" not in sent and "<|tool|>\nsunny" in sent
    finally:
        server.stop_thread()
