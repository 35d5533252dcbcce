"""AsyncEngine: the engine loop on its own thread, driven from asyncio (the nodes' gRPC
servers).

The thread runs: drain submitted commands -> run step hooks (e.g. KV-event publishing) ->
poll the KV connector (`EngineCore.poll_connector`: remote KV arrivals and failures) ->
`EngineCore.step()` -> hand the step's outputs to their requests' asyncio queues, with one
`call_soon_threadsafe` per event loop and step (not one per request: each one is a
self-pipe write and a wake-up of the loop, taken under the GIL).

A step's outputs are handed over during the next step, once that step has launched the
one after it and waits for the device (`EngineCore.step(while_waiting=...)`), or at once
when no step follows. The event loops' work on them (one output per running request) then
takes the GIL while the engine thread waits for the device, not while it launches the next
step: with steps launched ahead, that launch must come before the device finishes the step
in flight, and at a few hundred rows a step the event loops' share of the GIL, taken then,
left the device idle (docs/performance.md). A request's first and last outputs are the
exception (`SchedulerConfig.first_and_last_at_once`, on by default): they go out as soon
as their step is read back, so that neither the time to first token nor the request's end
includes the next launch (and the time per output token, last less first, is what it would
be if every output went at once); they are few a step (the prompts that ended in it, the
requests that finished), so the GIL they take during that launch is little. An idle
engine hands over what it holds before it answers commands, so `stats` never counts a
request out whose last outputs are still held. Outputs of any other kind (aborts,
connector events, failures) are handed over on the engine thread too, after what is held,
so that a request's outputs keep their order. Every touch of the EngineCore happens on
that thread; other threads go through `call` (a function run there between steps; `run`
is its awaitable form on the asyncio side) or `generate`/`abort`.
A request's grammar is compiled on a worker thread before it is added (`compile_grammar`).

Two ways to follow a request, on the asyncio side:
- `generate` yields its outputs as deltas. Streaming is coalesced: when the consumer wakes
  up to several queued outputs (the event loop or the client fell behind the engine), they
  come as one delta, so a slow consumer catches up with one message instead of falling
  further behind.
- `add` hands each output to a plain function (`on_output`, run on the caller's event
  loop). A step's outputs reach every such function in one wake-up of the loop, with no
  task woken per request: the node's multiplexed streams (decode/multiplex.py) take
  hundreds of requests' tokens per step this way. The caller ends the request with
  `close` once its last output arrived, or earlier (which aborts it).
Each output's `metrics["first_scheduled_s"]` is the `time.monotonic()` at which its
request was first scheduled (absent before that: a first token that came with remote KV);
`metrics["step_end_s"]` is the `time.monotonic()` at which the engine step
that produced it ended (the oldest one's, for a coalesced delta), and
`metrics["step_time_s"]` that step's duration: the start of the per-token latency trace
(docs/performance.md). Step observers (`add_step_observer`, e.g. the node's step-time
histogram) get every step's duration on the engine thread.

If a step raises, the error is logged, every unfinished request ends with finish_reason
"error", and the loop goes on serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, TypeVar

from splitserve.engine.config import EngineConfig, SchedulerConfig
from splitserve.engine.core import EngineCore, StepOutput
from splitserve.engine.output_collector import OutputCollector
from splitserve.engine.outputs import RequestOutput, merge_deltas
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.stats import EngineStats
from splitserve.engine.thread_names import name_native_thread

logger = logging.getLogger(__name__)

T = TypeVar("T")
_IDLE_WAIT_S = 0.05
# Idle wait while a step hook reports work in flight (e.g. KV transfers to poll).
_BUSY_WAIT_S = 0.0005


OnOutput = Callable[[RequestOutput], None]
# The engine thread's name in the OS (engine/thread_names.py, benchmarks/thread_cpu.py).
ENGINE_THREAD_NAME = "engine-loop"


class _Stream:
    """Where a request's outputs go on the asyncio side: `on_output` on `loop`."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_output: OnOutput, collector: OutputCollector
    ) -> None:
        self.loop = loop
        self.on_output = on_output
        self.collector = collector
        self.started = False  # an output was handed over (engine thread)


class _Held(NamedTuple):
    """A step's outputs, not yet handed to the event loops, with the step's stamps."""

    outputs: list[StepOutput]
    step_end_s: float
    step_time_s: float


