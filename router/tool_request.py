"""The tool-calling fields of a chat request -> a `ToolPlan` (how to prompt, constrain and
read the output), and chat history with tool calls -> what chat templates expect.

`prepare.py` calls, in this order: `chat_history(messages)` (the template's messages, each
assistant `tool_calls[].function.arguments` parsed from its JSON text into an object, as
Hugging Face templates expect), `tool_plan(req, parser)` (None when the request does not
call tools), then `plan.template_tools` (given to the chat template as `tools=`) and
`plan.grammar` (the request's GrammarSpec). `ResponseBuilder` (router/responses.py) reads
each choice's output back with `router/tool_parsers.make_output_parser(plan)`.

tool_choice:
- "none": tools are neither shown to the template nor called; plain text (as vLLM).
- "auto" (the default when tools are given): the model decides; its own call format is
  parsed by the router's `--tool-call-parser`. Without one it is a 400 naming the flag.
- "required": at least one call (exactly one with parallel_tool_calls false), enforced by a
  JSON-schema grammar: an array of `{"name": <a tool>, "parameters": <its schema>}`.
- {"type": "function", "function": {"name": N}}: one call of N, whose arguments object is
  enforced by N's parameter schema.

Every problem is a 400 naming the field: a tool name outside OpenAI's [a-zA-Z0-9_-]{1,64}
or given twice, parameters that are not a JSON schema (named by tool), an unknown
tool_choice name, a tool_choice without tools, a forced call with another structured-output
field, a `tool` message without tool_call_id, history arguments that are not JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from splitserve.engine.sampling_params import GrammarSpec
from splitserve.router.errors import bad_request
from splitserve.router.openai_schema import ChatCompletionRequest, ChatMessage, ChatTool

ToolMode = Literal["auto", "required", "named"]
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# The arguments schema of a function that declares none: an object without properties.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
PARSER_FLAG = "--tool-call-parser"


@dataclass(frozen=True)
class ToolPlan:
    mode: ToolMode
    # The chat template's `tools=`: the request's tools as OpenAI sends them.
    template_tools: tuple[dict[str, Any], ...]
    # "auto": the router's --tool-call-parser (router/tool_parsers).
    parser: str = ""
    # "named": the function every output calls.
    function: str = ""
    # False: at most one call per choice.
    parallel: bool = True
    # "required" and "named": the constraint that makes the output a valid call.
    grammar: GrammarSpec | None = None


def chat_history(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as chat templates take them; 400 on a malformed tool message."""
    out = []
    for i, message in enumerate(messages):
        if message.role == "tool" and not message.tool_call_id:
            error = f"messages[{i}] has role 'tool' but no tool_call_id: give the id of the call"
            raise bad_request(error + " it answers", f"messages.{i}.tool_call_id")
        item = message.template_dict()
        for j, call in enumerate(item.get("tool_calls", ())):
            function = call["function"]
            function["arguments"] = _arguments_object(
                function["arguments"], f"messages.{i}.tool_calls.{j}.function.arguments"
            )
        out.append(item)
    return out


def _arguments_object(text: str, field: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"{field} is not valid JSON: {exc}", field) from exc
    if not isinstance(value, dict):
        raise bad_request(f"{field} must be a JSON object as text, e.g. '{{}}'", field)
    return value


def tool_plan(req: ChatCompletionRequest, parser: str, has_grammar: bool) -> ToolPlan | None:
    """How this request calls tools, or None; `parser` is the router's --tool-call-parser
    ("" when unset), `has_grammar` whether another structured-output field is given."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            message = "tool_choice needs tools: send the functions in tools, or drop tool_choice"
            raise bad_request(message, "tool_choice")
        return None
    schemas = _tool_schemas(tools)
    if choice == "none":
        return None
    template_tools = tuple(t.model_dump(exclude_none=True) for t in tools)
    parallel = req.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        return _auto_plan(template_tools, parser, parallel)
    if has_grammar:
        message = "a forced tool call cannot be combined with response_format or guided_* fields"
        raise bad_request(message + ": drop one of them", "tool_choice")
    if choice == "required":
        grammar = GrammarSpec("json", json.dumps(required_schema(schemas, parallel)))
        return ToolPlan("required", template_tools, parallel=parallel, grammar=grammar)
    name = choice.function.name
    if name not in schemas:
        known = ", ".join(schemas)
        message = f"tool_choice names function {name!r}, which is not in tools ({known})"
        raise bad_request(message, "tool_choice.function.name")
    grammar = GrammarSpec("json", json.dumps(schemas[name]))
    return ToolPlan("named", template_tools, function=name, parallel=False, grammar=grammar)


def _auto_plan(template_tools: tuple[dict[str, Any], ...], parser: str, parallel: bool) -> ToolPlan:
    if not parser:
        raise bad_request(
            'tool_choice "auto" (the default when tools are given) needs the router started '
            f'with {PARSER_FLAG} (llama3_json or hermes); or send tool_choice "required", a '
            'named function, or "none"',
            "tool_choice",
        )
    return ToolPlan("auto", template_tools, parser=parser, parallel=parallel)


def _tool_schemas(tools: list[ChatTool]) -> dict[str, dict[str, Any]]:
    """Each tool's name -> its arguments schema, checked; 400 naming the tool otherwise."""
    from jsonschema import SchemaError, validators

    schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not TOOL_NAME.fullmatch(name):
            message = f"tool name {name!r} must be 1-64 characters of a-z, A-Z, 0-9, _ and -"
            raise bad_request(message, f"tools.{i}.function.name")
        if name in schemas:
            message = f"tool name {name!r} is given twice: tool names must be unique"
            raise bad_request(message, f"tools.{i}.function.name")
        schema = NO_PARAMETERS if tool.function.parameters is None else tool.function.parameters
        field = f"tools.{i}.function.parameters"
        try:
            validators.validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            message = f"the parameters of tool {name!r} are not a valid JSON schema: {exc.message}"
            raise bad_request(message, field) from exc
        if schema.get("type", "object") != "object":
            message = f"the parameters of tool {name!r} must be an object schema"
            raise bad_request(message + ' ("type": "object")', field)
        schemas[name] = schema
    return schemas


def required_schema(schemas: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The schema of a `required` output: a list of calls, each one of the tools."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
            "required": ["name", "parameters"],
        }
        for name, schema in schemas.items()
    ]
    out: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        out["maxItems"] = 1
    return out
