"""Coalesced token streaming: the engine thread wakes the event loop once per step, a
consumer that fell behind gets what queued up as one delta, and the router writes one SSE
frame for what queued up of one prompt. Each test fails on a per-token path."""

from __future__ import annotations

import asyncio
import time

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
