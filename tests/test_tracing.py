"""Tracing across router -> decode -> prefill (protocol/tracing.py, docs/operations.md).

The cluster test starts an OTLP/gRPC collector in this process (the TraceService of
opentelemetry-proto on a real gRPC server), points `splitserve up --otlp-traces-endpoint` at
it, sends one streaming chat request through the official `openai` client with a prompt
long enough to be prefilled remotely in several chunks, and stops the cluster. The export
delay is set far beyond the test, so every span arrives through the flush on shutdown. The
spans must form one trace over the three processes, each naming itself in its resource,
with the span tree of docs/operations.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections import defaultdict
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import openai
import pytest

from splitserve.launch.processes import ManagedProcess
from splitserve.protocol.tracing import (
    NO_SPAN,
    NO_TRACER,
    PREFILL_FALLBACK,
    REQUEST_ID,
    TracingConfig,
    parse_endpoint,
    start_tracing,
)

MODEL = "tiny"
PROMPT = " ".join(f"Lantern {i} glowed over the quiet harbour wall." for i in range(12))
CHUNK_TOKENS = 32
CLIENT_TRACE, CLIENT_SPAN = "5e1f" * 8, "c1" * 8


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    resource: dict[str, Any]
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    kind: int
    attributes: dict[str, Any]
    is_error: bool


def _values(pairs: Any) -> dict[str, Any]:
    out = {}
    for kv in pairs:
        field = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, field) if field else None
    return out


class Collector:
    """An OTLP/gRPC trace collector: keeps every exported span."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self._lock = threading.Lock()

    def export(self, request: Any) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = _values(resource_spans.resource.attributes)
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append(
                            ExportedSpan(
                                service=str(resource.get("service.name")),
                                resource=resource,
                                name=span.name,
                                trace_id=span.trace_id,
                                span_id=span.span_id,
                                parent_id=span.parent_span_id,
                                kind=span.kind,
                                attributes=_values(span.attributes),
                                is_error=span.status.code == span.status.STATUS_CODE_ERROR,
                            )
                        )


