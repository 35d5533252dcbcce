"""The loaded-engine benchmark (benchmarks/engine_load.py) on the tiny model (CPU): one
rate's points, and the flags that need a CUDA device."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from splitserve.benchmarks import engine_load


@pytest.fixture(autouse=True)
def _unfrozen_after() -> object:
    """engine_load freezes the heap as a started node does (launch/gc_heap.py); this test
    process must not stay frozen for the tests that run in it next (tests/test_gc_heap.py)."""
    yield
    gc.unfreeze()


def _argv(tiny_llama: Path) -> list[str]:
    argv = ["--model", str(tiny_llama), "--dtype", "float32", "--rates", "40"]
    return [*argv, "--num-requests", "6", "--num-warmup", "1", "--input-len", "12"]


def test_a_rate_reports_latencies_and_steps(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    engine_load.main([*_argv(tiny_llama), "--output-len", "4", "--out", str(out)])
    (point,) = json.loads(out.read_text())["points"]
    assert point["rate"] == 40 and point["tpot_ms"]["p50"] > 0 and point["ttft_ms"]["p50"] > 0
    assert point["steps"]["prefill_steps"]["num"] >= 1 and point["output_tok_s"] > 0
    assert "launch_lag" not in point and "device_timeline" not in point
    costs = point["request_costs"]  # six requests of four tokens
    assert costs["num_requests"] == 6 and costs["decode_ms"] > 0


def test_the_engine_on_its_own_thread_gives_each_request_its_tokens(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """--async-engine: arrivals from an event loop, outputs through AsyncEngine's callbacks
    (every request's tokens, timed at their steps' ends); no step records then."""
    out = tmp_path / "load.json"
    engine_load.main([*_argv(tiny_llama), "--output-len", "5", "--async-engine", "--out", str(out)])
    result = json.loads(out.read_text())
    (point,) = result["points"]
    assert result["async_engine"] is True and point["steps"] is None
    assert point["tpot_ms"]["p50"] > 0 and point["ttft_ms"]["p50"] > 0
    assert point["output_tok_s"] * point["elapsed_s"] == pytest.approx(6 * 5)
    assert point["request_costs"]["num_requests"] == 6


def test_the_engine_thread_ticks_the_window_and_takes_its_summary(tiny_llama: Path) -> None:
    """--async-engine with a window (launch probes on CUDA): ticked before each step on
    the engine thread, with the seconds since the rate began, and summarised there."""
    import threading

    import numpy as np

    from splitserve.engine.core import EngineCore
    from splitserve.engine.sampling_params import SamplingParams

    class Window:
        def __init__(self) -> None:
            self.ticks: list[tuple[str, float]] = []

        def tick(self, now: float) -> None:
            self.ticks.append((threading.current_thread().name, now))

        def summary(self) -> str:
            return threading.current_thread().name

    args = engine_load.parse_args(_argv(tiny_llama))
    threaded = engine_load._Threaded(EngineCore(engine_load.engine_config_from_args(args)))
    try:
        window = Window()
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        timeline = threaded.drive([[1, 2, 3], [4, 5]], np.array([0.0, 0.01]), params, window)
        assert sorted(map(len, timeline.token_times.values())) == [3, 3]
        assert window.ticks and {name for name, _ in window.ticks} == {"engine-loop"}
        times = [now for _, now in window.ticks]
        assert times == sorted(times) and times[0] >= 0
        assert engine_load._on_engine_thread(threaded, window.summary) == "engine-loop"
        assert engine_load._on_engine_thread(None, window.summary) == "MainThread"
    finally:
        threaded.engine.shutdown()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--launch-lag-s", "2"], "needs --device cuda"),
        (
            ["--launch-lag-s", "2", "--profile-s", "1", "--device", "cuda"],
            "not given with --profile-s",
        ),
        (["--launch-lag-s", "-1"], "must be >= 0"),
        (["--async-engine", "--profile-s", "1", "--device", "cuda"], "no --profile-s"),
    ],
)
def test_launch_lag_flags_are_checked(
    tiny_llama: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        engine_load.parse_args([*_argv(tiny_llama), *extra])
    assert message in capsys.readouterr().err