class AsyncEngine:
    def __init__(self, config: EngineConfig | None, core: EngineCore | None = None) -> None:
        """The engine of `config`, or `core` when given (config None: default settings)."""
        if core is None:
            if config is None:
                raise ValueError("AsyncEngine needs an EngineConfig or a core")
            core = EngineCore(config)
        self.core = core
        scheduler = config.scheduler if config is not None else SchedulerConfig()
        self._ends_at_once = scheduler.first_and_last_at_once
        self._commands: deque[tuple[Callable[[EngineCore], Any], concurrent.futures.Future]] = (
            deque()
        )
        self._streams: dict[str, _Stream] = {}
        self._step_hooks: list[Callable[[EngineCore], bool]] = []
        self._step_observers: list[Callable[[float], None]] = []
        self._wake = threading.Event()
        self._stopping = False
        self._held: _Held | None = None  # engine thread only
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # Any thread.

    def call(self, fn: Callable[[EngineCore], T]) -> concurrent.futures.Future[T]:
        """Run `fn(core)` on the engine thread between steps."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.append((fn, future))
        self._wake.set()
        return future

    async def run(self, fn: Callable[[EngineCore], T]) -> T:
        """`call` from the asyncio side: await `fn(core)`'s result."""
        return await asyncio.wrap_future(self.call(fn))

    def add_step_hook(self, hook: Callable[[EngineCore], bool]) -> None:
        """`hook(core)` runs on the engine thread before every step (and while idle); it
        returns True while it has work in flight, so that the idle loop polls it often."""
        self.call(lambda core: self._step_hooks.append(hook))

    def add_step_observer(self, observe: Callable[[float], None]) -> None:
        """`observe(seconds)` runs on the engine thread after every step, with its duration."""
        self.call(lambda core: self._step_observers.append(observe))

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    # asyncio side.

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kv_params: object | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs as deltas until it finishes; `kv_params`
        goes to the KV connector (`EngineCore.add_request`). If the caller goes away, the
        request is aborted."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        await self.add(request_id, prompt_token_ids, params, kv_params, queue.put_nowait)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                while not out.finished and not queue.empty():
                    out = merge_deltas(out, queue.get_nowait())
                finished = out.finished
                yield out
        finally:
            await self.close(request_id, finished)

    async def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kv_params: object | None,
        on_output: OnOutput,
    ) -> None:
        """Add a request whose outputs (deltas; the last one `finished`) go to
        `on_output` on this event loop; ValueError when it is refused. If the caller goes
        away while the request is being added, it is aborted once added. The caller
        ends it with `close`."""
        await self.compile_grammar(params)
        self._open(request_id, prompt_token_ids, params, on_output)
        admission = self.call(
            lambda core: core.add_request(request_id, prompt_token_ids, params, kv_params)
        )
        try:
            await asyncio.wrap_future(admission)
        except BaseException:
            self._streams.pop(request_id, None)
            admission.add_done_callback(lambda f: self._abandon(f, request_id))  # any thread
            raise

    async def close(self, request_id: str, finished: bool) -> None:
        """Stop delivering a request's outputs; one not `finished` is aborted."""
        try:
            if not finished:
                await self.abort(request_id)
        finally:
            self._streams.pop(request_id, None)

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the request's grammar, if any, on a worker thread (ValueError when it
        cannot be), so that admission on the engine thread finds it in the compiler's cache
        and no step of the running batch waits on a compile."""
        if params.grammar is not None:
            await asyncio.to_thread(self.core.intake.grammar.compile, params.grammar)

    def _abandon(self, admission: concurrent.futures.Future, request_id: str) -> None:
        """The request was added but nobody awaits it: abort it on the engine thread."""
        if admission.cancelled() or admission.exception() is not None:
            return  # never added
        self.call(lambda core: core.abort(request_id))

    def _open(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        on_output: OnOutput,
    ) -> None:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use; pick a unique id")
        collector = OutputCollector(
            request_id, None, list(prompt_token_ids), params.n, cumulative=False
        )
        stream = _Stream(asyncio.get_running_loop(), on_output, collector)
        self._streams[request_id] = stream

    async def abort(self, request_id: str) -> None:
        await self.run(lambda core: self._abort_now(core, request_id))

    async def stats(self) -> EngineStats:
        return await self.run(lambda core: core.stats())

    # Engine thread.

    def _loop(self) -> None:
        name_native_thread(ENGINE_THREAD_NAME)
        while not self._stopping:
            if self._held is not None and not self.core.has_runnable():
                # Idle: what the last step made goes out before any command is answered
                # (a stats call then counts no request whose outputs are still held).
                self._release_held()
            self._run_commands()
            is_busy = self._poll_connector()
            for hook in self._step_hooks:
                is_busy |= self._guarded(hook)
            if not self.core.has_runnable():
                self._release_held()
                self._wake.wait(_BUSY_WAIT_S if is_busy else _IDLE_WAIT_S)
                self._wake.clear()
                continue
            self._step()
        self._release_held()

    def _step(self) -> None:
        """Run one step and hold its outputs for the next step's wait (see the module
        docstring); the outputs held from the step before go out during this one's."""
        started = time.monotonic()
        try:
            outputs = self.core.step(while_waiting=self._release_held)
        except Exception:
            logger.exception("engine step failed; ending every unfinished request")
            self._release_held()
            outputs = self._fail_all()
        ended = time.monotonic()
        self._observe_step(ended - started)
        self._release_held()  # a step that waited for nothing did not call it
        held = _Held(outputs, ended, ended - started)
        if self._ends_at_once:
            ends, held = self._split_ends(held)
            if ends.outputs:
                self._hand_over(ends)
        self._held = held

    def _split_ends(self, held: _Held) -> tuple[_Held, _Held]:
        """The outputs that start a request's stream (none handed over before) or end
        it (finished), and the rest. Every earlier output is out by now, so each request's
        order holds."""
        ends: list[StepOutput] = []
        rest: list[StepOutput] = []
        for out in held.outputs:
            stream = self._streams.get(out.request_id)
            is_end = stream is not None and (not stream.started or out.finished)
            (ends if is_end else rest).append(out)
        return held._replace(outputs=ends), held._replace(outputs=rest)

    def _abort_now(self, core: EngineCore, request_id: str) -> None:
        """Abort on the engine thread: its outputs go out after the held ones."""
        self._release_held()
        self._deliver(core.abort(request_id))

    def _release_held(self) -> None:
        """Hand the held step's outputs to their streams (engine thread)."""
        held, self._held = self._held, None
        if held is not None:
            self._hand_over(held)

    def _observe_step(self, seconds: float) -> None:
        for observe in self._step_observers:
            try:
                observe(seconds)
            except Exception:
                logger.exception("engine step observer %r failed", observe)

    def _poll_connector(self) -> bool:
        try:
            outputs, is_busy = self.core.poll_connector()
        except Exception:
            logger.exception("KV connector poll failed")
            return False
        if outputs:
            self._release_held()
            self._deliver(outputs)
        return is_busy

    def _guarded(self, hook: Callable[[EngineCore], bool]) -> bool:
        try:
            return bool(hook(self.core))
        except Exception:
            logger.exception("engine step hook %r failed", hook)
            return False

    def _run_commands(self) -> None:
        while self._commands:
            fn, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.core))
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)

    def _fail_all(self) -> list[StepOutput]:
        outputs = []
        for request_id in self.core.unfinished_request_ids():
            for out in self.core.abort(request_id):
                outputs.append(out._replace(finish_reason="error"))
        return outputs

    def _deliver(self, outputs: list[StepOutput]) -> None:
        """Outputs not of a step (aborts, connector events, failures), handed over now
        (engine thread)."""
        self._hand_over(_Held(outputs, time.monotonic(), 0.0))

    def _hand_over(self, held: _Held) -> None:
        """Fold outputs into their streams; wake each event loop once for all of them."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for out in held.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.started = True
            result = stream.collector.make([stream.collector.add(out)])
            result.metrics["step_end_s"] = held.step_end_s
            result.metrics["step_time_s"] = held.step_time_s
            batches.setdefault(stream.loop, []).append((stream, result))
        for loop, batch in batches.items():
            if loop.is_closed():  # a closed loop's streams are gone (shut down)
                continue
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:
                if not loop.is_closed():
                    raise
                # it closed since the check above: its streams are gone as well


def _put_all(batch: list[tuple[_Stream, RequestOutput]]) -> None:
    """On the event loop: hand one step's outputs to their consumers."""
    for stream, result in batch:
        try:
            stream.on_output(result)
        except Exception:  # one consumer's bug must not cost the others their outputs
            logger.exception("output consumer of request %s failed", result.request_id)
