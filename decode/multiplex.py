"""`Decode.GenerateMany`: many requests' streams over one gRPC stream per router, and the
`Generate` stream of one request, both fed the same way.

With one `Generate` stream per request, every engine step costs one gRPC message per
running request on both ends (the node's event loop and the router's), which saturates
the message path long before the engine at a few hundred concurrent streams. Over
GenerateMany the router sends each request up the stream as it arrives (`StreamRequest`:
a GenerateRequest, or the id of a request whose client went away), and the node sends
down one `StepBatch` per wake-up of its event loop, holding every message its requests
produced since the previous batch: about one per engine step, whatever the batch size.

A request runs as `run(request, metadata, outbox)` (DecodeService.run): it is admitted in
its own task, then its messages reach `outbox.put` as `Pending` items from the engine's
output callback, with no task woken per request and step (a step's outputs for every
request arrive in one wake-up of the loop); `run` returns once it put its finished item.
A pending item becomes a GenerateResponse (`message()`) only when it is sent; one that
is still unsent when the request's next one comes is merged with it (`merge`), so a
reader that falls behind gets each request's tokens since its last message as one message.

Who calls what, on the node (`DecodeService.GenerateMany` runs `Multiplexer.serve`):
- a reader task takes the router's messages: each GenerateRequest starts a task that
  runs the request; a cancel cancels that task (which aborts the request, here and on its
  prefill node, as a cancelled Generate call does);
- `serve` yields the outbox as one StepBatch whenever it is not empty. A request refused
  or failed before its finished message ends with a `StreamEnd` carrying the status code
  its own Generate call would have ended with.
- When the router closes its side, `serve` ends once every request has ended; when the
  call is cancelled (router gone), every request task is cancelled.

`one_stream` serves `Generate` the same way, with a queue for the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import grpc

from splitserve.protocol import node_pb2 as pb

logger = logging.getLogger(__name__)

# gRPC metadata as a servicer context hands it over: (key, value) pairs.
Metadata = Sequence[tuple[str, str | bytes]] | None


class Pending(Protocol):
    """A request's message not sent yet."""

    @property
    def request_id(self) -> str: ...

    @property
    def finished(self) -> bool: ...

    def merge(self, later: Pending) -> Pending:
        """This item and the request's next one, as one."""
        ...

    def message(self) -> pb.GenerateResponse:
        """The message to send (called once, when it is sent)."""
        ...


class Outbox(Protocol):
    def put(self, item: Pending) -> None: ...


Run = Callable[[pb.GenerateRequest, Metadata, Outbox], Awaitable[None]]


class RequestRefused(Exception):
    """A request's stream ends with this gRPC status instead of its finished message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Multiplexer:
    def __init__(self, run: Run) -> None:
        self._run_request = run
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._outbox: dict[str, Pending] = {}
        self._ends: list[pb.StreamEnd] = []
        self._ready = asyncio.Event()
        self._reading = True

    def put(self, item: Pending) -> None:
        """A request's next message: sent with the next batch, merged into the request's
        unsent one if it has one."""
        rid = item.request_id
        unsent = self._outbox.get(rid)
        self._outbox[rid] = item if unsent is None else unsent.merge(item)
        self._ready.set()

    async def serve(self, requests: AsyncIterator[pb.StreamRequest]) -> AsyncIterator[pb.StepBatch]:
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while self._reading or self._tasks or self._outbox or self._ends:
                await self._ready.wait()
                self._ready.clear()
                if self._outbox or self._ends:
                    outbox, self._outbox = self._outbox, {}
                    responses = [item.message() for item in outbox.values()]
                    batch = pb.StepBatch(responses=responses, ends=self._ends)
                    self._ends = []
                    yield batch
        finally:
            reader.cancel()
            for task in list(self._tasks.values()):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self, requests: AsyncIterator[pb.StreamRequest]) -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "generate":
                    self._start(message.generate, tuple(message.trace_metadata.items()))
                elif kind == "cancel_request_id":
                    task = self._tasks.get(message.cancel_request_id)
                    if task is not None:
                        task.cancel()
        except Exception as exc:  # the call broke: serve() ends once the requests have
            logger.warning("multiplexed stream from the router broke: %s", exc)
        finally:
            self._reading = False
            self._ready.set()

    def _start(self, request: pb.GenerateRequest, metadata: Metadata) -> None:
        rid = request.request_id
        if rid in self._tasks:
            self._end(rid, grpc.StatusCode.INVALID_ARGUMENT, f"request id {rid!r} is in use")
            return
        task = asyncio.get_running_loop().create_task(self._run(request, metadata))
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._finished(rid, task))

    async def _run(self, request: pb.GenerateRequest, metadata: Metadata) -> None:
        rid = request.request_id
        outbox = _Tracked(self)
        try:
            await self._run_request(request, metadata, outbox)
        except RequestRefused as refused:
            self._end(rid, refused.code, refused.details)
            return
        except Exception as exc:
            logger.exception("request %s failed on its multiplexed stream", rid)
            self._end(rid, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        if not outbox.finished:
            self._end(rid, grpc.StatusCode.INTERNAL, "the request ended before its last token")

    def _end(self, rid: str, code: grpc.StatusCode, details: str) -> None:
        self._ends.append(pb.StreamEnd(request_id=rid, code=code.value[0], details=details))
        self._ready.set()

    def _finished(self, rid: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(rid) is task:
            del self._tasks[rid]
        self._ready.set()


class _Tracked:
    """One request's outbox on a Multiplexer: notes whether its finished item was put."""

    def __init__(self, target: Outbox) -> None:
        self._target = target
        self.finished = False

    def put(self, item: Pending) -> None:
        self.finished = self.finished or item.finished
        self._target.put(item)


class _Queue:
    """`one_stream`'s outbox: the request's items in order; None once `run` ended."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[Pending | None] = asyncio.Queue()

    def put(self, item: Pending | None) -> None:
        self.items.put_nowait(item)

    def take(self, first: Pending) -> tuple[Pending, bool]:
        """`first` merged with the items queued behind it (up to a finished one); True
        when the end of the run was among them."""
        ended = False
        while not first.finished and not self.items.empty():
            item = self.items.get_nowait()
            if item is None:
                ended = True
                break
            first = first.merge(item)
        return first, ended


async def one_stream(
    run: Run, request: pb.GenerateRequest, metadata: Metadata
) -> AsyncIterator[pb.GenerateResponse]:
    """`Generate`: the request's messages (merged while the caller falls behind); raises
    what `run` raised (RequestRefused). Closing the iterator early cancels the run."""
    outbox = _Queue()

    async def run_then_end() -> None:
        try:
            await run(request, metadata, outbox)
        finally:
            outbox.put(None)

    task = asyncio.get_running_loop().create_task(run_then_end())
    try:
        ended = False
        while not ended:
            first = await outbox.items.get()
            if first is None:
                break
            item, ended = outbox.take(first)
            yield item.message()
        await task  # re-raises what ended the run
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
