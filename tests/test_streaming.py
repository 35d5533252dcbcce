"""Coalesced token streaming: the engine thread wakes the event loop once per step, a
consumer that fell behind gets what queued up as one delta, and the router writes one SSE
frame for what queued up of one prompt. Each test fails on a per-token path."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob, merge_deltas
from splitserve.engine.sampling_params import SamplingParams


def _delta(
    index: int, text: str, ids: list[int], finish: str | None = None, step_end: float = 0.0
) -> RequestOutput:
    lps = [TokenLogprob(i, -1.0, 1) for i in ids]
    comp = CompletionOutput(index, text, ids, finish, None, lps)
    return RequestOutput("r", None, [1], [comp], finish is not None, 3, {"step_end_s": step_end})


def test_merge_deltas_concatenates_per_completion_and_keeps_the_oldest_step_end() -> None:
    merged = merge_deltas(_delta(0, "a", [1], step_end=1.0), _delta(1, "x", [9], step_end=2.0))
    merged = merge_deltas(merged, _delta(0, "b", [2], "length", step_end=3.0))
    assert [c.index for c in merged.outputs] == [0, 1]
    first = merged.outputs[0]
    assert (first.text, first.token_ids, first.finish_reason) == ("ab", [1, 2], "length")
    assert [lp.token_id for lp in first.logprobs or []] == [1, 2]
    assert merged.metrics["step_end_s"] == 1.0 and merged.num_cached_tokens == 3


def test_a_consumer_that_fell_behind_gets_one_coalesced_delta(tiny_llama) -> None:
    from splitserve.engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineConfig(ModelConfig(str(tiny_llama), dtype="float32")))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def main() -> list[RequestOutput]:
        stream = engine.generate("slow-reader", [5, 6, 7, 8], params)
        first = await stream.__anext__()
        for _ in range(500):  # the engine runs on while nobody reads
            stats = await engine.stats()
            if stats.num_running == 0:
                break
            await asyncio.sleep(0.02)
        return [first] + [out async for out in stream]

    try:
        deltas = asyncio.run(main())
    finally:
        engine.shutdown()
    assert sum(len(d.outputs[0].token_ids) for d in deltas) == 12
    assert len(deltas) == 2 and deltas[1].finished  # the 11 queued tokens in one delta
    assert all(d.metrics["step_time_s"] > 0 for d in deltas)


def test_one_event_loop_wake_up_per_engine_step(tiny_llama) -> None:
    from splitserve.engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineConfig(ModelConfig(str(tiny_llama), dtype="float32")))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    num_wakeups = 0

    async def read(rid: str) -> int:
        stream = engine.generate(rid, [3, 4], params)
        return sum([len(out.outputs[0].token_ids) async for out in stream])

    async def main() -> list[int]:
        nonlocal num_wakeups
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal num_wakeups
            num_wakeups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        return list(await asyncio.gather(*(read(f"r{i}") for i in range(8))))

    try:
        before = engine.core.stats().num_steps
        started = time.monotonic()
        counts = asyncio.run(main())
        num_steps = engine.core.stats().num_steps - before
    finally:
        engine.shutdown()
    assert counts == [16] * 8 and time.monotonic() - started < 120
    # One wake-up per step that produced tokens, plus the admissions and stats calls (the
    # futures of `call` resolve through the loop too); per-request wake-ups would be 8x.
    assert num_wakeups <= num_steps + 8 + 4, (num_wakeups, num_steps)


def test_added_requests_get_each_step_in_one_callback_without_a_task(tiny_llama) -> None:
    """`AsyncEngine.add`: a step's outputs reach every request's `on_output` in one
    callback of the loop, outside any task (no task is woken per request and step)."""
    from splitserve.engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineConfig(ModelConfig(str(tiny_llama), dtype="float32")))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    calls: list[tuple[float, str, bool]] = []

    async def main() -> dict[str, int]:
        loop = asyncio.get_running_loop()
        counts = {f"r{i}": 0 for i in range(6)}
        done = {rid: loop.create_future() for rid in counts}

        def on_output(out: RequestOutput) -> None:
            calls.append(
                (out.metrics["step_end_s"], out.request_id, asyncio.current_task() is None)
            )
            counts[out.request_id] += len(out.outputs[0].token_ids)
            if out.finished:
                done[out.request_id].set_result(None)

        for rid in counts:
            await engine.add(rid, [3, 4, 5], params, None, on_output)
        await asyncio.wait_for(asyncio.gather(*done.values()), 120)
        for rid in counts:
            await engine.close(rid, True)
        return counts

    try:
        counts = asyncio.run(main())
    finally:
        engine.shutdown()
    assert counts == {f"r{i}": 10 for i in range(6)}
    assert all(outside_task for _, _, outside_task in calls)
    steps = [step_end for step_end, _, _ in calls]
    # One callback per step: a step's outputs come together, never interleaved with another's.
    assert steps == sorted(steps)
    assert max(steps.count(s) for s in set(steps)) == 6


def _message(ids: list[int], text: str, finish: str | None = None) -> object:
    from splitserve.protocol import node_pb2 as pb

    delta = pb.CompletionDelta(index=0, token_ids=ids, text=text)
    delta.logprobs.extend(pb.TokenLogprob(token_id=i, logprob=-0.5, rank=1) for i in ids)
    if finish is not None:
        delta.finish_reason = finish
        delta.stop_token_id = 2
    msg = pb.GenerateResponse(request_id="r", deltas=[delta], finished=finish is not None)
    if finish is not None:
        msg.usage.completion_tokens = 3
    return msg


def test_merge_responses_reads_as_one_node_message() -> None:
    from splitserve.router.coalesce import merge_responses

    merged = merge_responses(_message([1], "a"), _message([2, 3], "bc", finish="stop"))
    (delta,) = merged.deltas
    assert list(delta.token_ids) == [1, 2, 3] and delta.text == "abc"
    assert [lp.token_id for lp in delta.logprobs] == [1, 2, 3]
    assert delta.finish_reason == "stop" and delta.WhichOneof("stop_reason") == "stop_token_id"
    assert merged.finished and merged.usage.completion_tokens == 3


def test_router_yields_what_queued_up_of_a_prompt_as_one_item() -> None:
    """Messages waiting in the router's queue come out as one item (one SSE frame), with
    another prompt's messages kept apart; an error after them still reaches the caller."""
    from types import SimpleNamespace

    from splitserve.router.coalesce import StreamItem
    from splitserve.router.errors import APIError
    from splitserve.router.generation import PromptStreams
    from splitserve.router.metrics import RouterMetrics

    service = SimpleNamespace(metrics=RouterMetrics())
    prepared = SimpleNamespace(prompts=[[1], [2]], arrival_s=time.perf_counter())

    async def main() -> list[StreamItem]:
        streams = PromptStreams(service, prepared)  # type: ignore[arg-type]
        for i in range(5):
            streams.deliver(StreamItem(0, _message([i], str(i)), None))
            streams.deliver(StreamItem(1, _message([10 + i], "x"), None))
        streams.deliver(StreamItem(0, _message([5], "5", finish="length"), None))
        streams.deliver(StreamItem(1, _message([9], "y", finish="stop"), None))
        return [item async for item in streams]

    items = asyncio.run(main())
    assert [item.prompt_index for item in items] == [0, 1]
    first = items[0].message
    assert first is not None and list(first.deltas[0].token_ids) == [0, 1, 2, 3, 4, 5]
    assert first.deltas[0].text == "012345" and first.finished

    async def failing() -> list[StreamItem]:
        streams = PromptStreams(service, SimpleNamespace(prompts=[[1]], arrival_s=0.0))  # type: ignore[arg-type]
        streams.deliver(StreamItem(0, _message([1], "a"), None))
        streams.deliver(StreamItem(0, None, APIError(502, "node failed")))
        got = []
        with pytest.raises(APIError, match="node failed"):
            async for item in streams:
                got.append(item)
        return got

    assert len(asyncio.run(failing())) == 1


