"""/v1/completions and /v1/chat/completions: validate, prepare, stream from decode nodes.

Order per request: parse the body (400; unknown fields logged and listed in the
X-Ignored-Fields header, or a 400 with --strict-fields), resolve the model against the live
decode nodes (404 unknown, 503 none live), tokenize and check the context budget (400) on
the tokenizer threads (RouterService.offload: never on the event loop), then route
and open one stream per prompt and wait for each stream's first message (503 when no node
can serve) while watching for the client going away. Streaming responses start only then,
so their status is a real one; a failure after that is an error chunk, then `[DONE]`.
A client that disconnects at any point cancels the node streams, which sends Decode.Abort.
Each request is a "<METHOD> <path>" span (router/generation.py adds its children) that ends
with the response (a streaming one: after `[DONE]` or the client leaving).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from splitserve.protocol.tracing import NO_SPAN, PROMPT_TOKENS, REQUEST_ID, ROLE, Span
from splitserve.router.coalesce import StreamItem
from splitserve.router.errors import APIError, bad_request, from_validation_error
from splitserve.router.generation import PromptStreams
from splitserve.router.openai_schema import unknown_fields
from splitserve.router.prepare import PreparedRequest
from splitserve.router.responses import ResponseBuilder, sse
from splitserve.router.service import RouterService
from splitserve.router.tokenizer import RouterTokenizer

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
CLIENT_GONE_STATUS = 499  # nginx's "client closed request": only ever seen in metrics
IGNORED_FIELDS_HEADER = "x-ignored-fields"
_DONE = "data: [DONE]\n\n"
Prepare = Callable[[Any, RouterTokenizer, str, int], PreparedRequest]


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


def parse_body(body: bytes, model: type[M]) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def parse_request(request: Request, model: type[M]) -> tuple[M, list[str]]:
    """The validated body (parsed on the tokenizer threads) and the unknown fields it had;
    400 for those with --strict-fields, else a log line."""
    service: RouterService = request.app.state.service
    parsed = await service.offload(parse_body, await request.body(), model)
    ignored = unknown_fields(parsed)
    if ignored and service.config.strict_fields:
        raise bad_request(
            f"unknown field {ignored[0]!r}: this server runs with --strict-fields; drop it",
            ignored[0],
        )
    if ignored:
        logger.info("%s %s: ignoring unknown fields %s", request.method, request.url.path, ignored)
    return parsed, ignored


def _header_safe(name: str) -> str:
    """A field name as printable ASCII without spaces (Python escapes; "" when empty)."""
    return ascii(name)[1:-1].replace(" ", "\\x20") or '""'


def with_ignored_header(response: Response, ignored: list[str]) -> Response:
    if ignored:
        response.headers[IGNORED_FIELDS_HEADER] = ", ".join(map(_header_safe, ignored))[:1024]
    return response


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) if the client leaves first."""
    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task in done:
        return work_task.result()
    raise ClientGone()


def _finish_metrics(
    service: RouterService, endpoint: str, status: int, builder: ResponseBuilder | None
) -> None:
    metrics = service.metrics
    metrics.requests.labels(endpoint, str(status)).inc()
    if builder is None:
        return
    metrics.e2e.observe(time.perf_counter() - builder.prepared.arrival_s)
    usage = builder.usage
    metrics.prompt_tokens.inc(sum(usage.prompt_tokens))
    metrics.cached_tokens.inc(sum(usage.cached_tokens))
    metrics.generation_tokens.inc(sum(usage.completion_tokens))


def _request_span(request: Request, service: RouterService, request_id: str) -> Span:
    """The request's "POST <path>" (server) span; a W3C traceparent header, when the client
    sends one, makes it part of the client's trace."""
    tracer = service.tracer
    attributes = {
        REQUEST_ID: request_id,
        ROLE: "router",
        "http.request.method": request.method,
        "url.path": request.url.path,
    }
    parent = tracer.parent_from(request.headers.items())
    return tracer.start_span(f"{request.method} {request.url.path}", parent, "server", attributes)


def end_request_span(span: Span, status: int) -> None:
    span.set("http.response.status_code", status)
    if status >= 500:
        span.fail(f"HTTP {status}")
    span.end()


