"""Where a forward pass leaves the device waiting for the host, without a profiler.

A profiler adds host time to every op it records (docs/benchmarking.md: about 27 ms a
step under `engine_load --profile-s`), so the idle gaps it finds where the host is the
bottleneck are partly its own. These probes cost one CUDA event and one clock read each,
taken at the start of every `ModelRunner.execute` call, before each piece of a
piecewise-graph step (its graph replay, or the piece run eagerly past the graphs' sizes),
at each layer's attention call (the eager part between pieces) and at the end of the
call. After the device is synchronised, each event's device time is put on the host's
clock through a reference event recorded on the idle device. The probes' own host time
(an event created and recorded, a clock read: microseconds each, about 70 a prompt's
forward pass of a 32-layer model) is in what they measure.

The device's time from one point to the next is its work in that interval plus any time
it waited for the host there. To tell them apart, the same forward pass is run twice:
once as it comes, and once with the device held back (`start(hold_ms=...)` queues a sleep
kernel first), so that the host has queued the whole pass before the device starts it
and the device's time per interval is its work alone. The difference per interval is
the time the device waited for the host in it (`host_waits`), as long as nothing in the
pass makes the host wait for the device (which the held-back run would show as well).

Who calls what: `LaunchProbes.install(runner, layers)` wraps `runner.execute`, each
layer's `self_attn.attend` and the piecewise graphs' pieces (`runner.pieces`: its
captured graphs and `_piece`) with instance attributes (the engine's code is unchanged);
`start()` synchronises the device, records the reference and holds the device back if
asked; the engine steps; `stop()` synchronises and returns one `ForwardLag` per forward
pass since `start()`. `benchmarks/step_windows.py --launch-lag` runs them over windows of
a fresh prompt; `benchmarks/engine_load.py --launch-lag-s` over a stretch of a loaded run
and a serving node's `--launch-lag-s` over a stretch of its steps (node/launch_lag.py),
both through `LagWindow`, where a forward pass whose start finds the device already
drained is one whose launch the steps before it did not hide.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# The intervals `host_waits` lists, the longest waits first.
NUM_LONGEST_WAITS = 8
# A forward pass whose start the device reached within this many ms of the host queueing
# it found the device drained: nothing of the step before was left to hide its launch.
DRAINED_LEAD_MS = 0.05


class _Event(Protocol):
    def record(self) -> None: ...

    def elapsed_time(self, end: Any) -> float: ...


@dataclass(frozen=True)
class ForwardLag:
    """One forward pass: its rows and tokens, and per point its label and the host's and
    the device's time (ms since the reference)."""

    rows: int
    tokens: int
    labels: list[str]
    host_ms: list[float]
    device_ms: list[float]

    @property
    def carries_prompt(self) -> bool:
        """The pass computed prompt tokens (more tokens than rows), not only decode rows."""
        return self.tokens > self.rows

    def intervals(self) -> dict[str, float]:
        """The device's ms from each point to the next, keyed "label->next_label"."""
        pairs = zip(self.labels, self.labels[1:], strict=False)
        steps = zip(self.device_ms, self.device_ms[1:], strict=False)
        return {f"{a}->{b}": d1 - d0 for (a, b), (d0, d1) in zip(pairs, steps, strict=True)}

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "points": len(self.labels),
            # From the host's first probe to its last: the launch of the whole pass.
            "host_launch_ms": self.host_ms[-1] - self.host_ms[0],
            "device_ms": self.device_ms[-1] - self.device_ms[0],
            # How long the device still had to run when the host began the pass.
            "lead_at_start_ms": self.device_ms[0] - self.host_ms[0],
            "lead_at_end_ms": self.device_ms[-1] - self.host_ms[-1],
        }


@dataclass
class _Forward:
    rows: int
    tokens: int
    points: list[tuple[str, float, _Event]] = field(default_factory=list)


class _ProbedGraph:
    """A captured graph whose replay is probed first."""

    def __init__(self, graph: Any, replay: Callable[[], None]) -> None:
        self.graph = graph
        self.replay = replay