@pytest.fixture
def collector():
    pytest.importorskip("opentelemetry.sdk", reason="needs the otel extra: make install")
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

    store = Collector()

    class TraceService(ts_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            store.export(request)
            return ts.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ts_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield store, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.mark.slow
def test_one_request_is_one_trace_over_three_processes(tiny_llama, collector) -> None:
    store, endpoint = collector
    up = ManagedProcess.splitserve(
        "up",
        *("up", "--model", str(tiny_llama), "--served-model-name", MODEL, "--port", "0"),
        *("--cpu", "--otlp-traces-endpoint", endpoint, "--disagg-min-tokens", "0"),
        "--node-arg=--dtype=float32",
        "--node-arg=--num-blocks=64",
        f"--node-arg=--max-num-batched-tokens={CHUNK_TOKENS}",
        ready_pattern=re.compile(r"OpenAI API: (\S+)/v1"),
        # Nothing is exported before shutdown: the spans must come with the flush.
        env={"OTEL_BSP_SCHEDULE_DELAY": "600000"},
    ).start(timeout_s=240)
    try:
        client = openai.OpenAI(
            base_url=f"{up.address}/v1", api_key="unused", max_retries=0, timeout=120
        )
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=4,
            temperature=0,
            stream=True,
            # The client's own trace goes on through the cluster.
            extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert store.spans == []  # still queued in each process
    finally:
        assert up.stop(timeout_s=60) == 0
    _check_trace(store.spans)


def _check_trace(spans: list[ExportedSpan]) -> None:
    assert {s.service for s in spans} == {
        "splitserve-router",
        "splitserve-decode",
        "splitserve-prefill",
    }
    assert {s.trace_id.hex() for s in spans} == {CLIENT_TRACE}, "one request, one trace"
    by_name: dict[str, list[ExportedSpan]] = defaultdict(list)
    for span in spans:
        by_name[span.name].append(span)
    one = {name: group[0] for name, group in by_name.items() if len(group) == 1}
    request = one["POST /v1/chat/completions"]
    assert request.parent_id.hex() == CLIENT_SPAN and request.service == "splitserve-router"
    assert request.attributes["http.response.status_code"] == 200
    route, generate = one["route"], by_name["generate"]
    assert route.parent_id == request.span_id
    assert route.attributes["splitserve.prefill.remote"] is True
    assert len(generate) == 1 and generate[0].parent_id == request.span_id
    router_stream = _only(by_name["stream"], "splitserve-router")
    assert router_stream.parent_id == generate[0].span_id
    assert router_stream.attributes["splitserve.num_messages"] >= 1 and not router_stream.is_error
    decode = one["Decode.Generate"]
    assert decode.service == "splitserve-decode" and decode.parent_id == generate[0].span_id
    assert (
        decode.attributes["splitserve.request_id"]
        == generate[0].attributes["splitserve.request_id"]
    )
    assert decode.attributes["splitserve.prefill.remote"] is True
    assert decode.attributes["splitserve.prefill.fallback"] is False
    assert decode.attributes["splitserve.prompt_tokens"] > 2 * CHUNK_TOKENS
    _check_node_spans(by_name, decode)
    _check_resources(spans)


def _only(spans: list[ExportedSpan], service: str) -> ExportedSpan:
    (span,) = [s for s in spans if s.service == service]
    return span


def _check_node_spans(by_name: dict[str, list[ExportedSpan]], decode: ExportedSpan) -> None:
    (rpc,) = by_name["prefill rpc"]
    (admission,) = by_name["admission"]
    decode_stream = _only(by_name["stream"], "splitserve-decode")
    for child in (rpc, admission, decode_stream):
        assert child.service == "splitserve-decode" and child.parent_id == decode.span_id
    assert admission.attributes["splitserve.prefill.remote"] is True
    (prefill,) = by_name["Prefill.Prefill"]
    assert prefill.service == "splitserve-prefill" and prefill.parent_id == rpc.span_id
    assert prefill.attributes["splitserve.request_id"] == decode.attributes["splitserve.request_id"]
    assert prefill.attributes["splitserve.role"] == "prefill"
    pushes = sorted(by_name["kv push"], key=lambda s: s.attributes["splitserve.chunk.index"])
    assert len(pushes) >= 3, "a prompt of several chunks is pushed chunk by chunk"
    assert [p.attributes["splitserve.chunk.index"] for p in pushes] == list(range(len(pushes)))
    assert all(p.parent_id == prefill.span_id for p in pushes)
    assert all(p.attributes["splitserve.chunk.bytes"] > 0 for p in pushes[:-1])
    assert prefill.attributes["splitserve.num_chunks"] == len(pushes)


def _check_resources(spans: list[ExportedSpan]) -> None:
    nodes = {s.service: s.resource for s in spans}
    for role in ("decode", "prefill"):
        resource = nodes[f"splitserve-{role}"]
        assert resource["splitserve.role"] == role
        assert resource["service.instance.id"].startswith(role)
    assert nodes["splitserve-router"]["splitserve.role"] == "router"
    decode_ids = {
        s.attributes.get("splitserve.node_id") for s in spans if s.name == "Decode.Generate"
    }
    assert decode_ids == {nodes["splitserve-decode"]["service.instance.id"]}


def test_context_crosses_by_metadata_and_outcomes_are_recorded(collector) -> None:
    from splitserve.decode.generate_spans import GenerateSpans
    from splitserve.decode.remote_prefill import RemotePrefillInfo, TransferMetrics

    store, endpoint = collector
    router = start_tracing(TracingConfig(endpoint, "splitserve-router", role="router"))
    decode = start_tracing(TracingConfig(endpoint, "splitserve-decode", "decode-x", "decode"))
    caller = router.start_span("generate", kind="client")
    spans = GenerateSpans(decode, decode.parent_from(caller.metadata()), {REQUEST_ID: "r1"})
    spans.on_plan()
    fallback = TransferMetrics(False, True, "prefill-y", 0.5, RemotePrefillInfo(), 0.0)
    spans.on_admitted(fallback)
    spans.on_admitted(fallback)  # reported once
    spans.on_first_token()
    spans.finish(3, None)
    cut = GenerateSpans(decode, None, {REQUEST_ID: "r2"})  # ends before its KV landed
    cut.on_plan()
    cut.finish(0, "ended before its last token")
    caller.end()
    router.shutdown()
    decode.shutdown()
    by_id = {s.attributes.get(REQUEST_ID): s for s in store.spans if s.name == "Decode.Generate"}
    (generate,) = [s for s in store.spans if s.name == "generate"]
    assert by_id["r1"].trace_id == generate.trace_id
    assert by_id["r1"].parent_id == generate.span_id and not by_id["r1"].is_error
    assert by_id["r1"].attributes[PREFILL_FALLBACK] is True
    admissions = {s.parent_id: s for s in store.spans if s.name == "admission"}
    assert len(admissions) == 2
    assert admissions[by_id["r1"].span_id].attributes[PREFILL_FALLBACK] is True
    assert not admissions[by_id["r1"].span_id].is_error
    assert admissions[by_id["r2"].span_id].is_error and by_id["r2"].is_error
    assert by_id["r2"].trace_id != generate.trace_id and by_id["r2"].parent_id == b""


def test_endpoint_forms() -> None:
    assert parse_endpoint("http://127.0.0.1:4317") == ("127.0.0.1:4317", True)
    assert parse_endpoint("grpc://collector:4317") == ("collector:4317", True)
    assert parse_endpoint("collector:4317") == ("collector:4317", True)
    assert parse_endpoint("https://collector.example:443") == ("collector.example:443", False)
    assert parse_endpoint("http://[::1]:4317") == ("[::1]:4317", True)
    for bad in ("http://collector", "ftp://c:1", "http://c:4317/v1/traces", "c:notaport"):
        with pytest.raises(ValueError, match="otlp-traces-endpoint"):
            parse_endpoint(bad)


def test_tracing_off_is_a_no_op() -> None:
    config = TracingConfig()
    assert not config.is_enabled
    span = NO_TRACER.start_span("x", NO_SPAN, "server", {"a": 1})
    assert span is NO_SPAN and span.metadata() == ()
    assert (
        NO_TRACER.parent_from([("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]) is None
    )


def test_without_endpoint_no_process_loads_the_tracing_sdk() -> None:
    # (The redis client loads parts of the OpenTelemetry API and metrics SDK by itself.)
    code = (
        "import sys\n"
        "import splitserve.router.app, splitserve.decode.service, splitserve.prefill.service\n"
        "import splitserve.launch.cli\n"
        "from splitserve.protocol.tracing import TracingConfig, start_tracing\n"
        "start_tracing(TracingConfig()).start_span('x').end()\n"
        "print(sorted(m for m in sys.modules if m.startswith(\n"
        "    ('opentelemetry.sdk.trace', 'opentelemetry.exporter', 'splitserve.protocol.otel')\n"
        ")))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]"


def test_bad_endpoint_is_a_one_line_error() -> None:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "splitserve.launch.cli", "router", "--redis", "redis://x:1/0"),
            *("--tokenizer", "dummy:llama-3.1-8b", "--otlp-traces-endpoint", "http://nohost"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("splitserve router: error: --otlp-traces-endpoint")
    assert len(out.stderr.strip().splitlines()) == 1
