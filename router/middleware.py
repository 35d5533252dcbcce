"""The router's ASGI middleware (pure ASGI, so SSE streams pass through untouched).

Order, outermost first (app.py adds them): RequestIdMiddleware (every response carries
X-Request-Id, the client's or a fresh one), CORS when configured, ApiKeyMiddleware (401 on
/v1/*, /tokenize, /detokenize and every other path but /health, /live, /ready and, unless
--protect-metrics, /metrics, without the key), BodyLimitMiddleware (413 for a body over
the limit, checked on Content-Length and again on the bytes as they arrive, before anything
parses it).
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitserve.protocol.log_context import REQUEST_ID
from splitserve.router.errors import APIError

REQUEST_ID_HEADER = "x-request-id"
# Open without the API key: Kubernetes-style probes. /metrics too, unless protect_metrics.
OPEN_PATHS = ("/health", "/live", "/ready")
METRICS_PATH = "/metrics"


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class RequestIdMiddleware:
    """Puts the request id in scope["state"], in the log context and on every response."""

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
        REQUEST_ID.set(request_id)  # log lines written for this request name it

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.encode(), request_id.encode("latin-1")),
                ]
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <api_key>` (not on OPEN_PATHS, nor on /metrics
    unless `protect_metrics`)."""

    def __init__(self, app: ASGIApp, api_key: str, protect_metrics: bool = False) -> None:
        self.app = app
        self.api_key = api_key
        self.open_paths = OPEN_PATHS if protect_metrics else (*OPEN_PATHS, METRICS_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_open = scope["type"] != "http" or scope["path"] in self.open_paths
        if not is_open and scope["method"] != "OPTIONS":
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
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def body_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes: send a "
        "shorter prompt (the limit follows the model's context length; --max-body-bytes)",
        code="request_too_large",
    )


class BodyLimitMiddleware:
    """413 for a request body over `limit()` bytes, before any of it is parsed."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > limit:
            await error_response(body_too_large(limit))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)
            return message

        await self.app(scope, counted, send)
