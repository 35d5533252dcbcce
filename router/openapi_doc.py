"""The served /openapi.json: FastAPI's document, completed with what the handlers parse
themselves (they read raw bodies so that errors are OpenAI error objects): every request
body (the pydantic models of router/openai_schema.py) and every error body.

    install_openapi(app)    # after the routes are added; app.openapi() builds it once
"""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from splitserve.router.middleware import OPEN_PATHS
from splitserve.router.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)

_REF = "#/components/schemas/{model}"
_BODIES: dict[str, tuple[type[BaseModel], ...]] = {
    "/v1/completions": (CompletionRequest,),
    "/v1/chat/completions": (ChatCompletionRequest,),
    "/tokenize": (TokenizeCompletionRequest, TokenizeChatRequest),
    "/detokenize": (DetokenizeRequest,),
}
# Error statuses per path (the API key's 401 is added when one is set).
_ERRORS: dict[str, tuple[int, ...]] = {
    "/v1/completions": (400, 404, 413, 500, 503),
    "/v1/chat/completions": (400, 404, 413, 500, 503),
    "/tokenize": (400, 404, 413, 503),
    "/detokenize": (400, 404, 413, 503),
    "/v1/models": (),
    "/v1/models/{model_id}": (404, 503),
    "/health": (),
    "/live": (),
    "/ready": (),
    "/metrics": (),
}
_DESCRIPTIONS = {
    400: "invalid request (the error names the field)",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body over the limit",
    500: "a node failed",
    503: "no decode node can serve now",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": _ref(ErrorResponse)}},
    }


def _body(models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    schema = _ref(models[0]) if len(models) == 1 else {"oneOf": [_ref(m) for m in models]}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def build_openapi(app: FastAPI, has_api_key: bool) -> dict[str, Any]:
    with warnings.catch_warnings():  # GET and HEAD share a route, hence an operation id
        warnings.filterwarnings("ignore", message="Duplicate Operation ID")
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for operations in doc["paths"].values():
        operations.pop("head", None)  # HEAD answers wherever GET does (documented)
    models = [m for ms in _BODIES.values() for m in ms] + [ErrorResponse]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):  # no 422 here: errors are 400
        schemas.pop(unused, None)
    schemas.update(defs.get("$defs", {}))
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            op["parameters"] = [p for p in op.get("parameters", []) if p.get("in") == "path"]
            if path in _BODIES and method == "post":
                op["requestBody"] = _body(_BODIES[path])
            statuses = list(_ERRORS.get(path, ()))
            if has_api_key and path not in OPEN_PATHS:
                statuses.append(401)
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in statuses:
                responses[str(status)] = _error_response(status)
            if path in ("/v1/completions", "/v1/chat/completions"):
                responses["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
            if path == "/health":
                responses["503"] = {**responses["200"], "description": "no live decode node"}
            if path == "/ready":
                responses["503"] = {
                    **responses["200"],
                    "description": "no routable decode node, or Redis does not answer",
                }
    return doc


def install_openapi(app: FastAPI, has_api_key: bool) -> None:
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cached:
            cached.update(build_openapi(app, has_api_key))
        return cached

    app.openapi = openapi  # type: ignore[method-assign]
