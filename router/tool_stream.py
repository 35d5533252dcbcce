"""One chat choice's output read as tool calls: OpenAI `delta.tool_calls` pieces while it
streams, and the final `message` fields.

`ResponseBuilder` (router/responses.py) makes one `ToolCallStream` per choice of a request
with a `ToolPlan`; streaming, it calls `feed(text)` with each new piece of the choice's text
and `finish()` on its last delta, and sends what they return; not streaming, it calls
`final(text)` once. The parser (router/tool_parsers) reads the whole text each time; this
module sends what is new since the last time:

- content: the part of the parser's content not sent yet;
- a call, once its whole name arrived: `{"index", "id": "call_...", "type": "function",
  "function": {"name", "arguments": ""}}`, then `{"index", "function": {"arguments": piece}}`
  as its arguments grow. The pieces add up to the final arguments text.

With parallel_tool_calls false only the first call is sent. A choice whose final text is no
well-formed call after calls were already streamed (cut short by max_tokens) sends no more.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from splitserve.router.tool_parsers import ParsedCall, ParsedOutput, ToolParser


def tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ChoiceDelta(NamedTuple):
    content: str
    tool_calls: list[dict[str, Any]]


@dataclass
class _SentCall:
    id: str
    num_argument_chars: int = 0


@dataclass
class ToolCallStream:
    parser: ToolParser
    max_num_calls: int | None  # None: every call (parallel_tool_calls)
    text: str = ""
    num_content_chars: int = 0
    sent: list[_SentCall] = field(default_factory=list)
    num_final_calls: int = 0  # calls in the final output (after finish or final)

    def feed(self, piece: str) -> ChoiceDelta:
        self.text += piece
        return self._delta(self.parser.parse(self.text, is_final=False))

    def finish(self, piece: str) -> ChoiceDelta:
        """The last piece: sends what the final reading adds."""
        self.text += piece
        out = self._limit(self.parser.parse(self.text, is_final=True))
        self.num_final_calls = len(out.calls)
        if not out.calls and self.sent:
            return ChoiceDelta("", [])
        return self._delta(out)

    def final(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content or None, tool_calls) of the whole output `text` (not streamed)."""
        out = self._limit(self.parser.parse(text, is_final=True))
        self.num_final_calls = len(out.calls)
        calls = [_call_json(tool_call_id(), call) for call in out.calls]
        return out.content or None, calls

    def _limit(self, out: ParsedOutput) -> ParsedOutput:
        if self.max_num_calls is None:
            return out
        return ParsedOutput(out.content, out.calls[: self.max_num_calls])

    def _delta(self, out: ParsedOutput) -> ChoiceDelta:
        out = self._limit(out)
        content = ""
        if len(out.content) > self.num_content_chars and not self.sent:
            content = out.content[self.num_content_chars :]
            self.num_content_chars = len(out.content)
        pieces = []
        for index, call in enumerate(out.calls):
            if call.name is None:
                break
            piece = self._call_piece(index, call)
            if piece is not None:
                pieces.append(piece)
        return ChoiceDelta(content, pieces)

    def _call_piece(self, index: int, call: ParsedCall) -> dict[str, Any] | None:
        is_new = index >= len(self.sent)
        if is_new:
            self.sent.append(_SentCall(tool_call_id()))
        sent = self.sent[index]
        arguments = call.arguments[sent.num_argument_chars :]
        sent.num_argument_chars = len(call.arguments)
        if is_new:
            return {"index": index, **_call_json(sent.id, call._replace(arguments=arguments))}
        if not arguments:
            return None
        return {"index": index, "function": {"arguments": arguments}}


def _call_json(call_id: str, call: ParsedCall) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
