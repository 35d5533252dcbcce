"""Decode.GenerateMany over real gRPC: the node's Multiplexer (decode/multiplex.py) and
the router's NodeStream (router/multiplex.py), with a scripted `responses` function in
place of the engine. Requests that advance in lockstep (as an engine step advances every
running request) share one StepBatch per step instead of one message each."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from splitserve.decode.multiplex import Metadata, Multiplexer, Outbox, Pending, RequestRefused
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc as pb_grpc
from splitserve.router.multiplex import Item, MultiplexedCall, NodeStream

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
                    # (mypy cannot type a lambda's default argument)
                    await self.step.wait_for(lambda seen=seen: self.number > seen)  # type: ignore[misc]
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


def _open(
    stream: NodeStream, rid: str, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[MultiplexedCall, asyncio.Queue[Item]]:
    """Open `rid` with a consumer that queues each item the stream's reader hands it."""
    items: asyncio.Queue[Item] = asyncio.Queue()
    return stream.open(_request(rid), metadata, items.put_nowait), items


async def _next(items: asyncio.Queue[Item]) -> pb.GenerateResponse:
    """The request's next message; raises the AioRpcError that ended it."""
    item = await items.get()
    if isinstance(item, grpc.aio.AioRpcError):
        raise item
    return item


async def _read_all(items: asyncio.Queue[Item]) -> list[int]:
    tokens = []
    while True:
        msg = await _next(items)
        tokens += list(msg.deltas[0].token_ids)
        if msg.finished:
            return tokens


def test_lockstep_requests_share_one_batch_per_step() -> None:
    async def main() -> None:
        steps = _Steps()
        server, channel = await _serve(steps)
        stream = NodeStream(pb_grpc.DecodeStub(channel))
        opened = [_open(stream, f"r{i}", (("traceparent", f"t{i}"),)) for i in range(8)]
        calls = [call for call, _ in opened]
        reads = asyncio.gather(*(_read_all(items) for _, items in opened))
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
        _, bad_items = _open(stream, "bad-1")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(_next(bad_items), 10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        (gone, gone_items), (kept, kept_items) = _open(stream, "gone"), _open(stream, "kept")
        first = asyncio.ensure_future(_next(gone_items))
        await asyncio.wait_for(_drive(steps, [gone], first), 10)
        assert first.result().deltas[0].token_ids == [0]
        gone.cancel()
        for _ in range(200):
            if "gone" in steps.cancelled:
                break
            await asyncio.sleep(0.01)
        assert steps.cancelled == ["gone"]
        reads = asyncio.ensure_future(_read_all(kept_items))
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
        opened = [_open(stream, f"r{i}") for i in range(3)]
        await asyncio.sleep(0.2)
        await _stop(server)
        for _, items in opened:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await asyncio.wait_for(_next(items), 10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        _, again = _open(stream, "later")  # a new GenerateMany call
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(_next(again), 10)
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


def test_a_consumer_gets_every_message_from_the_reader_without_a_task_per_request() -> None:
    """`on_item`, given when the call is opened: each message as the stream's reader takes
    it off the StepBatch, all in the reader's task (none woken per request or per
    message); the finished message ends the call."""

    async def main() -> None:
        steps = _Steps()
        server, channel = await _serve(steps)
        stream = NodeStream(pb_grpc.DecodeStub(channel))
        rids = [f"r{i}" for i in range(3)]
        got: dict[str, list[int]] = {rid: [] for rid in rids}
        tasks: set[asyncio.Task | None] = set()
        done = asyncio.get_running_loop().create_future()

        def consumer(msg: Item) -> None:
            assert isinstance(msg, pb.GenerateResponse), msg
            tasks.add(asyncio.current_task())
            got[msg.request_id] += list(msg.deltas[0].token_ids)
            if msg.finished and all(len(t) == NUM_STEPS for t in got.values()):
                done.set_result(None)

        calls = [stream.open(_request(rid), (), consumer) for rid in rids]
        driver = asyncio.ensure_future(_drive(steps, calls, done))
        await asyncio.wait_for(done, 20)
        await driver
        assert got == {rid: list(range(NUM_STEPS)) for rid in rids}
        assert len(tasks - {None}) == 1  # the reader's
        assert not stream._calls  # every call ended with its finished message
        await stream.close()
        await channel.close()
        await _stop(server)

    asyncio.run(main())


def test_a_failing_consumer_is_logged_and_costs_other_requests_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A consumer that raises is logged; its request still ends with its finished message,
    and the request beside it on the stream gets every message."""

    async def main() -> None:
        steps = _Steps()
        server, channel = await _serve(steps)
        stream = NodeStream(pb_grpc.DecodeStub(channel))

        def failing(item: Item) -> None:
            raise RuntimeError("consumer bug")

        broken = stream.open(_request("broken"), (), failing)
        kept, kept_items = _open(stream, "kept")
        reads = asyncio.ensure_future(_read_all(kept_items))
        await asyncio.wait_for(_drive(steps, [broken, kept], reads), 20)
        assert reads.result() == list(range(NUM_STEPS))
        for _ in range(200):  # "broken" finished in the same or the next batch
            if not stream._calls:
                break
            await asyncio.sleep(0.01)
        assert not stream._calls
        await stream.close()
        await channel.close()
        await _stop(server)

    with caplog.at_level(logging.ERROR, logger="splitserve.router.multiplex"):
        asyncio.run(main())
    failures = [r for r in caplog.records if "consumer of request broken" in r.getMessage()]
    assert failures and all(r.exc_info for r in failures)  # each message's failure, traced
