"""Tool-call parsers, one module per format, behind one interface (`base.ToolParser`).

`make_output_parser(plan)` picks the parser of a request's `ToolPlan`
(router/tool_request.py): the router's --tool-call-parser for tool_choice "auto"
(`TOOL_CALL_PARSERS`: llama3_json, hermes), the grammar-shaped readers of forced.py for
"required" and a named function. A new format is a module with a class that has `parse`
and `keeps_special_tokens`, added to `TOOL_CALL_PARSERS`.
"""

from __future__ import annotations

from collections.abc import Callable

from splitserve.router.tool_parsers.base import ParsedCall, ParsedOutput, ToolParser
from splitserve.router.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser
from splitserve.router.tool_parsers.hermes import HermesToolParser
from splitserve.router.tool_parsers.llama3_json import Llama3JsonToolParser
from splitserve.router.tool_request import ToolPlan

TOOL_CALL_PARSERS: dict[str, Callable[[], ToolParser]] = {
    "llama3_json": Llama3JsonToolParser,
    "hermes": HermesToolParser,
}

__all__ = ["TOOL_CALL_PARSERS", "ParsedCall", "ParsedOutput", "ToolParser", "make_output_parser"]


def make_output_parser(plan: ToolPlan) -> ToolParser:
    if plan.mode == "named":
        return NamedFunctionParser(plan.function)
    if plan.mode == "required":
        return RequiredCallsParser()
    if plan.parser not in TOOL_CALL_PARSERS:
        known = ", ".join(TOOL_CALL_PARSERS)
        raise ValueError(f"unknown tool-call parser {plan.parser!r}; pick one of {known}")
    return TOOL_CALL_PARSERS[plan.parser]()