def test_delta_buffer_sends_first_tokens_at_once_then_every_interval() -> None:
    from splitserve.decode.responses import DeltaBuffer

    buffer = DeltaBuffer(stream_interval=4)
    sent = [buffer.add(_delta(0, str(i), [i])) for i in range(9)]
    sent.append(buffer.add(_delta(0, "9", [9], finish="length")))
    messages = [m for m in sent if m is not None]
    assert [m.outputs[0].token_ids for m in messages] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert messages[-1].finished and not messages[-2].finished


@pytest.mark.slow  # a router and a node as processes
def test_stream_interval_sends_fewer_messages_with_the_same_text(tiny_llama) -> None:
    """`--stream-interval 4` on a real node, each request on its own Generate stream
    (`--no-multiplex-streams`; the other cluster tests use the default, one multiplexed
    stream per node): each SSE stream carries the first token alone, then at most one
    chunk per 4 tokens, and the text of a non-streamed request, also with four streams at
    once."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from splitserve.launch.processes import ManagedProcess

    proc = ManagedProcess.splitserve(
        "up", "up", "--model", str(tiny_llama), "--served-model-name", "tiny",
        "--num-prefill", "0", "--num-decode", "1", "--port", "0", "--cpu",
        "--node-arg=--dtype=float32", "--node-arg=--stream-interval=4",
        "--router-arg=--no-multiplex-streams",
        ready_pattern=re.compile(r"OpenAI API: (\S+)/v1"),
    ).start(timeout_s=240)  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{proc.address}/v1", api_key="x", max_retries=0)
        body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 17, "temperature": 0}
        whole = client.completions.create(**body, extra_body={"ignore_eos": True})

        def streamed(_: int) -> list[str]:
            stream = client.completions.create(**body, stream=True, extra_body={"ignore_eos": True})
            return [c.choices[0].text for c in stream if c.choices]

        with ThreadPoolExecutor(4) as pool:
            streams = [streamed(0), *pool.map(streamed, range(4))]
    finally:
        assert proc.stop(timeout_s=60) == 0
    assert whole.usage is not None and whole.usage.completion_tokens == 17
    for texts in streams:
        assert "".join(texts) == whole.choices[0].text
        assert len(texts) <= 1 + 4  # 1 first token, then 16 tokens in messages of 4


def test_a_streaming_collector_hands_on_deltas_without_keeping_the_text() -> None:
    """AsyncEngine's collector (cumulative=False) keeps each completion's state, not its
    text and tokens so far; the request is finished once every completion is."""
    from splitserve.engine.output_collector import OutputCollector
    from splitserve.engine.output_processor import StepOutput

    collector = OutputCollector("r", None, [1, 2], n=2, cumulative=False)
    first = collector.add(StepOutput("r", 0, [5], None, "a", None, None))
    collector.add(StepOutput("r", 1, [6], None, "b", "length", None))
    assert (first.text, first.token_ids) == ("a", [5]) and not collector.finished
    last = collector.add(StepOutput("r", 0, [7], None, "c", "stop", 2))
    assert (last.text, last.token_ids, last.finish_reason) == ("c", [7], "stop")
    assert collector.finished
    assert [(c.text, c.token_ids) for c in collector.completions] == [("", []), ("", [])]
    offline = OutputCollector("r", None, [1, 2], n=1)
    offline.add(StepOutput("r", 0, [5], None, "a", None, None))
    offline.add(StepOutput("r", 0, [7], None, "c", "stop", 2))
    assert offline.finished and offline.result().outputs[0].text == "ac"