async def handle_generation(
    request: Request, endpoint: str, model: type[BaseModel], prepare: Prepare, request_id: str
) -> Response:
    service: RouterService = request.app.state.service
    streams: PromptStreams | None = None
    ignored: list[str] = []
    span, status = _request_span(request, service, request_id), 500
    try:
        req, ignored = await parse_request(request, model)
        info = await service.resolve_model(req.model)  # type: ignore[attr-defined]
        prepared = await service.offload(
            prepare, req, service.tokenizer, request_id, info.max_model_len
        )
        span.set(PROMPT_TOKENS, sum(len(p) for p in prepared.prompts))
        streams = PromptStreams(service, prepared, span)
        await until_disconnect(request, streams.start())
        builder = ResponseBuilder(prepared, service.tokenizer)
        if prepared.stream:
            stream = _SSEStream(service, endpoint, streams, builder, span)
            streams, span = None, NO_SPAN  # the response owns them now
            return with_ignored_header(_SSEResponse(stream), ignored)
        result = await until_disconnect(request, _collect(streams, builder))
        status = 200
        _finish_metrics(service, endpoint, 200, builder)
        return with_ignored_header(JSONResponse(result), ignored)
    except APIError as exc:
        status = exc.status
        _finish_metrics(service, endpoint, exc.status, None)
        error = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        return with_ignored_header(error, ignored)
    except ClientGone:
        logger.info("client of %s went away before the response", request_id)
        status = CLIENT_GONE_STATUS
        _finish_metrics(service, endpoint, CLIENT_GONE_STATUS, None)
        return Response(status_code=CLIENT_GONE_STATUS)
    finally:
        end_request_span(span, status)
        if streams is not None:
            await streams.aclose()


async def _collect(streams: PromptStreams, builder: ResponseBuilder) -> dict[str, Any]:
    async for item in streams:
        if item.message is not None:
            builder.add(item.prompt_index, item.message)
    failed = builder.failed_choice()
    if failed is not None:
        status = 503 if failed.finish_reason == "abort" else 500
        raise APIError(
            status,
            f"the decode node ended a completion with finish_reason {failed.finish_reason!r}",
            code="generation_" + str(failed.finish_reason),
        )
    return builder.response()


class _SSEResponse(StreamingResponse):
    """StreamingResponse that always closes its node streams, even if never iterated
    (the client left between the first node message and the first chunk)."""

    def __init__(self, stream: _SSEStream) -> None:
        super().__init__(stream.events(), media_type="text/event-stream")
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.close()


class _SSEStream:
    def __init__(
        self,
        service: RouterService,
        endpoint: str,
        streams: PromptStreams,
        builder: ResponseBuilder,
        span: Span,
    ) -> None:
        self.service = service
        self.span = span  # the request's span: ends with the response
        self.endpoint = endpoint
        self.streams = streams
        self.builder = builder
        self.status = CLIENT_GONE_STATUS
        self._is_closed = False

    async def close(self) -> None:
        if not self._is_closed:
            self._is_closed = True
            _finish_metrics(self.service, self.endpoint, self.status, self.builder)
            end_request_span(self.span, self.status)
        await self.streams.aclose()

    def _frames(self, items: list[StreamItem]) -> list[str]:
        """The SSE frames of one batch of node messages (one item per prompt); each frame's
        router stage (from the message's arrival to its frame) is observed when the message
        was timed."""
        builder, with_usage = self.builder, self.builder.prepared.continuous_usage
        frames = []
        for item in items:
            if item.message is None:
                continue
            choices = builder.add(item.prompt_index, item.message)
            if choices:
                frames.append(builder.chunk_frame(choices, with_usage))
                if item.received_s:
                    self.service.metrics.observe_router_stage(time.monotonic() - item.received_s)
        return frames

    async def events(self) -> AsyncIterator[str]:
        builder, prepared = self.builder, self.builder.prepared
        try:
            if prepared.kind == "chat":
                yield builder.role_frame()
            while items := await self.streams.next_items():
                frames = self._frames(items)
                if frames:
                    yield "".join(frames)  # one write for what came together
            if prepared.include_usage:
                yield builder.usage_frame()
            self.status = 200
            yield _DONE
        except APIError as exc:
            self.status = exc.status
            logger.warning("stream of %s failed: %s", prepared.request_id, exc.message)
            yield sse(exc.body())
            yield _DONE
        finally:
            await self.close()
