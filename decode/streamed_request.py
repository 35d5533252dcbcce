"""StreamedRequest: one decode request's stream state between the engine and its outbox.

Who calls what, all on the node's event loop:
- `AsyncEngine` calls `on_output(out)` with each engine delta of the request (a step's
  outputs for every request in one wake-up of the loop, engine/async_engine.py). The
  deltas gather in a `DeltaBuffer` (--stream-interval); a due one goes to the outbox as
  a `Delta` (decode/multiplex.py's `Pending`); the finished one resolves `last` instead.
- `DecodeService.run` awaits `last`, gathers the final message's metrics (transfer,
  TTFT, queue time) and calls `send_last`.
- The outbox (GenerateMany's batch or Generate's queue) calls `Delta.message()` when it
  sends the item; a delta still unsent when the next one comes is merged into it first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from splitserve.decode.multiplex import Outbox, Pending
from splitserve.decode.responses import DeltaBuffer, generate_response, stamp_timing
from splitserve.engine.outputs import RequestOutput, merge_deltas, num_tokens
from splitserve.protocol import node_pb2 as pb


class StreamedRequest:
    def __init__(
        self,
        request: pb.GenerateRequest,
        stream_interval: int,
        outbox: Outbox,
        on_first_token: Callable[[], None],
    ) -> None:
        self.request = request
        self.outbox = outbox
        self._buffer = DeltaBuffer(stream_interval)
        self._on_first_token = on_first_token
        self.first_token_time: float | None = None
        # Completion tokens the engine produced so far, and those in the messages made.
        self.num_generated = 0
        self.num_completion_tokens = 0
        # The request's finished delta (everything not sent yet, merged).
        self.last: asyncio.Future[RequestOutput] = asyncio.get_running_loop().create_future()

    def on_output(self, out: RequestOutput) -> None:
        if self.last.done():
            return
        self.num_generated += num_tokens(out)
        due = self._buffer.add(out)
        if due is None:
            return
        if self.first_token_time is None and any(c.token_ids for c in due.outputs):
            self.first_token_time = time.monotonic()
            self._on_first_token()
        if due.finished:
            self.last.set_result(due)
        else:
            self.outbox.put(Delta(self, due, {}))

    def send_last(self, out: RequestOutput, extras: dict[str, Any]) -> None:
        """The finished message, with the final metrics (`generate_response`'s keywords)."""
        self.outbox.put(Delta(self, out, extras))

    def message(self, out: RequestOutput, extras: dict[str, Any]) -> pb.GenerateResponse:
        self.num_completion_tokens += num_tokens(out)
        request = self.request
        msg = generate_response(
            out,
            request.stream_options,
            len(request.prompt_token_ids),
            self.num_completion_tokens,
            **extras,
        )
        if request.trace_timing:
            stamp_timing(msg, out)
        return msg


class Delta:
    """A StreamedRequest's message not sent yet: its engine delta (and the final metrics
    on the finished one)."""

    def __init__(self, stream: StreamedRequest, out: RequestOutput, extras: dict[str, Any]):
        self.stream = stream
        self.out = out
        self.extras = extras

    @property
    def request_id(self) -> str:
        return self.out.request_id

    @property
    def finished(self) -> bool:
        return self.out.finished

    def merge(self, later: Pending) -> Pending:
        assert isinstance(later, Delta) and later.stream is self.stream
        return Delta(self.stream, merge_deltas(self.out, later.out), later.extras)

    def message(self) -> pb.GenerateResponse:
        return self.stream.message(self.out, self.extras)
