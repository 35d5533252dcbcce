"""`Decode.GenerateMany`: many requests' streams over one gRPC stream per router.

With one `Generate` stream per request, every engine step costs one gRPC message per
running request on both ends (the node's event loop and the router's), which saturates
the message path long before the engine at a few hundred concurrent streams. Over
GenerateMany the router sends each request up the stream as it arrives (`StreamRequest`:
a GenerateRequest, or the id of a request whose client went away), and the node sends
down one `StepBatch` per wake-up of its event loop, holding every message its requests
produced since the previous batch: about one per engine step, whatever the batch size.

Who calls what, on the node (`DecodeService.GenerateMany` runs `Multiplexer.serve`):
- a reader task takes the router's messages: each GenerateRequest starts a task that
  runs the request exactly as `Generate` would (`DecodeService.responses`) and appends its
  messages to the outbox; a cancel cancels that task (which aborts the request, here and
  on its prefill node, as a cancelled Generate call does);
- `serve` yields the outbox as one StepBatch whenever it is not empty. A request refused
  or failed before its finished message ends with a `StreamEnd` carrying the status code
  its own Generate call would have ended with.
- A request's task waits until the batch holding its message is written before it takes
  its next output from the engine, so that a router that falls behind gets each request's
  tokens since the last batch merged into one message (`AsyncEngine.generate` merges what
  queued up), as a slow Generate call does, and the outbox holds at most one message per
  request.
- When the router closes its side, `serve` ends once every request has ended; when the
  call is cancelled (router gone), every request task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

import grpc

from splitserve.protocol import node_pb2 as pb

logger = logging.getLogger(__name__)

# gRPC metadata as a servicer context hands it over: (key, value) pairs.
Metadata = Sequence[tuple[str, str | bytes]] | None
Responses = Callable[[pb.GenerateRequest, Metadata], AsyncGenerator[pb.GenerateResponse, None]]


class RequestRefused(Exception):
    """A request's stream ends with this gRPC status instead of its finished message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Multiplexer:
    def __init__(self, responses: Responses) -> None:
        self._responses = responses
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._outbox: list[pb.GenerateResponse] = []
        self._ends: list[pb.StreamEnd] = []
        self._ready = asyncio.Event()
        self._reading = True
        # Resolved once the batch holding the current outbox is written.
        self._flushed = self._loop_future()

    async def serve(self, requests: AsyncIterator[pb.StreamRequest]) -> AsyncIterator[pb.StepBatch]:
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while self._reading or self._tasks or self._outbox or self._ends:
                await self._ready.wait()
                self._ready.clear()
                if self._outbox or self._ends:
                    batch = pb.StepBatch(responses=self._outbox, ends=self._ends)
                    self._outbox, self._ends = [], []
                    flushed, self._flushed = self._flushed, self._loop_future()
                    yield batch
                    flushed.set_result(None)
        finally:
            reader.cancel()
            for task in list(self._tasks.values()):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    @staticmethod
    def _loop_future() -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

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
        rid, finished = request.request_id, False
        stream = self._responses(request, metadata)
        try:
            async for msg in stream:
                finished = msg.finished
                self._outbox.append(msg)
                self._ready.set()
                if not finished:  # shielded: a cancelled request leaves the batch's future
                    await asyncio.shield(self._flushed)
        except RequestRefused as refused:
            self._end(rid, refused.code, refused.details)
            return
        except Exception as exc:
            logger.exception("request %s failed on its multiplexed stream", rid)
            self._end(rid, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        finally:
            # Cancelled while waiting for a write, the stream is not at an await of its own:
            # closing it runs its cleanup now (the engine and prefill aborts).
            await stream.aclose()
        if not finished:
            self._end(rid, grpc.StatusCode.INTERNAL, "the request ended before its last token")

    def _end(self, rid: str, code: grpc.StatusCode, details: str) -> None:
        self._ends.append(pb.StreamEnd(request_id=rid, code=code.value[0], details=details))
        self._ready.set()

    def _finished(self, rid: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(rid) is task:
            del self._tasks[rid]
        self._ready.set()
