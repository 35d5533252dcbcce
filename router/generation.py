"""One decode stream per prompt (over the node's `Decode.GenerateMany`, or its own
`Decode.Generate` call: `NodeClients.open_generate`), merged into one sequence of messages.

Who calls what, in what order (a handler of /v1/completions or /v1/chat/completions):

    streams = PromptStreams(service, prepared)
    await streams.start()          # routes every prompt, opens its stream, waits for the
                                   # first message of each: raises APIError (503 when no node
                                   # can serve, or the node failed before its first message)
    async for item in streams:     # (prompt index, GenerateResponse) until all finished;
        ...                        # raises APIError when a node fails mid-stream
                                   # (or `await streams.next_items()`: a batch at a time,
                                   # [] at the end; the SSE handler's way)
    await streams.aclose()         # always (finally): cancels what still runs

Each attempt of a prompt relays its node stream's messages into the request's mailbox
(router/mailbox.py) as they come (`_Relay`): over a multiplexed stream the stream's reader
calls `_Relay.take` directly (the consumer given to `open_generate`, fixed before any
message can come), and the attempt's task only waits for the stream's end or its
silence; over a `Generate` call the task reads each message and hands it on. The handler
takes what came in batches (`next_items`: everything since its last take, one item per
prompt).

A prompt whose stream ends without its `finished` message (client gone, error, cancel) has
its gRPC call cancelled and `Decode.Abort` sent for its request id; the decode node passes
the abort on to the prefill node.

Liveness: a stream silent for `first_message_timeout_s` before its first message, or for
`stream_idle_timeout_s` after it, is stalled; gRPC keepalive fails a frozen node's streams
with UNAVAILABLE sooner. An unreachable or stalled node is left out of routing for
`suspect_s`; before the first message the prompt is re-routed once to another node, after
it the request ends with an error (an SSE error event when streaming).

Tracing: under the HTTP request's span, each attempt of a prompt is a "route" span (the
decision) and a "generate" (client) span around its Decode.Generate call, whose context
goes to the decode node in the call's metadata; "stream" under it runs from the first
message to the last.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from splitserve.node.registry import NodeId
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol.messages import sampling_params_to_proto
from splitserve.protocol.tracing import (
    DECODE_NODE_ID,
    NO_SPAN,
    PREFILL_NODE_ID,
    PREFILL_REMOTE,
    PROMPT_TOKENS,
    REQUEST_ID,
    AttributeValue,
    Span,
)
from splitserve.router.coalesce import StreamItem, coalesce
from splitserve.router.config import RouterConfig
from splitserve.router.errors import APIError, from_grpc_error
from splitserve.router.mailbox import Mailbox
from splitserve.router.multiplex import MultiplexedCall
from splitserve.router.policy import RouteDecision
from splitserve.router.prepare import PreparedRequest
from splitserve.router.service import RouterService

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 2


class _StreamFailed(Exception):
    def __init__(self, error: grpc.aio.AioRpcError, received_any: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.received_any = received_any


class _StreamStalled(Exception):
    def __init__(self, silent_s: float, received_any: bool) -> None:
        super().__init__(f"no message for {silent_s:.1f} s")
        self.silent_s = silent_s
        self.received_any = received_any


def _stalled_error(node: NodeId, stalled: _StreamStalled) -> APIError:
    when = "after its first token" if stalled.received_any else "before its first token"
    return APIError(
        503,
        f"decode node {node} stopped answering {when} (silent for {stalled.silent_s:.1f} s); "
        "retry the request",
        code="node_unresponsive",
    )


class PromptStreams:
    def __init__(
        self, service: RouterService, prepared: PreparedRequest, span: Span = NO_SPAN
    ) -> None:
        self.service = service
        self.prepared = prepared
        # The HTTP request's span: parent of each attempt's "route" and "generate" spans.
        self.span = span
        self._mailbox: Mailbox[StreamItem] = Mailbox()
        self._buffer: list[StreamItem] = []
        self._num_finished = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._last_token_s: dict[int, float] = {}
        self.first_token_s: float | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run_guarded(i)) for i in range(len(self.prepared.prompts))
        ]
        waiting = set(range(len(self.prepared.prompts)))
        while waiting:
            for item in await self._mailbox.take_all():
                if waiting and item.error is not None:
                    raise item.error
                self._buffer.append(item)
                waiting.discard(item.prompt_index)

    async def next_items(self) -> list[StreamItem]:
        """What came since the last call, coalesced to one item per prompt
        (router/coalesce.py); [] once every prompt finished. A prompt's error is raised
        after the items that came before it have been returned."""
        if self._num_finished >= len(self.prepared.prompts):
            return []
        pending, self._buffer = self._buffer, []
        if not pending:
            pending = await self._mailbox.take_all()
        items = coalesce(pending)
        for n, item in enumerate(items):
            if item.error is not None:
                if n == 0:
                    raise item.error
                self._buffer = items[n:]
                return items[:n]
            self._observe(item)
            msg = item.message
            if msg is not None and msg.finished:
                self._num_finished += 1
        return items

    async def __aiter__(self) -> AsyncIterator[StreamItem]:
        """`next_items`, one item at a time."""
        while items := await self.next_items():
            for item in items:
                yield item

    def deliver(self, item: StreamItem) -> None:
        """A prompt's next message (its attempt's relay, on the event loop)."""
        self._mailbox.put(item)

    async def aclose(self) -> None:
        running = [t for t in self._tasks if not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    def _observe(self, item: StreamItem) -> None:
        msg = item.message
        if msg is None or not any(d.token_ids for d in msg.deltas):
            return
        now = time.perf_counter()
        metrics = self.service.metrics
        if self.first_token_s is None:
            self.first_token_s = now
            metrics.ttft.observe(now - self.prepared.arrival_s)
        last = self._last_token_s.get(item.prompt_index)
        if last is not None:
            metrics.itl.observe(now - last)
        self._last_token_s[item.prompt_index] = now

    async def _run_guarded(self, index: int) -> None:
        try:
            await self._run(index)
        except APIError as exc:
            self.deliver(StreamItem(index, None, exc))
        except Exception as exc:
            logger.exception("prompt %d of %s failed", index, self.prepared.request_id)
            error = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
            self.deliver(StreamItem(index, None, error))

    async def _run(self, index: int) -> None:
        excluded: set[NodeId] = set()
        retry_error: APIError | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                decision = await self._route(index, attempt, frozenset(excluded))
            except APIError:
                if retry_error is not None:
                    raise retry_error from None  # no other node: the first node's error
                raise
            retry_error = await self._attempt(index, decision, attempt + 1 < MAX_ATTEMPTS)
            if retry_error is None:
                return
            excluded.add(decision.decode.node_id)
        if retry_error is not None:
            raise retry_error

    async def _route(self, index: int, attempt: int, excluded: frozenset[NodeId]) -> RouteDecision:
        prompt = self.prepared.prompts[index]
        attributes = {"splitserve.prompt_index": index, "splitserve.attempt": attempt}
        with self.service.tracer.start_span("route", self.span, attributes=attributes) as span:
            span.set(PROMPT_TOKENS, len(prompt))
            decision = await self.service.route(
                self.prepared.model, prompt, self.prepared.n, excluded
            )
            span.set_many(
                {
                    DECODE_NODE_ID: decision.decode.node_id,
                    PREFILL_REMOTE: decision.prefill is not None,
                    PREFILL_NODE_ID: decision.prefill.node_id if decision.prefill else "",
                    "splitserve.decode.cached_tokens": decision.decode_cached_tokens,
                    "splitserve.prefill.cached_tokens": decision.prefill_cached_tokens,
                    "splitserve.route.reason": decision.reason,
                }
            )
            return decision

    async def _attempt(
        self, index: int, decision: RouteDecision, can_retry: bool
    ) -> APIError | None:
        """Stream one prompt from one node: None when done, the error to re-route on, or
        raises the error the client gets."""
        node = decision.decode.node_id
        try:
            await self._stream(index, decision)
            return None
        except _StreamStalled as stalled:
            self.service.suspect(node)
            if stalled.received_any or not can_retry:
                raise _stalled_error(node, stalled) from stalled
            logger.warning("decode node %s is silent (%s); re-routing", node, stalled)
            return _stalled_error(node, stalled)
        except _StreamFailed as failed:
            exc = failed.error
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise from_grpc_error(exc, node) from exc
            self.service.suspect(node)
            if failed.received_any or not can_retry:
                raise from_grpc_error(exc, node) from exc
            logger.warning("decode node %s unavailable (%s); re-routing", node, exc.details())
            return from_grpc_error(exc, node)

    def _generate_request(self, index: int, decision: RouteDecision) -> pb.GenerateRequest:
        request = pb.GenerateRequest(
            request_id=f"{self.prepared.request_id}-{index}-{secrets.token_hex(3)}",
            prompt_token_ids=self.prepared.prompts[index],
            sampling_params=sampling_params_to_proto(self.prepared.params[index]),
            stream_options=pb.StreamOptions(
                include_usage=True, continuous_usage_stats=self.prepared.continuous_usage
            ),
            trace_timing=self.service.config.trace_stream_timing,
        )
        if decision.prefill is not None:
            request.prefill_node.CopyFrom(
                pb.NodeEndpoint(
                    node_id=decision.prefill.node_id, grpc_address=decision.prefill.grpc_address
                )
            )
        return request

    async def _next_message(
        self, call: grpc.aio.UnaryStreamCall[Any, Any], received_any: bool
    ) -> pb.GenerateResponse | None:
        """The stream's next message (None at its end); _StreamStalled past the deadline."""
        config = self.service.config
        timeout_s = config.stream_idle_timeout_s if received_any else config.first_message_timeout_s
        try:
            msg = await asyncio.wait_for(call.read(), timeout_s)
        except TimeoutError as exc:
            raise _StreamStalled(timeout_s, received_any) from exc
        if msg is grpc.aio.EOF:
            return None
        response: pb.GenerateResponse = msg
        return response

    async def _stream(self, index: int, decision: RouteDecision) -> None:
        """Forward one node stream to the mailbox, under a "generate" (client) span."""
        request = self._generate_request(index, decision)
        attributes: dict[str, AttributeValue] = {
            REQUEST_ID: request.request_id,
            DECODE_NODE_ID: decision.decode.node_id,
            PREFILL_REMOTE: decision.prefill is not None,
        }
        tracer = self.service.tracer
        with tracer.start_span("generate", self.span, "client", attributes) as span:
            await self._forward(index, decision, request, span)

    async def _forward(
        self, index: int, decision: RouteDecision, request: pb.GenerateRequest, span: Span
    ) -> None:
        """Forward one node stream to the mailbox; abort on the node unless it finished."""
        service, prefill = self.service, decision.prefill
        relay = _Relay(self, index, decision, span)
        call = service.clients.open_generate(decision.decode, request, span.metadata(), relay.take)
        service.track(decision.decode)
        if prefill is not None:
            service.track(prefill)
        is_unreachable = False
        try:
            if isinstance(call, MultiplexedCall):
                await relay.until_done(service.config)
            else:
                while not relay.is_finished:
                    msg = await self._next_message(call, relay.received_any)
                    if msg is None:
                        break
                    relay.take(msg)
            if not relay.is_finished:
                raise APIError(
                    502,
                    f"decode node {decision.decode.node_id} ended the stream of "
                    f"{request.request_id} without a final message",
                    code="node_error",
                )
        except grpc.aio.AioRpcError as exc:
            is_unreachable = not relay.received_any and exc.code() == grpc.StatusCode.UNAVAILABLE
            raise _StreamFailed(exc, relay.received_any) from exc
        finally:
            relay.end_span()
            service.untrack(decision.decode)
            if prefill is not None and not relay.received_any:
                service.untrack(prefill)
            if not relay.is_finished:
                call.cancel()
                if not is_unreachable:
                    service.clients.abort_soon(decision.decode, [request.request_id])


