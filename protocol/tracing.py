"""Distributed tracing of a request across router -> decode node -> prefill node.

Each process makes one Tracer when it starts (`--otlp-traces-endpoint URL`):

    tracer = start_tracing(TracingConfig(endpoint, "splitserve-decode", node_id, "decode"))
    span = tracer.start_span("name", parent, kind="server", attributes={...})  # any thread
    span.set("key", value); span.end()         # or `with tracer.start_span(...) as span:`
    stub.Call(request, metadata=span.metadata())          # client: W3C traceparent
    parent = tracer.parent_from(context.invocation_metadata())  # server: the caller's span
    tracer.shutdown()                          # on stop: flushes the spans not yet sent

With an endpoint, protocol/otel_tracing.py builds the tracer on the OpenTelemetry SDK (the
`otel` extra): spans go to an OTLP/gRPC collector through a BatchSpanProcessor. Without one,
`start_tracing` returns NO_TRACER: splitserve imports no OpenTelemetry module and every
span is one shared object whose methods do nothing, so a hook on the hot path costs a call.

The span tree of one request and the attribute names are in docs/operations.md (Tracing).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

SpanKind = Literal["internal", "server", "client"]
AttributeValue = str | bool | int | float
Metadata = tuple[tuple[str, str], ...]

# Attribute names shared by every process (docs/operations.md lists them all).
REQUEST_ID = "splitserve.request_id"
NODE_ID = "splitserve.node_id"
ROLE = "splitserve.role"
PROMPT_TOKENS = "splitserve.prompt_tokens"
PREFILL_REMOTE = "splitserve.prefill.remote"
PREFILL_FALLBACK = "splitserve.prefill.fallback"
PREFILL_NODE_ID = "splitserve.prefill.node_id"
DECODE_NODE_ID = "splitserve.decode.node_id"
CHUNK_INDEX = "splitserve.chunk.index"
CHUNK_BYTES = "splitserve.chunk.bytes"

_SCHEMES = ("http", "https", "grpc")


@dataclass(frozen=True)
class TracingConfig:
    # OTLP/gRPC collector: http:// or grpc:// (plaintext), https:// (TLS), or a bare
    # host:port (plaintext); empty: tracing off.
    endpoint: str = ""
    # The process's resource: service.name, service.instance.id and splitserve.role.
    service_name: str = "splitserve"
    instance_id: str = ""
    role: str = ""
    extra_resource: Mapping[str, str] = field(default_factory=dict)
    # Longest one export may take, retries included (s): bounds the flush on shutdown when
    # the collector is down.
    export_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        if self.endpoint:
            check_endpoint(self.endpoint)

    @property
    def is_enabled(self) -> bool:
        return bool(self.endpoint)


class Endpoint(NamedTuple):
    """Where the OTLP exporter sends: `host:port`, and whether the channel is plaintext."""

    address: str
    is_insecure: bool


def parse_endpoint(url: str) -> Endpoint:
    """The collector address of `--otlp-traces-endpoint`; ValueError with the accepted forms."""
    split = urlsplit(url if "://" in url else f"grpc://{url}")
    hint = (
        f"--otlp-traces-endpoint {url!r} is not an OTLP/gRPC collector address: pass "
        "http://host:4317 (plaintext) or https://host:4317 (TLS)"
    )
    if split.scheme not in _SCHEMES or not split.hostname:
        raise ValueError(hint)
    try:
        port = split.port
    except ValueError:
        raise ValueError(hint) from None
    if port is None or split.path.strip("/"):
        raise ValueError(hint)
    host = f"[{split.hostname}]" if ":" in split.hostname else split.hostname
    return Endpoint(f"{host}:{port}", is_insecure=split.scheme != "https")


_OTEL_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc")


def check_endpoint(url: str) -> None:
    """ValueError unless `url` is a collector address and the `otel` extra is installed
    (configs call it, so a bad --otlp-traces-endpoint fails before anything starts)."""
    parse_endpoint(url)
    for module in _OTEL_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ValueError(
                f"--otlp-traces-endpoint needs OpenTelemetry ({module} is missing): "
                "pip install 'splitserve[otel]'"
            )


class Span:
    """A span that records nothing (tracing off); the SDK-backed one overrides every method."""

    is_recording = False

    def set(self, key: str, value: AttributeValue) -> None:
        pass

    def set_many(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set(key, value)

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        pass

    def fail(self, message: str) -> None:
        """Mark the span's outcome as an error."""

    def end(self) -> None:
        pass

    def metadata(self) -> Metadata:
        """gRPC metadata that makes this span the parent of the callee's spans."""
        return ()

    def __enter__(self) -> Span:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.fail(f"{type(exc).__name__}: {exc}")
        self.end()


NO_SPAN = Span()


class RemoteParent:
    """The caller's span, read from incoming gRPC metadata or HTTP headers."""

    def __init__(self, context: object) -> None:
        self.context = context


Parent = Span | RemoteParent | None


class Tracer:
    """Tracing off: no span records anything, nothing is exported."""

    is_enabled = False

    def start_span(
        self,
        name: str,
        parent: Parent = None,
        kind: SpanKind = "internal",
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Span:
        return NO_SPAN

    def parent_from(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Parent:
        """The remote parent named by gRPC metadata or HTTP headers (W3C traceparent)."""
        return None

    def shutdown(self) -> None:
        """Export every ended span still queued, then stop exporting."""


NO_TRACER = Tracer()


def start_tracing(config: TracingConfig) -> Tracer:
    """The process's tracer: OpenTelemetry's when an endpoint is set, else NO_TRACER."""
    if not config.is_enabled:
        return NO_TRACER
    try:
        from splitserve.protocol.otel_tracing import OtelTracer
    except ImportError as exc:
        raise ValueError(
            f"--otlp-traces-endpoint needs OpenTelemetry ({exc.name} is missing): "
            "pip install 'splitserve[otel]'"
        ) from exc
    return OtelTracer(config)
