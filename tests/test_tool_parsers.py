"""Tool-call parsers on fixed texts, whole and streamed in arbitrary pieces: Llama 3 JSON,
Hermes, and the readers of forced calls ("required", a named function); what streams adds
up to the whole reading; the request side's schemas (router/tool_request.py)."""

from __future__ import annotations

import itertools
import json
import random
import time
from typing import Any

import jsonschema
import pytest

from splitserve.router.tool_parsers import TOOL_CALL_PARSERS, ToolParser
from splitserve.router.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser
from splitserve.router.tool_request import required_schema
from splitserve.router.tool_stream import ToolCallStream

WEATHER = '{"city": "Paris", "days": [1, 2], "note": "a } and a \\" inside"}'
HERMES_TWO = (
    "Let me look both up.\n"
    f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
)
LLAMA_TWO = (
    f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}; '
    '{"name": "get_time", "parameters": {"tz": "CET"}}'
)
TWO_CALLS = [("get_weather", WEATHER), ("get_time", '{"tz": "CET"}')]


def parser(name: str) -> ToolParser:
    return TOOL_CALL_PARSERS[name]()


def whole(p: ToolParser, text: str, max_calls: int | None = None) -> tuple[str | None, list]:
    content, calls = ToolCallStream(p, max_calls).final(text)
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def streamed(p: ToolParser, pieces: list[str], max_calls: int | None = None) -> tuple[str, list]:
    """What an OpenAI client assembles from the deltas of `pieces` (the last one finishes)."""
    stream = ToolCallStream(p, max_calls)
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        delta = stream.finish(piece) if i == len(pieces) - 1 else stream.feed(piece)
        content += delta.content
        for call in delta.tool_calls:
            index = call["index"]
            if index not in calls:
                # The first delta of a call has its id, type and whole name.
                assert call["id"].startswith("call_") and call["type"] == "function"
                assert index == len(calls)
                calls[index] = [call["function"]["name"], ""]
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
            calls[index][1] += call["function"]["arguments"]
    return content, [tuple(c) for c in calls.values()]


def splits(text: str, seed: int) -> list[list[str]]:
    """The text in one piece, one character at a time, and cut at random places."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(12, len(text) - 1)))
    bounds = [0, *cuts, len(text)]
    return [[text], list(text), [text[a:b] for a, b in itertools.pairwise(bounds)]]


CASES: list[tuple[str, str, str | None, list[tuple[str, str]]]] = [
    ("hermes", HERMES_TWO, "Let me look both up.", TWO_CALLS),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>', None, [("f", "{}")]),
    ("hermes", 'No call here, only <tool text and {"name": 1}.', None, []),
    ("llama3_json", LLAMA_TWO, None, TWO_CALLS),
    (
        "llama3_json",
        'Sure.<|python_tag|>{"name": "f", "arguments": {"a": 1}}',
        "Sure.",
        [("f", '{"a": 1}')],
    ),
    ("llama3_json", '  {"name": "f", "parameters": {"a": [1]}}', None, [("f", '{"a": [1]}')]),
    ("llama3_json", '{"answer": 42}', None, []),
    ("llama3_json", "Plain text that mentions <|python and braces {}.", None, []),
]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_parsers_whole_and_streamed_agree(name, text, content, calls) -> None:
    expected_content = content if calls else text
    assert whole(parser(name), text) == (expected_content, calls)
    for seed in range(3):
        for pieces in splits(text, seed):
            assert streamed(parser(name), pieces) == (expected_content or "", calls), pieces
    for args in (a for _, a in calls):
        json.loads(args)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("hermes", HERMES_TWO[: HERMES_TWO.index("CET")]),  # cut by max_tokens
        ("hermes", 'Text <tool_call>{"name": "f", "arguments": [1]}</tool_call>'),  # not an object
        ("hermes", "Text <tool_call>not json</tool_call>"),
        ("llama3_json", LLAMA_TWO + " trailing words"),
        ("llama3_json", '{"name": "f"}'),  # no arguments
        ("llama3_json", '{"name": "f", "parameters": {"a": 1'),
    ],
)
def test_a_malformed_or_unfinished_call_is_content(name, text) -> None:
    assert whole(parser(name), text) == (text, [])


def test_one_call_only_without_parallel_tool_calls() -> None:
    for name, text in (("hermes", HERMES_TWO), ("llama3_json", LLAMA_TWO)):
        assert whole(parser(name), text, max_calls=1)[1] == TWO_CALLS[:1]
        for pieces in splits(text, 7):
            assert streamed(parser(name), pieces, max_calls=1)[1] == TWO_CALLS[:1]


def test_parsers_that_need_special_tokens_say_so() -> None:
    assert all(p().keeps_special_tokens for p in TOOL_CALL_PARSERS.values())
    assert not NamedFunctionParser("f").keeps_special_tokens
    assert not RequiredCallsParser().keeps_special_tokens


def test_named_function_output_is_its_arguments() -> None:
    text = '{"city": "Oslo", "units": "metric"}'
    assert whole(NamedFunctionParser("get_weather"), text) == (None, [("get_weather", text)])
    for pieces in splits(text, 1):
        assert streamed(NamedFunctionParser("get_weather"), pieces) == ("", [("get_weather", text)])
    cut = text[:-3]
    assert whole(NamedFunctionParser("get_weather"), cut) == (cut, [])


def test_required_output_is_a_list_of_calls() -> None:
    text = (
        f'[{{"name": "get_weather", "parameters": {WEATHER}}}, '
        '{"name": "get_time", "parameters": {"tz": "CET"}}]'
    )
    assert whole(RequiredCallsParser(), text) == (None, TWO_CALLS)
    for seed in range(3):
        for pieces in splits(text, seed):
            assert streamed(RequiredCallsParser(), pieces) == ("", TWO_CALLS)
    assert whole(RequiredCallsParser(), text[:-1]) == (text[:-1], [])  # no closing bracket
    assert whole(RequiredCallsParser(), "[]") == ("[]", [])


def tools_schemas() -> dict[str, dict[str, Any]]:
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "array"}},
        "required": ["city"],
    }
    return {"get_weather": weather, "get_time": {"type": "object", "properties": {}}}


def test_required_schema_admits_exactly_calls_of_the_tools() -> None:
    schema = required_schema(tools_schemas(), parallel=True)
    jsonschema.validators.validator_for(schema).check_schema(schema)
    good = [
        {"name": "get_weather", "parameters": {"city": "Oslo"}},
        {"name": "get_time", "parameters": {}},
    ]
    jsonschema.validate(good, schema)
    for bad in (
        [],
        [{"name": "nope", "parameters": {}}],
        [{"name": "get_weather", "parameters": {}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, required_schema(tools_schemas(), parallel=False))


def test_a_long_call_streams_in_linear_time() -> None:
    """Each piece re-reads the text, but an open object is resumed where it stopped: a
    21k-character call in 4-character pieces takes a fraction of a second (re-scanning it
    from the start each time took seconds)."""
    items = [{"a": i, "b": 'q"w'} for i in range(300)]
    arguments = json.dumps({"code": "x = 1\n" * 2000, "items": items})
    text = f'Sure.\n<tool_call>{{"name": "f", "arguments": {arguments}}}</tool_call>'
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    started = time.perf_counter()
    assert streamed(parser("hermes"), pieces) == ("Sure.", [("f", arguments)])
    assert time.perf_counter() - started < 3.0
