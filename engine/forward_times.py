"""ForwardTimes: every forward pass's device time, by kind, summed since the engine started.

A forward pass is one `ModelRunner.execute` call (the model and its logits; the draw that
follows is not in it). Its kind is `DECODE` when every row of the step is one token, else
`PREFILL` (a prompt's chunk, alone or beside decode rows). For each kind the engine's
statistics carry the passes, their rows and their device seconds (engine/stats.py), the
node's Stats answer carries them in its extra map and the router exports them per node
(protocol/messages.py, router/metrics.py): over a serving run, device seconds over the
run's wall time is the share of it the device spent in forward passes, and the mean per
pass is what the engine alone measures under the same load (benchmarks/engine_load.py).

On CUDA two events, recorded on the current stream before and after the call, time it on
the device; a pass is read once its end event has completed, through `Event.query()`,
never a wait: at a later pass or when the totals are read (the step's own readback has
usually completed it by then). Events go back to a free list once read. On the CPU a pass
runs synchronously, so its host time (`time.perf_counter` around the call) is its device
time.

Who calls what: the model runner calls `start()` before a pass and `end(mark, kind, rows)`
after it, on the engine thread; `collect_stats` calls `totals()` there too.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

DECODE = "decode"
PREFILL = "prefill"
KINDS = (DECODE, PREFILL)


class TimingEvent(Protocol):
    """What ForwardTimes needs of a device event (torch.cuda.Event(enable_timing=True))."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def elapsed_time(self, end: Any) -> float: ...


@dataclass
class KindTotals:
    """One kind's passes since start: how many, their rows, their device seconds."""

    num: int = 0
    rows: int = 0
    device_s: float = 0.0


class ForwardTimes:
    def __init__(self, new_event: Callable[[], TimingEvent] | None = None) -> None:
        """`new_event` makes a timing event (CUDA); None times passes on the host clock."""
        self._new_event = new_event
        self._free: list[TimingEvent] = []
        # Passes not read yet, oldest first: (start event, end event, kind, rows).
        self._pending: deque[tuple[TimingEvent, TimingEvent, str, int]] = deque()
        self._totals = {kind: KindTotals() for kind in KINDS}

    @classmethod
    def for_device(cls, device_type: str) -> ForwardTimes:
        """CUDA events on a CUDA device, the host clock elsewhere."""
        if device_type != "cuda":
            return cls()
        import torch

        return cls(lambda: torch.cuda.Event(enable_timing=True))

    def start(self) -> TimingEvent | float:
        """Mark a pass's start (call right before it)."""
        if self._new_event is None:
            return time.perf_counter()
        event = self._event()
        event.record()
        return event

    def end(self, mark: TimingEvent | float, kind: str, rows: int) -> None:
        """Mark the end of the pass `start` returned `mark` for."""
        if isinstance(mark, float):
            self._add(kind, rows, time.perf_counter() - mark)
            return
        event = self._event()
        event.record()
        self._pending.append((mark, event, kind, rows))
        self._read_completed()

    def totals(self) -> dict[str, KindTotals]:
        """Each kind's totals over the passes read so far (a copy)."""
        self._read_completed()
        return {k: KindTotals(t.num, t.rows, t.device_s) for k, t in self._totals.items()}

    def _event(self) -> TimingEvent:
        assert self._new_event is not None
        return self._free.pop() if self._free else self._new_event()

    def _read_completed(self) -> None:
        while self._pending and self._pending[0][1].query():
            start, end, kind, rows = self._pending.popleft()
            self._add(kind, rows, start.elapsed_time(end) / 1e3)
            self._free += (start, end)

    def _add(self, kind: str, rows: int, seconds: float) -> None:
        totals = self._totals[kind]
        totals.num += 1
        totals.rows += rows
        totals.device_s += seconds
