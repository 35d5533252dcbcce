"""Forward-pass device times (engine/forward_times.py): read only once a pass's end event
has completed, in order, by kind; and carried by a CPU engine's statistics."""

from __future__ import annotations

import pytest

from splitserve.engine.forward_times import DECODE, PREFILL, ForwardTimes


class FakeEvent:
    """A device event whose completion and time the test sets."""

    made = 0

    def __init__(self) -> None:
        FakeEvent.made += 1
        self.done = False
        self.at_ms = 0.0
        self.records = 0

    def record(self) -> None:
        self.records += 1

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.at_ms - self.at_ms


def _pass(times: ForwardTimes, kind: str, rows: int, start_ms: float, end_ms: float):
    mark = times.start()
    assert isinstance(mark, FakeEvent)
    mark.at_ms = start_ms
    times.end(mark, kind, rows)
    end = times._pending[-1][1]
    end.at_ms = end_ms
    return mark, end


def test_a_pass_counts_once_its_end_event_completed_and_in_order() -> None:
    FakeEvent.made = 0
    times = ForwardTimes(FakeEvent)
    _, end1 = _pass(times, PREFILL, 3, 0.0, 100.0)
    _, end2 = _pass(times, DECODE, 12, 100.0, 108.0)
    assert times.totals()[PREFILL].num == 0  # nothing completed: nothing read, no wait
    end2.done = True  # a later pass cannot be read before an earlier one
    assert times.totals()[DECODE].num == 0
    end1.done = True
    totals = times.totals()
    assert (totals[PREFILL].num, totals[PREFILL].rows) == (1, 3)
    assert totals[PREFILL].device_s == pytest.approx(0.1)
    assert (totals[DECODE].num, totals[DECODE].rows) == (1, 12)
    assert totals[DECODE].device_s == pytest.approx(0.008)
    # Read events are made again into the next passes' marks, not new ones.
    made = FakeEvent.made
    _pass(times, DECODE, 12, 108.0, 116.0)
    assert FakeEvent.made == made
    # totals() hands out copies.
    totals[DECODE].num = 99
    assert times.totals()[DECODE].num == 1


def test_on_the_host_clock_a_pass_counts_at_its_end() -> None:
    times = ForwardTimes()
    mark = times.start()
    assert isinstance(mark, float)
    sum(range(10_000))
    times.end(mark, DECODE, 4)
    totals = times.totals()
    assert (totals[DECODE].num, totals[DECODE].rows) == (1, 4)
    assert totals[DECODE].device_s > 0
    assert totals[PREFILL].num == 0


def test_a_cpu_engine_reports_its_prompt_and_decode_passes(tiny_llama) -> None:
    """EngineStats carries the runner's passes: one prompt of 20 tokens in steps of at most
    8 (three prefill passes, the last sampling the first token), then a pass per further
    token, each of one row."""
    from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from splitserve.engine.core import EngineCore
    from splitserve.engine.sampling_params import SamplingParams

    model = ModelConfig(str(tiny_llama), dtype="float32", device="cpu")
    scheduler = SchedulerConfig(max_num_batched_tokens=8)
    core = EngineCore(EngineConfig(model, CacheConfig(block_size=16, num_blocks=8), scheduler))
    before = core.stats()
    assert (before.forwards_prefill, before.forwards_decode) == (0, 0)
    core.add_request("r", list(range(1, 21)), SamplingParams(max_tokens=5, ignore_eos=True))
    while core.has_unfinished():
        core.step()
    stats = core.stats()
    assert (stats.forwards_prefill, stats.forward_rows_prefill) == (3, 3)
    assert (stats.forwards_decode, stats.forward_rows_decode) == (4, 4)
    assert stats.forward_device_s_prefill > 0 and stats.forward_device_s_decode > 0
