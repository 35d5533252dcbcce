"""Outputs that the grammar makes calls (tool_choice "required" or a named function): the
output is only read, never guessed at.

- named function: the whole output is the arguments object of that function.
- "required": the output is a JSON array of `{"name": ..., "parameters": {...}}`
  (router/tool_request.py: required_schema).

An output cut short by max_tokens is no call: its text is the content (finish_reason
"length").
"""

from __future__ import annotations

from splitserve.router.tool_parsers.base import (
    MALFORMED,
    ParsedCall,
    ParsedOutput,
    final_output,
    read_calls,
)
from splitserve.router.tool_parsers.json_scan import WHITESPACE, JsonScanner, skip_ws


class NamedFunctionParser:
    keeps_special_tokens = False

    def __init__(self, function: str) -> None:
        self.function = function

    def parse(self, text: str, is_final: bool) -> ParsedOutput:
        if not is_final:
            return ParsedOutput("", [ParsedCall(self.function, text.lstrip(WHITESPACE), False)])
        call = ParsedCall(self.function, text.strip(WHITESPACE), True)
        return final_output("", [call], text)


class RequiredCallsParser:
    keeps_special_tokens = False

    def __init__(self) -> None:
        self.scanner = JsonScanner()  # one parser reads one choice's text

    def parse(self, text: str, is_final: bool) -> ParsedOutput:
        start = skip_ws(text, 0)
        if start >= len(text):
            return ParsedOutput(text if is_final else "", [])
        if text[start] != "[":
            return ParsedOutput(text, []) if is_final else ParsedOutput("", [MALFORMED])
        scan = read_calls(self.scanner, text, start + 1, ("parameters",), ",", "]")
        if not is_final:
            return ParsedOutput("", scan.calls)
        is_whole = scan.end is not None and not scan.is_invalid
        return final_output("", scan.calls if is_whole else [*scan.calls, MALFORMED], text)
