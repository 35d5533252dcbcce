"""When AsyncEngine hands a step's outputs to the event loop: during the next step, after
that step launched the one after it and before it waits for the device, so that the
loop's work takes the GIL while the engine thread waits, not while it launches
(engine/async_engine.py). A scripted core, built on node_overhead's stand-in, takes
EngineCore's place: its steps record their launch and their wait, and every hand-over is
recorded on the same thread. A request's first and last outputs are the exception: they go
out as soon as their step is read back."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from splitserve.benchmarks.node_overhead import StandInCore
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.output_processor import StepOutput
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampler import WhileWaiting
from splitserve.engine.sampling_params import SamplingParams

_PARAMS = SamplingParams(max_tokens=1 << 20, ignore_eos=True)


class ScriptedCore(StandInCore):
    """node_overhead's stand-in core with scripted steps: each step records ("launch", n),
    runs the caller's `while_waiting`, records ("wait", n), then gives one token per
    request (its n-th), ending a request after `length` tokens or its max_tokens, whichever
    is fewer; an abort gives its output."""

    def __init__(self, length: int) -> None:
        super().__init__(host_ops=0, device_s=0.0)
        self.length = length
        self.events: list[tuple[str, int]] = []
        self.num_steps = 0

    def abort(self, rid: str) -> list[StepOutput]:
        if self.requests.pop(rid, None) is None:
            return []
        return [StepOutput(rid, 0, [], None, "", "abort", None)]

    def step(self, while_waiting: WhileWaiting | None = None) -> list[StepOutput]:
        self.num_steps += 1
        self.events.append(("launch", self.num_steps))
        if while_waiting is not None:
            while_waiting()
        self.events.append(("wait", self.num_steps))
        outputs = []
        for rid in list(self.requests):
            count = self.requests[rid] = self.requests[rid] + 1
            limit = min(self.length, self.lengths[rid] or self.length)
            finish = "length" if count == limit else None
            if finish:
                del self.requests[rid]
            outputs.append(StepOutput(rid, 0, [count], None, f" {count}", finish, None))
        return outputs


def _record_hand_overs(loop: asyncio.AbstractEventLoop, core: ScriptedCore) -> None:
    """Note each hand-over of outputs (a call of `_put_all` from the engine thread) in the
    core's event list, as ("hand_over", first token id handed over)."""
    original = loop.call_soon_threadsafe

    def recording(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(callback, "__name__", "") == "_put_all":
            assert threading.current_thread().name == "engine-loop"
            core.events.append(("hand_over", args[0][0][1].outputs[0].token_ids[0]))
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = recording  # type: ignore[method-assign]


def _engine(core: ScriptedCore, first_and_last_at_once: bool = True) -> AsyncEngine:
    config = EngineConfig(
        ModelConfig("unused: the core is given"),
        scheduler=SchedulerConfig(first_and_last_at_once=first_and_last_at_once),
    )
    return AsyncEngine(config, core)  # type: ignore[arg-type]


# The start of a request's four tokens, one a step, with the first handed over at once
# (the default) or held like the others.
_HAND_OVERS = {
    True: [("launch", 1), ("wait", 1), ("hand_over", 1), ("launch", 2), ("wait", 2)],
    False: [("launch", 1), ("wait", 1), ("launch", 2), ("hand_over", 1), ("wait", 2)],
}


@pytest.mark.parametrize("first_and_last_at_once", [True, False])
def test_a_steps_outputs_go_out_between_the_next_launch_and_its_wait(
    first_and_last_at_once: bool,
) -> None:
    """Each step's outputs go out during the next step, after its launch and before its
    wait; a request's first token goes out as soon as its step is read back, before the
    next launch (unless first_and_last_at_once is off)."""
    core = ScriptedCore(length=4)
    engine = _engine(core, first_and_last_at_once)

    async def main() -> list[int]:
        _record_hand_overs(asyncio.get_running_loop(), core)
        stream = engine.generate("r", [1, 2], _PARAMS)
        return [t async for out in stream for t in out.outputs[0].token_ids]

    try:
        tokens = asyncio.run(main())
    finally:
        engine.shutdown()
    assert tokens == [1, 2, 3, 4]
    assert core.events == _HAND_OVERS[first_and_last_at_once] + [
        ("launch", 3),
        ("hand_over", 2),
        ("wait", 3),
        ("launch", 4),
        ("hand_over", 3),
        ("wait", 4),
        # No step follows the last one: its outputs go out once the engine is idle.
        ("hand_over", 4),
    ]


def test_a_requests_first_and_last_outputs_go_out_at_once_beside_held_ones() -> None:
    """A request of three tokens joins one that runs on: its first and its last output go
    out alone, right after their step's wait; every other output (its second, all of the
    other request's) during the next step, after its launch."""
    core = ScriptedCore(length=1 << 20)
    engine = _engine(core)
    handed: list[tuple[str, list[tuple[str, int]]]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def recording(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            if getattr(callback, "__name__", "") == "_put_all":
                outs = [(r.request_id, (r.outputs[0].token_ids or [0])[0]) for _, r in args[0]]
                handed.append((core.events[-1][0], outs))
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = recording  # type: ignore[method-assign]
        received: list[RequestOutput] = []
        await engine.add("a", [1], _PARAMS, None, received.append)
        while len(received) < 2:
            await asyncio.sleep(0.001)
        three = SamplingParams(max_tokens=3, ignore_eos=True)
        await engine.add("b", [1], three, None, received.append)
        while not any(out.request_id == "b" and out.finished for out in received):
            await asyncio.sleep(0.001)
        await engine.close("a", False)
        await engine.close("b", True)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    b_outputs = [(after, outs) for after, outs in handed if any(r == "b" for r, _ in outs)]
    assert b_outputs[0] == ("wait", [("b", 1)])  # the first, alone, before the next launch
    assert b_outputs[1][0] == "launch" and ("b", 2) in b_outputs[1][1]  # held
    assert b_outputs[2] == ("wait", [("b", 3)])  # the last, alone
    assert handed[0] == ("wait", [("a", 1)])  # a's first
    # a's others, while b ran, were held (its abort releases what is held when a closes).
    b_last = handed.index(b_outputs[2])
    a_only = [after for after, outs in handed[1:b_last] if all(r == "a" for r, _ in outs)]
    assert a_only and all(after == "launch" for after in a_only)


def test_an_abort_comes_after_the_held_outputs_of_its_request() -> None:
    core = ScriptedCore(length=1 << 20)
    engine = AsyncEngine(None, core)  # type: ignore[arg-type]
    received: list[RequestOutput] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_output(out: RequestOutput) -> None:
            received.append(out)
            if out.finished and not done.done():
                done.set_result(None)

        await engine.add("r", [1, 2], _PARAMS, None, on_output)
        while len(received) < 3:
            await asyncio.sleep(0.001)
        await engine.abort("r")
        await asyncio.wait_for(done, 10)
        await engine.close("r", True)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    tokens = [t for out in received for t in out.outputs[0].token_ids]
    assert tokens == list(range(1, len(tokens) + 1))  # every step's token, in order
    assert received[-1].outputs[0].finish_reason == "abort"
    assert not any(out.finished for out in received[:-1])


def test_outputs_for_a_closed_event_loop_are_dropped() -> None:
    """A request whose event loop closed while it ran: the engine goes on stepping (its
    outputs have nowhere to go) instead of failing the step or its thread."""
    core = ScriptedCore(length=1 << 20)
    engine = AsyncEngine(None, core)  # type: ignore[arg-type]

    async def main() -> None:
        await engine.add("r", [1, 2], _PARAMS, None, lambda out: None)
        await asyncio.sleep(0.05)

    asyncio.run(main())  # closes the loop with the request still running
    _assert_keeps_stepping(engine, core)


def test_a_loop_closing_while_outputs_are_handed_to_it_is_dropped_too() -> None:
    """The loop closes between the engine thread's check that it is open and its call to
    it (`call_soon_threadsafe` then raises): the engine goes on stepping as above."""
    core = ScriptedCore(length=1 << 20)
    engine = AsyncEngine(None, core)  # type: ignore[arg-type]
    closing, raised = threading.Event(), threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def call_soon_threadsafe(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            if closing.is_set() and getattr(callback, "__name__", "") == "_put_all":
                raised.set()
                raise RuntimeError("Event loop is closed")
            return original(callback, *args, **kwargs)

        is_closed = loop.is_closed

        def closed_once_raised() -> bool:  # as the engine thread sees it
            on_engine = threading.current_thread().name == "engine-loop"
            return raised.is_set() if on_engine else is_closed()

        loop.call_soon_threadsafe = call_soon_threadsafe  # type: ignore[method-assign]
        loop.is_closed = closed_once_raised  # type: ignore[method-assign]
        await engine.add("r", [1, 2], _PARAMS, None, lambda out: None)
        await asyncio.sleep(0.05)
        closing.set()
        for _ in range(100):
            if raised.is_set():
                break
            await asyncio.sleep(0.05)
        assert raised.is_set()

    asyncio.run(main())
    _assert_keeps_stepping(engine, core)


def _assert_keeps_stepping(engine: AsyncEngine, core: ScriptedCore) -> None:
    """The engine thread is alive, request "r" still runs, and steps go on (within 5 s:
    a loaded CI machine may not run the thread for a while); then shut the engine down."""
    steps = core.num_steps
    try:
        deadline = time.monotonic() + 5.0
        while core.num_steps <= steps and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine._thread.is_alive() and "r" in core.requests
        assert core.num_steps > steps
    finally:
        engine.shutdown()


class GatedCore(ScriptedCore):
    """A ScriptedCore whose step waits for `gate` (telling `in_step` it has begun); once a
    step ran, its connector poll, the engine thread's next call after the commands it
    answers, waits for `answered`."""

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.in_step = threading.Event()
        self.gate = threading.Event()
        self.answered = threading.Event()
        self.has_stepped = False

    def step(self, while_waiting: WhileWaiting | None = None) -> list[StepOutput]:
        self.in_step.set()
        assert self.gate.wait(10)
        outputs = super().step(while_waiting)
        self.has_stepped = True
        return outputs

    def poll_connector(self) -> tuple[list[StepOutput], bool]:
        if self.has_stepped:
            assert self.answered.wait(10)
        return super().poll_connector()


def test_an_idle_engine_hands_over_before_it_answers_a_command() -> None:
    """A command that came during the last step is answered after that step's outputs
    went out: a caller told no request is left has every output of theirs already."""
    core = GatedCore(length=1)
    engine = AsyncEngine(None, core)  # type: ignore[arg-type]
    received: list[RequestOutput] = []

    async def main() -> tuple[int, int]:
        await engine.add("r", [1, 2], _PARAMS, None, received.append)
        await asyncio.get_running_loop().run_in_executor(None, core.in_step.wait, 10)
        left = engine.call(lambda c: len(c.requests))  # queued while the step runs
        core.gate.set()
        num_left = await asyncio.wrap_future(left)
        num_received = len(received)
        core.answered.set()
        return num_left, num_received

    try:
        num_left, num_received = asyncio.run(main())
    finally:
        engine.shutdown()
    assert num_left == 0
    assert num_received == 1 and received[0].finished
