"""The router's end of `Decode.GenerateMany` (decode/multiplex.py): one gRPC stream per
decode node carries every request the router sends there.

Who calls what: `NodeClients.open_generate(node, request, metadata, on_item)` (what
router/generation.py's `_forward` calls) opens the request on its node's `NodeStream`
(`NodeStream.open(request, metadata, on_item)`) and returns its `MultiplexedCall`. The
consumer `on_item` is fixed when the call is made, before the request is even queued for
sending, so no message can come before there is someone to take it: the stream's reader
hands it every item (each message, then the error that ended the request, if any) as it
takes it off the stream, in the reader's own callback: no task is woken per message. A
finished message or an `AioRpcError` (a StreamEnd for the request, or the stream's own
failure) is the last item and closes the request on the stream; an exception `on_item`
raises is logged and costs no other request its messages. `call.cancel()` tells the node
the client went away. Behind it, `NodeStream` (one per node address):
- opens the GenerateMany call on first use and reopens it after it broke;
- a writer task sends queued StreamRequests in order (gRPC allows one write at a time);
- a reader task hands each StepBatch's messages to their requests' consumers, and a
  StreamEnd to its request as the AioRpcError its own Generate call would have raised;
- when the call breaks (the node died or restarted, keepalive found it frozen), every
  request open on it gets the call's error, as each of their Generate calls would have.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# What a request's consumer is handed: its messages, then the error that ended it (if any).
Item: TypeAlias = "pb.GenerateResponse | grpc.aio.AioRpcError"
# A request's consumer, called on the event loop from the stream's reader.
OnItem: TypeAlias = "Callable[[Item], None]"


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _status_code(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)


class MultiplexedCall:
    """One request's stream over its node's GenerateMany call; `on_item` consumes it."""

    def __init__(self, stream: NodeStream, request_id: str, on_item: OnItem) -> None:
        self._stream = stream
        self.request_id = request_id
        self._on_item = on_item
        self._ended = False

    def put(self, item: Item) -> None:
        """The stream's reader: the request's next message, or the error that ended it."""
        if self._ended:
            return
        if isinstance(item, grpc.aio.AioRpcError) or item.finished:
            self._ended = True
            self._stream.close_request(self.request_id)
        try:
            self._on_item(item)
        except Exception:  # one request's bug must not cost the others their messages
            logger.exception("consumer of request %s failed", self.request_id)

    def cancel(self) -> None:
        """The client went away: the node aborts the request (if still open there)."""
        if not self._ended:
            self._ended = True
            self._stream.cancel_request(self.request_id)


class NodeStream:
    """The GenerateMany call to one decode node, shared by every request sent there."""

    def __init__(self, stub: pb_grpc.DecodeStub) -> None:
        self._stub = stub
        self._calls: dict[str, MultiplexedCall] = {}
        self._outgoing: asyncio.Queue[pb.StreamRequest | None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def open(
        self,
        request: pb.GenerateRequest,
        metadata: tuple[tuple[str, str], ...],
        on_item: OnItem,
    ) -> MultiplexedCall:
        """Send `request` on the stream; `on_item` gets each of its items from now on."""
        call = MultiplexedCall(self, request.request_id, on_item)
        self._calls[request.request_id] = call
        message = pb.StreamRequest(generate=request, trace_metadata=dict(metadata))
        self._send(message)
        return call

    def close_request(self, request_id: str) -> None:
        self._calls.pop(request_id, None)

    def cancel_request(self, request_id: str) -> None:
        if self._calls.pop(request_id, None) is not None and self._outgoing is not None:
            self._outgoing.put_nowait(pb.StreamRequest(cancel_request_id=request_id))

    def _send(self, message: pb.StreamRequest) -> None:
        if self._outgoing is None:
            self._outgoing = asyncio.Queue()
            grpc_call = self._stub.GenerateMany()
            self._spawn(self._write(grpc_call, self._outgoing))
            self._spawn(self._read(grpc_call, self._outgoing))
        self._outgoing.put_nowait(message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(
        self, grpc_call: Any, outgoing: asyncio.Queue[pb.StreamRequest | None]
    ) -> None:
        try:
            while (message := await outgoing.get()) is not None:
                await grpc_call.write(message)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            logger.debug("GenerateMany write ended: %s", exc)  # the reader reports the error

    async def _read(self, grpc_call: Any, outgoing: asyncio.Queue[pb.StreamRequest | None]) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            async for batch in grpc_call:
                self._deliver(batch)
        except grpc.aio.AioRpcError as exc:
            error = exc
        if error is None:
            error = _rpc_error(
                grpc.StatusCode.UNAVAILABLE, "the node closed its GenerateMany stream"
            )
        if self._outgoing is outgoing:
            self._outgoing = None  # the next request opens a new call
        outgoing.put_nowait(None)
        for call in list(self._calls.values()):
            call.put(error)
        self._calls.clear()

    def _deliver(self, batch: pb.StepBatch) -> None:
        for msg in batch.responses:
            call = self._calls.get(msg.request_id)
            if call is not None:
                call.put(msg)
        for end in batch.ends:
            call = self._calls.get(end.request_id)
            if call is not None:
                call.put(_rpc_error(_status_code(end.code), end.details))

    async def close(self) -> None:
        if self._outgoing is not None:
            self._outgoing.put_nowait(None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
