"""What every tool parser returns, and the pieces the formats share.

A parser reads the whole output text of one choice, again after each new piece (streaming)
and once at the end (`is_final`); one parser instance reads one choice (its JsonScanner
resumes where the previous reading stopped). While the text arrives it returns the content that can
no longer turn into a call, and the calls as far as they arrived; at the end, the content
and the complete calls, or, when the output is not a well-formed call after all (cut short
by max_tokens, not the format, arguments that are not a JSON object), the whole text as
content and no call. `router/tool_stream.py` turns successive results into deltas.
"""

from __future__ import annotations

import json
from typing import NamedTuple, Protocol

from splitserve.router.tool_parsers.json_scan import WHITESPACE, JsonScanner, skip_ws


class ParsedCall(NamedTuple):
    name: str | None  # None until the whole name arrived
    arguments: str  # the arguments object's text as the model wrote it, so far
    is_complete: bool


# Stands for a call that can never complete (the text there is not a call object).
MALFORMED = ParsedCall(None, "", False)


class ParsedOutput(NamedTuple):
    content: str
    calls: list[ParsedCall]


class ToolParser(Protocol):
    # The format's markers are special tokens: the node must keep them in the text.
    keeps_special_tokens: bool

    def parse(self, text: str, is_final: bool) -> ParsedOutput: ...


class CallsScan(NamedTuple):
    calls: list[ParsedCall]
    end: int | None  # where the calls ended (the closer's end); None: still arriving
    is_invalid: bool


def read_call(
    scanner: JsonScanner, text: str, start: int, argument_keys: tuple[str, ...]
) -> tuple[ParsedCall, int | None, bool]:
    """(the call object at text[start] == '{', its end or None, whether it is malformed)."""
    scan = scanner.scan_object(text, start)
    name: str | None = None
    field = scan.fields.get("name")
    is_invalid = scan.is_invalid
    if field is not None and field.end is not None:
        value = _json_or_none(text[field.start : field.end])
        name = value if isinstance(value, str) else None
        is_invalid = is_invalid or name is None
    key = next((k for k in argument_keys if k in scan.fields), None)
    arguments, is_complete = "", False
    if key is not None:
        arg = scan.fields[key]
        arguments = text[arg.start : len(text) if arg.end is None else arg.end]
        is_complete = scan.end is not None and arg.end is not None and name is not None
    elif scan.end is not None:
        is_invalid = True  # a finished object without arguments is not a call
    return ParsedCall(name, arguments, is_complete), scan.end, is_invalid


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_calls(
    scanner: JsonScanner,
    text: str,
    start: int,
    argument_keys: tuple[str, ...],
    separator: str,
    closer: str,
) -> CallsScan:
    """Call objects from `start`, `separator` between them, until `closer` ("" for the end
    of the text)."""
    calls: list[ParsedCall] = []
    i = skip_ws(text, start)
    while i < len(text):
        if closer and text[i] == closer:
            return CallsScan(calls, i + 1, False)
        if text[i] != "{":
            return CallsScan(calls, None, True)
        call, end, is_invalid = read_call(scanner, text, i, argument_keys)
        calls.append(call)
        if end is None or is_invalid:
            return CallsScan(calls, None, is_invalid)
        i = skip_ws(text, end)
        if i < len(text) and text[i] == separator:
            i = skip_ws(text, i + 1)
        elif i < len(text) and not (closer and text[i] == closer):
            return CallsScan(calls, None, True)
    return CallsScan(calls, None if closer else len(text), False)


def final_output(content: str, calls: list[ParsedCall], text: str) -> ParsedOutput:
    """The end result: the calls when all are complete with object arguments, else the
    whole text as content."""
    if calls and all(c.is_complete and _is_object(c.arguments) for c in calls):
        return ParsedOutput(content, calls)
    return ParsedOutput(text, [])


def _is_object(text: str) -> bool:
    return isinstance(_json_or_none(text), dict)


def held_back(text: str, marker: str) -> str:
    """`text` less what may still become `marker` (a prefix of it at the end) and trailing
    whitespace: the content that is safe to send while more text arrives."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            text = text[:-k]
            break
    return text.rstrip(WHITESPACE)
