"""The router's FastAPI app: the OpenAI-compatible API in front of the decode nodes.

`build_app(config)` loads the tokenizer (so a bad path fails before anything listens) and
returns the app; its lifespan connects to Redis, reads the node list once, starts the
prefix-index janitor, the tokenizer threads and tracing (--otlp-traces-endpoint), and closes
everything on shutdown (flushing the spans not yet exported). The endpoints are in
router/routes.py, the middleware in router/middleware.py, the served openapi.json in
router/openapi_doc.py. Every error is an OpenAI error object; a 405 names
the allowed methods in `Allow`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from splitserve.protocol.tracing import TracingConfig, start_tracing
from splitserve.router.cluster import ClusterView
from splitserve.router.config import RouterConfig
from splitserve.router.errors import APIError
from splitserve.router.handlers import IGNORED_FIELDS_HEADER
from splitserve.router.metrics import RouterMetrics
from splitserve.router.middleware import (
    REQUEST_ID_HEADER,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    RequestIdMiddleware,
    error_response,
)
from splitserve.router.node_clients import NodeClients
from splitserve.router.openapi_doc import install_openapi
from splitserve.router.routes import add_routes
from splitserve.router.service import RouterService
from splitserve.router.tokenizer import RouterTokenizer

logger = logging.getLogger(__name__)


def build_app(config: RouterConfig, tokenizer: RouterTokenizer | None = None) -> FastAPI:
    tokenizer = tokenizer or RouterTokenizer.load(config.tokenizer_path)
    metrics = RouterMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = NodeClients(
            config.node_rpc_timeout_s,
            config.keepalive_interval_s,
            config.keepalive_timeout_s,
            config.security,
            config.multiplex_streams,
        )
        cluster = ClusterView(config, clients)
        tracer = start_tracing(_tracing_config(config))
        service = RouterService(config, tokenizer, clients, cluster, metrics, tracer)
        app.state.service = service
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
            service.close()
            tracer.shutdown()

    app = FastAPI(title="splitserve router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimitMiddleware, limit=lambda: _body_limit(app, config))
    if config.api_key:
        app.add_middleware(
            ApiKeyMiddleware, api_key=config.api_key, protect_metrics=config.protect_metrics
        )
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER, IGNORED_FIELDS_HEADER],
        )
    app.add_middleware(RequestIdMiddleware)  # outermost: errors of the others carry the id
    _install_error_handlers(app)
    add_routes(app)
    install_openapi(app, has_api_key=bool(config.api_key))
    return app


def _tracing_config(config: RouterConfig) -> TracingConfig:
    return TracingConfig(
        endpoint=config.otlp_traces_endpoint,
        service_name="splitserve-router",
        # A router has no node id: it is one process on one host.
        instance_id=f"router-{socket.gethostname()}-{os.getpid()}",
        role="router",
        extra_resource={"splitserve.cluster": config.cluster},
    )


def _body_limit(app: FastAPI, config: RouterConfig) -> int:
    service: RouterService | None = getattr(app.state, "service", None)
    return service.body_limit() if service is not None else config.body_limit_for(0)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 405 and exc.headers:
            message += f" (allowed: {exc.headers.get('Allow', '')})"
        return error_response(
            APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {}))
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        error = APIError(500, f"internal error: {type(exc).__name__}", code="internal")
        return error_response(error)
