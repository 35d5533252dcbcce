"""Hermes / Qwen tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one
tag per call, possibly several; text before the first tag is content (Qwen2.5 and Qwen3
chat templates, NousResearch Hermes 2 Pro and 3). Text after the calls is dropped."""

from __future__ import annotations

from splitserve.router.tool_parsers.base import (
    MALFORMED,
    ParsedCall,
    ParsedOutput,
    final_output,
    held_back,
    read_call,
)
from splitserve.router.tool_parsers.json_scan import JsonScanner, skip_ws

START, END = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")


class HermesToolParser:
    keeps_special_tokens = True

    def __init__(self) -> None:
        self.scanner = JsonScanner()  # one parser reads one choice's text

    def parse(self, text: str, is_final: bool) -> ParsedOutput:
        first = text.find(START)
        if first < 0:
            return ParsedOutput(text if is_final else held_back(text, START), [])
        content = text[:first].rstrip()
        calls = self._calls(text, first)
        return final_output(content, calls, text) if is_final else ParsedOutput(content, calls)

    def _calls(self, text: str, at: int) -> list[ParsedCall]:
        calls: list[ParsedCall] = []
        while at >= 0:
            i = skip_ws(text, at + len(START))
            if i >= len(text):
                break
            if text[i] != "{":
                return [*calls, MALFORMED]
            call, end, is_invalid = read_call(self.scanner, text, i, ARGUMENT_KEYS)
            calls.append(call)
            if is_invalid:
                return [*calls, MALFORMED]
            if end is None:
                break
            close = skip_ws(text, end)
            if text.startswith(END, close):
                close += len(END)
            at = text.find(START, close)
        return calls
