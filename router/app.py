"""The router's FastAPI app: the OpenAI-compatible API in front of the decode nodes.

`build_app(config)` loads the tokenizer (so a bad path fails before anything listens) and
returns the app; its lifespan connects to Redis, reads the node list once, starts the
prefix-index janitor, and closes everything on shutdown. Endpoints: /v1/models,
/v1/completions, /v1/chat/completions, /tokenize, /detokenize (these need the API key when
one is set), /health and /metrics (open). Every response carries X-Request-Id (the client's,
or a fresh one); every error is an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitserve.router.cluster import ClusterView
from splitserve.router.config import RouterConfig
from splitserve.router.errors import APIError, bad_request
from splitserve.router.handlers import handle_generation, parse_body
from splitserve.router.metrics import RouterMetrics
from splitserve.router.node_clients import NodeClients
from splitserve.router.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from splitserve.router.prepare import prepare_chat, prepare_completion, render_chat_prompt
from splitserve.router.service import RouterService
from splitserve.router.tokenizer import RouterTokenizer

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_OPEN_PATHS = ("/health", "/metrics")


class RequestIdMiddleware:
    """Puts the request id in scope["state"] and on every response (pure ASGI: streams pass)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1").strip()
        request_id = raw[:128] if raw else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.encode(), request_id.encode("latin-1")),
                ]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <api_key>` (not on /health and /metrics)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                error = APIError(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await _error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(config: RouterConfig, tokenizer: RouterTokenizer | None = None) -> FastAPI:
    tokenizer = tokenizer or RouterTokenizer.load(config.tokenizer_path)
    metrics = RouterMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = NodeClients(
            config.node_rpc_timeout_s, config.keepalive_interval_s, config.keepalive_timeout_s
        )
        cluster = ClusterView(config, clients)
        app.state.service = RouterService(config, tokenizer, clients, cluster, metrics)
        snap = await cluster.refresh()
        logger.info(
            "router: %d decode and %d prefill nodes live (redis %s, policy %s)",
            len(snap.decode),
            len(snap.prefill),
            "up" if snap.is_redis_up else "down",
            config.policy.name,
        )
        janitor = asyncio.create_task(cluster.run_janitor())
        try:
            yield
        finally:
            janitor.cancel()
            await cluster.close()
            await clients.close()

    app = FastAPI(title="splitserve router", lifespan=lifespan, docs_url=None, redoc_url=None)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(RequestIdMiddleware)  # outermost: errors of the others carry the id
    _install_error_handlers(app)
    _add_routes(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error(APIError(exc.status_code, f"{request.url.path}: {exc.detail}", code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, f"internal error: {type(exc).__name__}", code="internal"))


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex)


def _service(request: Request) -> RouterService:
    service: RouterService = request.app.state.service
    return service


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle_generation(
            request, "completions", CompletionRequest, prepare_completion, _request_id(request)
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle_generation(
            request, "chat", ChatCompletionRequest, prepare_chat, _request_id(request)
        )

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        data = [
            {
                "id": info.name,
                "object": "model",
                "created": info.created,
                "owned_by": "splitserve",
                "root": info.name,
                "parent": None,
                "max_model_len": info.max_model_len or None,
            }
            for info in await _service(request).models()
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        service = _service(request)
        snap = await service.cluster.refresh()  # fresh: never the previous poll's state
        suspects = service.suspects()
        decode = [d for d in snap.decode if d.node_id not in suspects]
        body = {
            "status": "ok" if decode else "unavailable",
            "redis": "up" if snap.is_redis_up else "down",
            "routing_policy": service.config.policy.name if snap.is_redis_up else "least_load",
            "num_decode_nodes": len(decode),
            "num_prefill_nodes": len(snap.prefill),
            "num_unresponsive_decode_nodes": len(snap.decode) - len(decode),
        }
        return JSONResponse(body, status_code=200 if decode else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(await _service(request).scrape(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return await _tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        service = _service(request)
        req = parse_body(await request.body(), DetokenizeRequest)
        await _max_model_len(service, req.model)
        bad = next((t for t in req.tokens if not 0 <= t < service.tokenizer.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary", "tokens")
        return {"prompt": service.tokenizer.decode(req.tokens, skip_special_tokens=False)}


async def _max_model_len(service: RouterService, model: str | None) -> int:
    """The model's context length (0 unknown); 404 for a model the cluster does not serve."""
    models = await service.models()
    if model is None:
        return models[0].max_model_len if models else 0
    if not models:
        return 0
    return (await service.resolve_model(model)).max_model_len


async def _tokenize(request: Request) -> dict[str, Any]:
    service = _service(request)
    body = await request.body()
    try:
        is_chat = isinstance(obj := json.loads(body), dict) and "messages" in obj
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from exc
    tokenizer = service.tokenizer
    if is_chat:
        chat = parse_body(body, TokenizeChatRequest)
        model, return_strs = chat.model, chat.return_token_strs
        ids = render_chat_prompt(
            tokenizer,
            chat.messages,
            chat.add_generation_prompt,
            chat.continue_final_message,
            chat.add_special_tokens,
            chat.chat_template_kwargs,
        )
    else:
        plain = parse_body(body, TokenizeCompletionRequest)
        model, return_strs = plain.model, plain.return_token_strs
        ids = tokenizer.encode(plain.prompt, plain.add_special_tokens)
    out: dict[str, Any] = {
        "count": len(ids),
        "max_model_len": await _max_model_len(service, model),
        "tokens": ids,
    }
    if return_strs:
        out["token_strs"] = [tokenizer.token_str(t) for t in ids]
    return out