class LaunchProbes:
    """See the module docstring. `new_event`, `clock`, `synchronize` and `hold` (queue
    `ms` of device sleep) default to CUDA's and the host's perf_counter; tests give a
    simulated device."""

    def __init__(
        self,
        new_event: Callable[[], _Event] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        synchronize: Callable[[], None] | None = None,
        hold: Callable[[float], None] | None = None,
    ) -> None:
        if new_event is None or synchronize is None or hold is None:
            import torch

            new_event = new_event or (lambda: torch.cuda.Event(enable_timing=True))
            synchronize = synchronize or torch.cuda.synchronize
            hold = hold or CudaHold(torch).hold
        self._new_event = new_event
        self._clock = clock
        self._synchronize = synchronize
        self._hold = hold
        self._reference: tuple[float, _Event] | None = None
        self._forwards: list[_Forward] = []

    def install(self, runner: Any, layers: list[Any]) -> None:
        """Wrap `runner.execute`, each layer's `self_attn.attend` and `runner.pieces`."""
        execute = runner.execute

        def probed_execute(chunks: list[Any], *args: Any, **kwargs: Any) -> Any:
            if self._reference is None:
                return execute(chunks, *args, **kwargs)
            tokens = sum(c.num_new_tokens for c in chunks)
            self._forwards.append(_Forward(rows=len(chunks), tokens=tokens))
            self._point("start")
            result = execute(chunks, *args, **kwargs)
            self._point("end")
            return result

        runner.execute = probed_execute
        for index, layer in enumerate(layers):
            layer.self_attn.attend = self._probed(layer.self_attn.attend, f"attn{index}")
        pieces = getattr(runner, "pieces", None)
        if pieces is None:
            return
        for graphs in pieces._graphs.values():
            for index, graph in enumerate(graphs):
                graphs[index] = _ProbedGraph(graph, self._probed(graph.replay, f"piece{index}"))
        run_piece = pieces._piece

        def probed_piece(index: int, size: int) -> None:
            self._point(f"piece{index}")
            run_piece(index, size)

        pieces._piece = probed_piece

    def _probed(self, call: Callable[..., Any], label: str) -> Callable[..., Any]:
        def probed(*args: Any, **kwargs: Any) -> Any:
            self._point(label)
            return call(*args, **kwargs)

        return probed

    def _point(self, label: str) -> None:
        """A point of the forward pass in progress (none outside start/stop)."""
        if self._reference is None or not self._forwards:
            return
        event = self._new_event()
        self._forwards[-1].points.append((label, self._clock(), event))
        event.record()

    def start(self, hold_ms: float = 0.0) -> None:
        """Synchronise, record the reference on the idle device, then hold the device
        back `hold_ms` (0: not held)."""
        self._synchronize()
        self._forwards = []
        event = self._new_event()
        host = self._clock()
        event.record()
        self._reference = (host, event)
        if hold_ms > 0:
            self._hold(hold_ms)

    def stop(self) -> list[ForwardLag]:
        """Synchronise and return every forward pass since `start()`."""
        if self._reference is None:
            raise RuntimeError("LaunchProbes.stop() without start()")
        self._synchronize()
        host0, reference = self._reference
        self._reference = None
        out = []
        for forward in self._forwards:
            labels = [label for label, _, _ in forward.points]
            host = [(t - host0) * 1e3 for _, t, _ in forward.points]
            device = [reference.elapsed_time(event) for _, _, event in forward.points]
            out.append(ForwardLag(forward.rows, forward.tokens, labels, host, device))
        self._forwards = []
        return out


