"""Structured-output fields of an OpenAI request -> one `GrammarSpec` for the engine.

`prepare.py` calls `grammar_spec(req)` while it builds the SamplingParams. Served fields:
`response_format` {"type": "json_object"} and {"type": "json_schema", "json_schema":
{"schema": ..., "strict": ...}}, and vLLM's extra_body fields `guided_json` (a schema, as an
object or its JSON text), `guided_regex`, `guided_choice` (a list of strings) and
`guided_grammar` (EBNF), or the same under vLLM's newer `structured_outputs` object
(`json`, `regex`, `choice`, `grammar`, `json_object`). At most one of them per request;
the shape of each is checked here (a 400 naming the field). The router is torch-free and
xgrammar needs torch, so the grammar itself is compiled by the decode node at admission,
before any block is allocated or any prefill node is asked: a schema xgrammar cannot
compile is a 400 with its reason (docs/structured_output.md).
"""

from __future__ import annotations

import json
from typing import Any

from splitserve.engine.sampling_params import GrammarSpec
from splitserve.router.errors import bad_request
from splitserve.router.openai_schema import ResponseFormat, StructuredOutputs, _SamplingFields

# Bound on the text of one grammar (a schema, regex or EBNF) the router accepts.
MAX_GRAMMAR_CHARS = 1 << 20


def grammar_spec(req: _SamplingFields) -> GrammarSpec | None:
    """The request's grammar, or None; a 400 when it is malformed or more than one is given."""
    given = [
        (name, value)
        for name, value in (
            ("response_format", _response_format(req.response_format)),
            ("guided_json", _json(req.guided_json, "guided_json")),
            ("guided_regex", _non_empty(req.guided_regex, "regex", "guided_regex")),
            ("guided_choice", _choice(req.guided_choice, "guided_choice")),
            ("guided_grammar", _non_empty(req.guided_grammar, "grammar", "guided_grammar")),
            *_structured_outputs(req.structured_outputs),
        )
        if value is not None
    ]
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        message = f"give at most one structured-output constraint, got {names}"
        raise bad_request(message, given[1][0])
    if not given:
        return None
    name, spec = given[0]
    if len(spec.source) > MAX_GRAMMAR_CHARS:
        raise bad_request(f"{name} is longer than {MAX_GRAMMAR_CHARS} characters", name)
    return spec


def _structured_outputs(so: StructuredOutputs | None) -> list[tuple[str, GrammarSpec | None]]:
    if so is None:
        return []
    prefix = "structured_outputs."
    json_object = GrammarSpec("json_object") if so.json_object else None
    return [
        (prefix + "json", _json(so.json_, prefix + "json")),
        (prefix + "regex", _non_empty(so.regex, "regex", prefix + "regex")),
        (prefix + "choice", _choice(so.choice, prefix + "choice")),
        (prefix + "grammar", _non_empty(so.grammar, "grammar", prefix + "grammar")),
        (prefix + "json_object", json_object),
    ]


def _response_format(fmt: ResponseFormat | None) -> GrammarSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request(
            'response_format {"type": "json_schema"} needs "json_schema": {"name": ..., '
            '"schema": {...}}',
            "response_format",
        )
    source = _schema_text(fmt.json_schema.schema_, "response_format")
    return GrammarSpec("json", source, strict=fmt.json_schema.strict is not False)


def _json(value: str | dict[str, Any] | None, field: str) -> GrammarSpec | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise bad_request(f"{field} is not valid JSON: {exc}", field) from exc
    if not isinstance(value, dict):
        raise bad_request(f"{field} must be a JSON schema object", field)
    return GrammarSpec("json", _schema_text(value, field))


def _schema_text(schema: dict[str, Any], field: str) -> str:
    if not schema:
        raise bad_request(f"the JSON schema in {field} is empty; give at least a type", field)
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise bad_request(f"the JSON schema in {field} cannot be serialised: {exc}", field) from exc


def _choice(choices: list[str] | None, field: str) -> GrammarSpec | None:
    if choices is None:
        return None
    if not choices or not all(choices):
        raise bad_request(f"{field} must be a non-empty list of non-empty strings", field)
    return GrammarSpec("choice", json.dumps(choices, ensure_ascii=False))


def _non_empty(value: str | None, kind: str, field: str) -> GrammarSpec | None:
    if value is None:
        return None
    if not value:
        raise bad_request(f"{field} must not be empty", field)
    return GrammarSpec(kind, value)  # type: ignore[arg-type]
