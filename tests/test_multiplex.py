"""Decode.GenerateMany over real gRPC: the node's Multiplexer (decode/multiplex.py) and
the router's NodeStream (router/multiplex.py), with a scripted `responses` function in
place of the engine. Requests that advance in lockstep (as an engine step advances every
running request) share one StepBatch per step instead of one message each."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import grpc
import pytest

from splitserve.decode.multiplex import Metadata, Multiplexer, Outbox, Pending, RequestRefused
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc as pb_grpc
from splitserve.router.multiplex import NodeStream

NUM_STEPS = 6


class _Steps:
    """An engine stand-in: every request gets one message per step."""

    def __init__(self) -> None:
        self.step = asyncio.Condition()
        self.number = 0
        self.cancelled: list[str] = []
        self.batches: list[int] = []
        self.trace: dict[str, Metadata] = {}

    async def advance(self) -> None:
        async with self.step:
            self.number += 1
            self.step.notify_all()

    async def run(self, request: pb.GenerateRequest, metadata: Metadata, outbox: Outbox) -> None:
        rid = request.request_id
        self.trace[rid] = metadata
        if rid.startswith("bad"):
            raise RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
        seen = self.number
        try:
            for i in range(NUM_STEPS):
                async with self.step:
                    await self.step.wait_for(lambda seen=seen: self.number > seen)
                    seen = self.number
                outbox.put(_Tokens(rid, [i], i == NUM_STEPS - 1))
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise


class _Tokens:
    """A scripted request's unsent message (decode/multiplex.py's `Pending`)."""

    def __init__(self, request_id: str, token_ids: list[int], finished: bool) -> None:
        self.request_id = request_id
        self.token_ids = token_ids
        self.finished = finished

    def merge(self, later: Pending) -> Pending:
        assert isinstance(later, _Tokens)
        return _Tokens(self.request_id, self.token_ids + later.token_ids, later.finished)

    def message(self) -> pb.GenerateResponse:
        delta = pb.CompletionDelta(token_ids=self.token_ids)
        return pb.GenerateResponse(
            request_id=self.request_id, deltas=[delta], finished=self.finished
        )


class _Servicer(pb_grpc.DecodeServicer):
    def __init__(self, steps: _Steps) -> None:
        self.steps = steps

    async def GenerateMany(self, requests, context):  # type: ignore[override]
        async for batch in Multiplexer(self.steps.run).serve(requests):
            self.steps.batches.append(len(batch.responses))
            yield batch


async def _serve(steps: _Steps) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server()
    pb_grpc.add_DecodeServicer_to_server(_Servicer(steps), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def _stop(server: grpc.aio.Server) -> None:
    """Stop the server, then collect garbage while the loop still runs: a grpc.aio object
    collected after the loop closed schedules its shutdown on the closed loop."""
    await server.stop(None)
    gc.collect()


def _request(rid: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=[1, 2, 3])


async def _drive(steps: _Steps, calls: list, until: asyncio.Future) -> None:
    while not until.done():
        await asyncio.sleep(0.02)
        await steps.advance()


async def _read_all(call) -> list[int]:
    tokens = []
    while True:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            return tokens
        tokens += list(msg.deltas[0].token_ids)
        if msg.finished:
            return tokens


def test_lockstep_requests_share_one_batch_per_step() -> None:
    async def main() -> None:
        steps = _Steps()
        server, channel = await _serve(steps)
        stream = NodeStream(pb_grpc.DecodeStub(channel))
        calls = [stream.open(_request(f"r{i}"), (("traceparent", f"t{i}"),)) for i in range(8)]
        reads = asyncio.gather(*(_read_all(c) for c in calls))
        driver = asyncio.ensure_future(_drive(steps, calls, reads))
        assert await asyncio.wait_for(reads, 20) == [list(range(NUM_STEPS))] * 8
        await driver
        assert sum(steps.batches) == 8 * NUM_STEPS
        # One batch per step carries every request (the first may split as they arrive).
        assert len(steps.batches) <= NUM_STEPS + 2, steps.batches
        assert steps.trace["r3"] == (("traceparent", "t3"),)
        await stream.close()
        await channel.close()
        await _stop(server)

    asyncio.run(main())


def test_refusal_and_cancel_reach_their_request_only() -> None:
    async def main() -> None:
        steps = _Steps()
        server, channel = await _serve(steps)
        stream = NodeStream(pb_grpc.DecodeStub(channel))
        bad = stream.open(_request("bad-1"), ())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(bad.read(), 10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        gone, kept = stream.open(_request("gone"), ()), stream.open(_request("kept"), ())
        first = asyncio.ensure_future(gone.read())
        await asyncio.wait_for(_drive(steps, [gone], first), 10)
        assert first.result().deltas[0].token_ids == [0]
        gone.cancel()
        for _ in range(200):
            if "gone" in steps.cancelled:
                break
            await asyncio.sleep(0.01)
        assert steps.cancelled == ["gone"]
        reads = asyncio.ensure_future(_read_all(kept))
        await _drive(steps, [kept], reads)
        assert reads.result() == list(range(NUM_STEPS))
        await stream.close()
        await channel.close()
        await _stop(server)

    asyncio.run(main())


def test_a_dead_node_fails_every_open_request_and_the_next_call_reconnects() -> None:
    async def main() -> None:
        steps = _Steps()
        server, channel = await _serve(steps)
        stream = NodeStream(pb_grpc.DecodeStub(channel))
        calls = [stream.open(_request(f"r{i}"), ()) for i in range(3)]
        await asyncio.sleep(0.2)
        await _stop(server)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await asyncio.wait_for(call.read(), 10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        again = stream.open(_request("later"), ())  # a new GenerateMany call
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(again.read(), 10)
        await stream.close()
        await channel.close()

    asyncio.run(main())


def test_a_reader_that_fell_behind_gets_one_merged_message_per_request() -> None:
    """The node side alone: while nobody takes the next batch, each request's messages
    merge into one, so the batch after the pause carries one message per request."""

    async def main() -> None:
        steps = _Steps()
        mux = Multiplexer(steps.run)
        opened = asyncio.Event()

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            for i in range(3):
                yield pb.StreamRequest(generate=_request(f"r{i}"))
            opened.set()
            await asyncio.sleep(3600)

        batches = mux.serve(requests())
        taking = asyncio.ensure_future(batches.__anext__())  # serve starts reading
        await asyncio.wait_for(opened.wait(), 10)
        await asyncio.sleep(0.05)  # the request tasks start waiting for the first step
        await steps.advance()
        first = await asyncio.wait_for(taking, 10)
        for _ in range(NUM_STEPS - 1):  # the engine runs on; nobody reads
            await steps.advance()
            await asyncio.sleep(0.01)
        second = await asyncio.wait_for(batches.__anext__(), 10)
        await batches.aclose()
        assert sum(len(m.deltas[0].token_ids) for m in first.responses) == 3
        assert sorted(m.request_id for m in second.responses) == ["r0", "r1", "r2"]
        assert all(list(m.deltas[0].token_ids) == [1, 2, 3, 4, 5] for m in second.responses)
        assert all(m.finished for m in second.responses)

    asyncio.run(main())


def test_a_listener_gets_every_message_from_the_reader_without_a_task_per_request() -> None:
    """`listen`: what queued before it first, then each message as the stream's reader
    takes it off the StepBatch, all in the reader's task (none woken per request or per
    message); the finished message ends the call."""

    async def main() -> None:
        steps = _Steps()
        server, channel = await _serve(steps)
        stream = NodeStream(pb_grpc.DecodeStub(channel))
        calls = [stream.open(_request(f"r{i}"), ()) for i in range(3)]
        got: dict[str, list[int]] = {c.request_id: [] for c in calls}
        tasks: set[asyncio.Task | None] = set()
        done = asyncio.get_running_loop().create_future()

        def listener(msg: pb.GenerateResponse) -> None:
            tasks.add(asyncio.current_task())
            got[msg.request_id] += list(msg.deltas[0].token_ids)
            if msg.finished and all(len(t) == NUM_STEPS for t in got.values()):
                done.set_result(None)

        driver = asyncio.ensure_future(_drive(steps, calls, done))
        while any(c.queue.empty() for c in calls):  # messages queue before anyone listens
            await asyncio.sleep(0.005)
        for call in calls:
            call.listen(listener)
        await asyncio.wait_for(done, 20)
        await driver
        assert got == {c.request_id: list(range(NUM_STEPS)) for c in calls}
        assert len(tasks - {None}) <= 2  # the test's own (queued items) and the reader's
        assert not stream._calls  # every call ended with its finished message
        await stream.close()
        await channel.close()
        await _stop(server)

    asyncio.run(main())