class CudaHold:
    """Queues a sleep kernel of about `ms` on the current stream (`torch.cuda._sleep`
    takes clock cycles: calibrated once with events)."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._cycles_per_ms: float | None = None

    def hold(self, ms: float) -> None:
        cuda = self._torch.cuda
        if self._cycles_per_ms is None:
            cycles = 10_000_000
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            start.record()
            cuda._sleep(cycles)
            end.record()
            end.synchronize()
            self._cycles_per_ms = cycles / start.elapsed_time(end)
        cuda._sleep(int(ms * self._cycles_per_ms))


def host_waits(as_is: list[ForwardLag], held: list[ForwardLag]) -> dict[str, Any]:
    """The device's wait for the host in forward passes of one shape: per interval, the
    median device time as they came less the median held back (its work alone), the
    longest waits first, and their sum; with both runs' medians of `ForwardLag.summary`."""
    if not as_is or not held:
        return {"num_as_is": len(as_is), "num_held": len(held)}
    came, work = _median_intervals(as_is), _median_intervals(held)
    waits = {k: came[k] - work[k] for k in came if k in work}
    longest = sorted(waits.items(), key=lambda kv: -kv[1])[:NUM_LONGEST_WAITS]
    return {
        "num_as_is": len(as_is),
        "num_held": len(held),
        "wait_ms": sum(w for w in waits.values() if w > 0),
        "work_ms": sum(work.values()),
        "longest_waits_ms": dict(longest),
        "as_is": _median_summary(as_is),
        "held": _median_summary(held),
    }


def _median_intervals(forwards: list[ForwardLag]) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for forward in forwards:
        for key, ms in forward.intervals().items():
            per.setdefault(key, []).append(ms)
    return {key: statistics.median(values) for key, values in per.items()}


def _median_summary(forwards: list[ForwardLag]) -> dict[str, float]:
    summaries = [f.summary() for f in forwards]
    return {key: statistics.median(s[key] for s in summaries) for key in summaries[0]}


def _means(forwards: list[ForwardLag]) -> dict[str, Any]:
    """The means of `ForwardLag.summary` and of each interval's device ms (a mean is where
    a few long waits show, which medians hide)."""
    summaries = [f.summary() for f in forwards]
    per: dict[str, list[float]] = {}
    for forward in forwards:
        for key, ms in forward.intervals().items():
            per.setdefault(key, []).append(ms)
    return {
        **{key: statistics.fmean(s[key] for s in summaries) for key in summaries[0]},
        "intervals_ms": {key: statistics.fmean(values) for key, values in per.items()},
    }


class LagWindow:
    """Launch probes over `length_s` seconds of steps from `after_s` into a loaded run
    (`engine_load --launch-lag-s`; the interface of its profiler window: `tick` before each
    step, then `summary`). Starting and stopping each synchronise the device once."""

    def __init__(self, probes: LaunchProbes, after_s: float, length_s: float) -> None:
        self.probes, self.after_s, self.length_s = probes, after_s, length_s
        self._started: float | None = None
        self._forwards: list[ForwardLag] | None = None

    def tick(self, now: float) -> None:
        """Called before each step with the seconds since the run started."""
        if self._forwards is not None:
            return
        if self._started is None and now >= self.after_s:
            self.probes.start()
            self._started = now
        elif self._started is not None and now >= self._started + self.length_s:
            self._forwards = self.probes.stop()

    @property
    def is_done(self) -> bool:
        """The window has run its length (its probes are stopped)."""
        return self._forwards is not None

    def summary(self) -> dict[str, Any] | None:
        """Per kind of forward pass (with prompt tokens, decode only): how many, how many
        found the device drained at their start, the medians of `ForwardLag.summary`, and
        under `mean` its means and each interval's mean device ms (None if the run ended
        before the window began)."""
        if self._started is None:
            return None
        if self._forwards is None:
            self._forwards = self.probes.stop()
        out: dict[str, Any] = {"after_s": self.after_s, "length_s": self.length_s}
        for name, prompt in (("prompt_forwards", True), ("decode_forwards", False)):
            mine = [f for f in self._forwards if f.carries_prompt == prompt]
            drained = [f for f in mine if f.summary()["lead_at_start_ms"] < DRAINED_LEAD_MS]
            out[name] = {
                "num": len(mine),
                "drained_at_start": len(drained),
                **(_median_summary(mine) if mine else {}),
                "mean": _means(mine) if mine else None,
            }
        return out