class _Relay:
    """One attempt's messages into its PromptStreams' mailbox, each as it arrives: from the
    multiplexed stream's reader (`take` is its consumer: no task woken per message) or
    from the loop over a Generate call's reads. `until_done` waits for the last message or
    the error that ends the stream, and raises `_StreamStalled` past the silence allowed."""

    def __init__(
        self, streams: PromptStreams, index: int, decision: RouteDecision, span: Span
    ) -> None:
        self._streams = streams
        self._index = index
        self._decision = decision
        self._span = span
        self._stream_span: Span = NO_SPAN
        self._done = asyncio.Event()
        self._error: grpc.aio.AioRpcError | None = None
        self._last_s = time.monotonic()
        self.received_any = False
        self.is_finished = False
        self.num_messages = 0

    def take(self, item: pb.GenerateResponse | grpc.aio.AioRpcError) -> None:
        self._last_s = time.monotonic()
        if isinstance(item, grpc.aio.AioRpcError):
            self._error = item
            self._done.set()
            return
        service = self._streams.service
        if not self.received_any:
            self._stream_span = service.tracer.start_span("stream", self._span)
            if self._decision.prefill is not None:
                service.untrack(self._decision.prefill)
        self.received_any, self.num_messages = True, self.num_messages + 1
        received = 0.0
        if item.HasField("timing"):
            received = self._last_s
            service.metrics.observe_node_timing(item.timing, received)
        if item.finished and item.HasField("metrics"):
            service.metrics.observe_request_metrics(item.metrics)
        self._streams.deliver(StreamItem(self._index, item, None, received))
        if item.finished:
            self.is_finished = True
            self._done.set()

    async def until_done(self, config: RouterConfig) -> None:
        while not self._done.is_set():
            allowed_s = (
                config.stream_idle_timeout_s
                if self.received_any
                else config.first_message_timeout_s
            )
            left_s = self._last_s + allowed_s - time.monotonic()
            if left_s <= 0:
                raise _StreamStalled(allowed_s, self.received_any)
            try:
                await asyncio.wait_for(self._done.wait(), left_s)
            except TimeoutError:
                continue  # a message may have come meanwhile: the deadline moved
        if self._error is not None:
            raise self._error

    def end_span(self) -> None:
        self._stream_span.set("splitserve.num_messages", self.num_messages)
        if not self.is_finished:
            self._stream_span.fail("the stream ended before its final message")
        self._stream_span.end()
