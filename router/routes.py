"""The router's HTTP endpoints (build_app in router/app.py adds them).

/v1/completions and /v1/chat/completions go to router/handlers.py; /v1/models,
/v1/models/{id}, /tokenize, /detokenize, /health, /live, /ready and /metrics are answered
here (the probes' semantics: docs/operations.md#health). Every GET
also answers HEAD. Parsing, chat templates and tokenization run on the tokenizer threads
(RouterService.offload), never on the event loop.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from splitserve.router.errors import bad_request
from splitserve.router.handlers import handle_generation, parse_request, with_ignored_header
from splitserve.router.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from splitserve.router.prepare import prepare_chat, prepare_completion, render_chat_prompt
from splitserve.router.service import ModelInfo, RouterService
from splitserve.router.tokenizer import RouterTokenizer

F = TypeVar("F", bound=Callable[..., Any])


def _get(app: FastAPI, path: str, **kwargs: Any) -> Callable[[F], F]:
    """Route GET and HEAD to the handler (one route, so a 405's Allow names both)."""
    decorate: Callable[[F], F] = app.api_route(path, methods=["GET", "HEAD"], **kwargs)
    return decorate


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex)


def _service(request: Request) -> RouterService:
    service: RouterService = request.app.state.service
    return service


def _model_card(info: ModelInfo) -> dict[str, Any]:
    return {
        "id": info.name,
        "object": "model",
        "created": info.created,
        "owned_by": "splitserve",
        "root": info.name,
        "parent": None,
        "max_model_len": info.max_model_len or None,
    }


def add_routes(app: FastAPI) -> None:
    _add_generation_routes(app)
    _add_model_routes(app)
    _add_token_routes(app)


def _add_generation_routes(app: FastAPI) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle_generation(
            request, "completions", CompletionRequest, prepare_completion, _request_id(request)
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        parser = _service(request).config.tool_call_parser
        prepare = functools.partial(prepare_chat, tool_call_parser=parser)
        return await handle_generation(
            request, "chat", ChatCompletionRequest, prepare, _request_id(request)
        )


def _add_model_routes(app: FastAPI) -> None:
    @_get(app, "/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        data = [_model_card(info) for info in await _service(request).models()]
        return {"object": "list", "data": data}

    @_get(app, "/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        return _model_card(await _service(request).resolve_model(model_id))

    @_get(app, "/health")
    async def health(request: Request) -> JSONResponse:
        body = await _cluster_health(_service(request))
        return JSONResponse(body, status_code=200 if body["num_decode_nodes"] else 503)

    @_get(app, "/live")
    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @_get(app, "/ready")
    async def ready(request: Request) -> JSONResponse:
        body = await _cluster_health(_service(request))
        reasons = []
        if not body["num_decode_nodes"]:
            reasons.append("no routable decode node")
        if body["redis"] != "up":
            reasons.append("Redis does not answer")
        if reasons:
            body = {**body, "status": "not ready", "reason": "; ".join(reasons)}
        return JSONResponse(body, status_code=503 if reasons else 200)

    @_get(app, "/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        return Response(await _service(request).scrape(), media_type=CONTENT_TYPE_LATEST)


async def _cluster_health(service: RouterService) -> dict[str, Any]:
    """/health's body, read fresh (never the previous poll's state): the decode nodes are
    the ones Redis lists less those that just failed a liveness check."""
    snap = await service.cluster.refresh()
    suspects = service.suspects()
    decode = [d for d in snap.decode if d.node_id not in suspects]
    return {
        "status": "ok" if decode else "unavailable",
        "redis": "up" if snap.is_redis_up else "down",
        "routing_policy": service.config.policy.name if snap.is_redis_up else "least_load",
        "num_decode_nodes": len(decode),
        "num_prefill_nodes": len(snap.prefill),
        "num_unresponsive_decode_nodes": len(snap.decode) - len(decode),
    }


def _add_token_routes(app: FastAPI) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await _tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        service = _service(request)
        req, ignored = await parse_request(request, DetokenizeRequest)
        await _max_model_len(service, req.model)
        bad = next((t for t in req.tokens if not 0 <= t < service.tokenizer.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary", "tokens")
        text = await service.offload(service.tokenizer.decode, req.tokens, False)
        return with_ignored_header(await _json_response(service, {"prompt": text}), ignored)


async def _max_model_len(service: RouterService, model: str | None) -> int:
    """The model's context length (0 unknown); 404 for a model the cluster does not serve."""
    models = await service.models()
    if model is None:
        return models[0].max_model_len if models else 0
    if not models:
        return 0
    return (await service.resolve_model(model)).max_model_len


_JSON_SLICE = 16_384  # list items encoded per C call in _render_json


def _is_chat(body: bytes) -> bool:
    try:
        return isinstance(obj := json.loads(body), dict) and "messages" in obj
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from exc


def _token_strs(tokenizer: RouterTokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.token_str(t) for t in ids]


async def _tokenize(request: Request) -> Response:
    service = _service(request)
    tokenizer = service.tokenizer
    if await service.offload(_is_chat, await request.body()):
        chat, ignored = await parse_request(request, TokenizeChatRequest)
        model, return_strs = chat.model, chat.return_token_strs
        ids = await service.offload(
            render_chat_prompt,
            tokenizer,
            chat.messages,
            chat.add_generation_prompt,
            chat.continue_final_message,
            chat.add_special_tokens,
            chat.chat_template_kwargs,
            tuple(t.model_dump(exclude_none=True) for t in chat.tools or ()),
        )
    else:
        plain, ignored = await parse_request(request, TokenizeCompletionRequest)
        model, return_strs = plain.model, plain.return_token_strs
        ids = await service.offload(tokenizer.encode, plain.prompt, plain.add_special_tokens)
    out: dict[str, Any] = {
        "count": len(ids),
        "max_model_len": await _max_model_len(service, model),
        "tokens": ids,
    }
    if return_strs:
        out["token_strs"] = await service.offload(_token_strs, tokenizer, ids)
    return with_ignored_header(await _json_response(service, out), ignored)


async def _json_response(service: RouterService, content: dict[str, Any]) -> Response:
    """A JSON response rendered on the tokenizer threads: the token list of a 3 MB prompt
    takes hundreds of milliseconds to encode, which would hold the event loop."""
    body = await service.offload(_render_json, content)
    return Response(body, media_type="application/json")


def _render_json(content: dict[str, Any]) -> bytes:
    """`content` as JSON, its long lists encoded a slice at a time: one C call over a
    million token ids holds the GIL for about 100 ms, slices let the event loop in between."""
    fields = []
    for key, value in content.items():
        if isinstance(value, list) and len(value) > _JSON_SLICE:
            slices = (
                _dumps(value[i : i + _JSON_SLICE])[1:-1] for i in range(0, len(value), _JSON_SLICE)
            )
            encoded = "[" + ",".join(slices) + "]"
        else:
            encoded = _dumps(value)
        fields.append(f"{_dumps(key)}:{encoded}")
    return ("{" + ",".join(fields) + "}").encode()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
