"""GenerateSpans: the spans of one `Decode.Generate` call (protocol/tracing.py).

decode/service.py drives it, on the event loop, in this order:

    spans = GenerateSpans(tracer, parent, attributes)  # "Decode.Generate" (server) opens,
                                                       # child of the router's "generate"
    spans.on_plan()          # remote prefill: blocks allocated; "admission" opens
    spans.prefill_call(...)  # "prefill rpc" (client): its metadata() goes to Prefill
    spans.on_admitted(...)   # the KV landed (remote) or the node fell back to local prefill:
                             # "admission" ends with the outcome
    spans.on_first_token()   # "stream" opens
    spans.finish(...)        # "stream" and "Decode.Generate" end (any open span ends here,
                             # marked failed, when the call ends early)

With tracing off every span is the shared no-op one.
"""

from __future__ import annotations

from collections.abc import Mapping

from splitserve.decode.remote_prefill import TransferMetrics
from splitserve.protocol.tracing import (
    NO_SPAN,
    PREFILL_FALLBACK,
    PREFILL_NODE_ID,
    PREFILL_REMOTE,
    AttributeValue,
    Parent,
    Span,
    Tracer,
)


class GenerateSpans:
    def __init__(
        self, tracer: Tracer, parent: Parent, attributes: Mapping[str, AttributeValue]
    ) -> None:
        self.tracer = tracer
        self.rpc = tracer.start_span("Decode.Generate", parent, "server", attributes)
        self.admission = NO_SPAN
        self.stream = NO_SPAN
        self._is_admitted = False

    def on_plan(self) -> None:
        if not self._is_admitted:
            self.admission = self.tracer.start_span("admission", self.rpc)

    def prefill_call(self, prefill_node_id: str) -> Span:
        """The client span of the Prefill RPC (the caller ends it)."""
        return self.tracer.start_span(
            "prefill rpc", self.rpc, "client", {PREFILL_NODE_ID: prefill_node_id}
        )

    def on_admitted(self, metrics: TransferMetrics) -> None:
        if self._is_admitted:
            return
        self._is_admitted = True
        outcome = {
            PREFILL_REMOTE: metrics.is_prefill_remote,
            PREFILL_FALLBACK: metrics.is_prefill_fallback,
            "splitserve.transfer_time_s": metrics.transfer_time_s,
        }
        self.rpc.set_many(outcome)
        self.admission.set_many(outcome)
        self.admission.end()

    def on_first_token(self) -> None:
        if self.stream is NO_SPAN:
            self.stream = self.tracer.start_span("stream", self.rpc)

    def finish(self, num_completion_tokens: int, error: str | None) -> None:
        if not self._is_admitted:
            self._is_admitted = True
            self.admission.fail("the request ended before its KV landed")
            self.admission.end()
        self.stream.set("splitserve.completion_tokens", num_completion_tokens)
        self.rpc.set("splitserve.completion_tokens", num_completion_tokens)
        if error is not None:
            self.stream.fail(error)
            self.rpc.fail(error)
        self.stream.end()
        self.rpc.end()
