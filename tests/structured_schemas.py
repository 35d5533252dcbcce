"""JSON schemas the structured-output tests generate against: nested objects, arrays, enums,
required fields, string patterns. Every one bounds its output's length (maxLength, maxItems,
integer ranges, patterns of bounded repetition), so that even a random tiny model's
constrained output ends well within the tests' max_tokens."""

from __future__ import annotations

from typing import Any

_WORD = {"type": "string", "pattern": "^[a-z]{1,6}$"}

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "shade": {"type": "string", "enum": ["light", "dark"]},
        },
        "required": ["color", "shade"],
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                },
                "required": ["id", "tags"],
            }
        },
        "required": ["user"],
    },
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "ok": {"type": "boolean"},
        },
        "required": ["code", "ok"],
    },
    {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "string", "maxLength": 4},
        },
        "required": ["a"],
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "k": {"enum": ["x", "y"]},
                "v": {"type": "integer", "minimum": 0, "maximum": 50},
            },
            "required": ["k", "v"],
        },
        "maxItems": 2,
    },
    {
        "type": "object",
        "properties": {"status": {"const": "done"}, "error": {"type": "null"}},
        "required": ["status", "error"],
    },
    {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {"type": "object", "properties": {"c": _WORD}, "required": ["c"]}
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
    {
        "type": "object",
        "properties": {
            "level": {"enum": [1, 2, 3]},
            "words": {"type": "array", "items": _WORD, "minItems": 1, "maxItems": 2},
        },
        "required": ["level", "words"],
    },
]


def check_every_schema_beside_free_rows(llm: Any) -> None:
    """One batch on `llm` (an engine LLM): every schema twice at temperature 0.8, each
    completion ending with "stop" and validating, beside unconstrained greedy rows that
    must come out as they do alone."""
    import json

    import jsonschema

    from splitserve.engine.sampling_params import GrammarSpec, SamplingParams

    free = SamplingParams(temperature=0, max_tokens=24)
    plain = ["The harbour at dawn", "Tell me about tides"]
    alone = [o.outputs[0].token_ids for o in llm.generate(plain, free)]
    params = [
        SamplingParams(
            grammar=GrammarSpec("json", json.dumps(s)), temperature=0.8, max_tokens=96, n=2
        )
        for s in SCHEMAS
    ]
    prompts = [f"Answer in JSON, case {i}" for i in range(len(SCHEMAS))]
    outs = llm.generate(prompts + plain, [*params, free, free])
    for schema, out in zip(SCHEMAS, outs, strict=False):
        for completion in out.outputs:
            assert completion.finish_reason == "stop", completion
            jsonschema.validate(json.loads(completion.text), schema)
    assert [o.outputs[0].token_ids for o in outs[len(SCHEMAS) :]] == alone
