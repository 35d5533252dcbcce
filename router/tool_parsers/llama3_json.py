"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: `{"name": ..., "parameters": {...}}` (or
"arguments"), optionally after `<|python_tag|>`, several separated by `;`. Without the tag
the output is a call only when it starts with `{` (as in vLLM's llama3_json parser); with it,
text before the tag is content."""

from __future__ import annotations

from splitserve.router.tool_parsers.base import (
    MALFORMED,
    ParsedOutput,
    final_output,
    held_back,
    read_calls,
)
from splitserve.router.tool_parsers.json_scan import JsonScanner, skip_ws

PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("parameters", "arguments")


class Llama3JsonToolParser:
    keeps_special_tokens = True

    def __init__(self) -> None:
        self.scanner = JsonScanner()  # one parser reads one choice's text

    def parse(self, text: str, is_final: bool) -> ParsedOutput:
        tag = text.find(PYTHON_TAG)
        if tag >= 0:
            content, start = text[:tag].rstrip(), tag + len(PYTHON_TAG)
        else:
            start = skip_ws(text, 0)
            if start >= len(text) or text[start] != "{":
                return ParsedOutput(text if is_final else held_back(text, PYTHON_TAG), [])
            content = ""
        scan = read_calls(self.scanner, text, start, ARGUMENT_KEYS, ";", "")
        if is_final:
            calls = scan.calls if not scan.is_invalid else [*scan.calls, MALFORMED]
            return final_output(content, calls, text)
        return ParsedOutput(content, scan.calls)
