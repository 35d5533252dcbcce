"""The Tracer of protocol/tracing.py on the OpenTelemetry SDK (the `otel` extra).

Imported only by `start_tracing` when `--otlp-traces-endpoint` is set. One TracerProvider per
process, owned here and never installed as OpenTelemetry's global one; its resource names
the process (service.name, service.instance.id, splitserve.role; OTEL_RESOURCE_ATTRIBUTES
adds to it). Ended spans go through a BatchSpanProcessor (batch size and delay from the
standard OTEL_BSP_* variables) to an OTLPSpanExporter over gRPC; `shutdown` flushes it.
Context crosses processes as W3C trace context (`traceparent`, `tracestate`) in gRPC metadata
and HTTP headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from splitserve.protocol.tracing import (
    AttributeValue,
    Metadata,
    Parent,
    RemoteParent,
    Span,
    SpanKind,
    Tracer,
    TracingConfig,
    parse_endpoint,
)

_KINDS = {
    "internal": trace.SpanKind.INTERNAL,
    "server": trace.SpanKind.SERVER,
    "client": trace.SpanKind.CLIENT,
}
_PROPAGATOR = TraceContextTextMapPropagator()


class OtelSpan(Span):
    is_recording = True

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def set(self, key: str, value: AttributeValue) -> None:
        self.span.set_attribute(key, value)

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        self.span.add_event(name, dict(attributes or {}))

    def fail(self, message: str) -> None:
        self.span.set_status(trace.Status(trace.StatusCode.ERROR, message))

    def end(self) -> None:
        self.span.end()

    def metadata(self) -> Metadata:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self.span))
        return tuple(carrier.items())


class OtelTracer(Tracer):
    is_enabled = True

    def __init__(self, config: TracingConfig) -> None:
        endpoint = parse_endpoint(config.endpoint)
        attributes = {"service.name": config.service_name, **config.extra_resource}
        if config.instance_id:
            attributes["service.instance.id"] = config.instance_id
        if config.role:
            attributes["splitserve.role"] = config.role
        self.provider = TracerProvider(resource=Resource.create(attributes))
        exporter = OTLPSpanExporter(
            endpoint=endpoint.address,
            insecure=endpoint.is_insecure,
            timeout=config.export_timeout_s,
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("splitserve")

    def start_span(
        self,
        name: str,
        parent: Parent = None,
        kind: SpanKind = "internal",
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Span:
        return OtelSpan(
            self.tracer.start_span(
                name,
                context=_context_of(parent),
                kind=_KINDS[kind],
                attributes=dict(attributes or {}),
            )
        )

    def parent_from(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Parent:
        carrier = {key.lower(): value for key, value in metadata or () if isinstance(value, str)}
        if "traceparent" not in carrier:
            return None
        return RemoteParent(_PROPAGATOR.extract(carrier))

    def shutdown(self) -> None:
        self.provider.shutdown()


def _context_of(parent: Parent) -> Context | None:
    """The OpenTelemetry context a child of `parent` starts in (None: a new trace)."""
    if isinstance(parent, OtelSpan):
        return trace.set_span_in_context(parent.span)
    if isinstance(parent, RemoteParent) and isinstance(parent.context, Context):
        return parent.context
    # No parent, or the no-op span (tracing was off where it was made): a new trace, never
    # the ambient context (spans here are parented explicitly).
    return Context()
