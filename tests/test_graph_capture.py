"""The collector pause around CUDA graph capture (engine/graph_capture.py): garbage there
is before the capture is freed first, garbage made during it waits until it ends."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from splitserve.engine.graph_capture import collector_paused


class Finalized:
    """An object in a reference cycle (only the collector frees it) that notes its end."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.cycle = log, name, self

    def __del__(self) -> None:
        self.log.append(self.name)


@pytest.fixture
def eager_collector() -> Iterator[None]:
    """The collector runs at every allocation while the test runs."""
    thresholds, enabled = gc.get_threshold(), gc.isenabled()
    gc.enable()
    gc.set_threshold(1, 1, 1)
    yield
    gc.set_threshold(*thresholds)
    if not enabled:
        gc.disable()


def _allocate(count: int) -> list[Any]:
    return [[i] for i in range(count)]


def test_garbage_before_is_freed_and_garbage_during_waits(eager_collector) -> None:
    log: list[str] = []
    gc.disable()
    Finalized(log, "before")
    gc.enable()
    gc.set_threshold(1, 1, 1)
    with collector_paused():
        assert log == ["before"], "garbage from before the capture was not freed first"
        assert not gc.isenabled()
        Finalized(log, "during")
        _allocate(1000)  # would collect it, were the collector on
        assert log == ["before"]
    assert gc.isenabled()
    _allocate(1000)
    assert log == ["before", "during"]


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_is_back_on_after_an_error(eager_collector) -> None:
    with pytest.raises(RuntimeError, match="capture failed"), collector_paused():
        raise RuntimeError("capture failed")
    assert gc.isenabled()
