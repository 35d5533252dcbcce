"""Launch probes (engine/launch_probes.py) on a simulated device: the host queues work
that a device runs in order, each op taking its own time. A forward pass run as it comes
and one with the device held back tell the device's work from its waits for the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from splitserve.engine.launch_probes import LagWindow, LaunchProbes, host_waits


@dataclass
class SimDevice:
    """Host clock `now` (s), advanced by the host's work; the device runs queued work in
    order from when it is queued."""

    now: float = 0.0
    free_at: float = 0.0
    log: list[str] = field(default_factory=list)

    def host(self, seconds: float) -> None:
        self.now += seconds

    def queue(self, seconds: float) -> None:
        self.free_at = max(self.now, self.free_at) + seconds

    def queue_ms(self, ms: float) -> None:
        self.queue(ms / 1e3)

    def synchronize(self) -> None:
        self.now = max(self.now, self.free_at)

    def new_event(self) -> Any:
        device = self

        class Event:
            at = 0.0

            def record(self) -> None:
                self.at = max(device.now, device.free_at)

            def elapsed_time(self, end: Any) -> float:
                return (end.at - self.at) * 1e3

        return Event()


class SimGraph:
    def __init__(self, device: SimDevice, seconds: float) -> None:
        self.device, self.seconds = device, seconds

    def replay(self) -> None:
        self.device.queue(self.seconds)


class SimRunner:
    """A piecewise-graph forward pass over `len(layers)` layers: piece i (a replay that
    takes the device `piece_s`), then layer i's attention call, where the host spends
    `host_s` launching and the device `attn_s` running. Steps past the graphs' sizes run
    the pieces eagerly (`_piece`)."""

    def __init__(
        self, device: SimDevice, num_layers: int, host_s: float, piece_s: float, attn_s: float
    ) -> None:
        self.device = device
        self.layers = [
            SimpleNamespace(self_attn=SimpleNamespace(attend=self._attend))
            for _ in range(num_layers)
        ]
        graphs = [SimGraph(device, piece_s) for _ in range(num_layers + 1)]
        self.pieces = SimpleNamespace(_graphs={64: graphs}, _piece=self._eager_piece)
        self.host_s, self.piece_s, self.attn_s = host_s, piece_s, attn_s

    def _attend(self) -> None:
        self.device.host(self.host_s)
        self.device.queue(self.attn_s)

    def _eager_piece(self, index: int, size: int) -> None:
        self.device.queue(self.piece_s)

    def execute(self, chunks: list[Any], pending: Any = None) -> str:
        tokens = sum(c.num_new_tokens for c in chunks)
        graphs = self.pieces._graphs.get(tokens)
        for index in range(len(self.layers) + 1):
            if graphs is not None:
                graphs[index].replay()
            else:
                self.pieces._piece(index, tokens)
            if index < len(self.layers):
                self.layers[index].self_attn.attend()
        return "logits"


def _chunks(rows: int, tokens: int) -> list[Any]:
    sizes = [tokens - rows + 1] + [1] * (rows - 1)
    return [SimpleNamespace(num_new_tokens=n) for n in sizes]


def _probed(runner: SimRunner) -> LaunchProbes:
    device = runner.device
    probes = LaunchProbes(device.new_event, lambda: device.now, device.synchronize, device.queue_ms)
    probes.install(runner, runner.layers)
    return probes


def _run(runner: SimRunner, probes: LaunchProbes, hold_ms: float, queued_s: float) -> Any:
    """One forward pass of a prompt and two decode rows after `queued_s` of work."""
    probes.start(hold_ms=hold_ms)
    runner.device.queue(queued_s)
    assert runner.execute(_chunks(3, 1026)) == "logits"
    (forward,) = probes.stop()
    return forward


def test_a_device_with_work_queued_never_waits_for_the_host() -> None:
    runner = SimRunner(SimDevice(), 4, host_s=100e-6, piece_s=500e-6, attn_s=300e-6)
    probes = _probed(runner)
    as_is = _run(runner, probes, 0.0, 5e-3)
    held = _run(runner, probes, 60.0, 5e-3)
    pieces_and_attention = [f"{kind}{i}" for i in range(4) for kind in ("piece", "attn")]
    assert as_is.labels == ["start", *pieces_and_attention, "piece4", "end"]
    summary = as_is.summary()
    assert (summary["rows"], summary["tokens"], summary["points"]) == (3, 1026, 11)
    assert summary["lead_at_start_ms"] == pytest.approx(5.0)
    assert summary["device_ms"] == pytest.approx(5 * 0.5 + 4 * 0.3)
    waits = host_waits([as_is], [held])
    assert waits["wait_ms"] == pytest.approx(0.0, abs=1e-9)
    assert waits["work_ms"] == pytest.approx(5 * 0.5 + 4 * 0.3)


def test_a_host_bound_pass_shows_its_waits_where_the_queue_ran_dry() -> None:
    # The host spends 0.9 ms a layer launching attention; the device runs 0.3 ms a layer.
    runner = SimRunner(SimDevice(), 6, host_s=900e-6, piece_s=200e-6, attn_s=100e-6)
    probes = _probed(runner)
    as_is = _run(runner, probes, 0.0, 1e-3)
    held = _run(runner, probes, 60.0, 1e-3)
    # Held back, the device's time per interval is its work alone.
    assert held.intervals()["attn3->piece4"] == pytest.approx(0.1)
    assert held.intervals()["piece4->attn4"] == pytest.approx(0.2)
    waits = host_waits([as_is, as_is], [held])
    # The 1 ms queued covers layer 0 and part of layer 1's attention launch; from layer 2
    # on the device waits 0.9 - 0.3 = 0.6 ms a layer while the host launches attention.
    longest = waits["longest_waits_ms"]
    assert all(longest[f"attn{i}->piece{i + 1}"] == pytest.approx(0.6) for i in range(2, 6))
    assert longest["attn1->piece2"] == pytest.approx(0.3)
    assert list(longest)[4] == "attn1->piece2" and max(list(longest.values())[5:]) < 1e-9
    assert waits["wait_ms"] == pytest.approx(
        as_is.summary()["device_ms"] - held.summary()["device_ms"]
    )
    assert waits["num_as_is"] == 2 and waits["num_held"] == 1


def test_eager_pieces_are_probed_too() -> None:
    runner = SimRunner(SimDevice(), 2, host_s=1e-4, piece_s=1e-4, attn_s=1e-4)
    probes = _probed(runner)
    probes.start()
    runner.execute(_chunks(2, 100))  # no graphs of 100 tokens: pieces run eagerly
    (forward,) = probes.stop()
    assert forward.labels == ["start", "piece0", "attn0", "piece1", "attn1", "piece2", "end"]


def test_probes_record_nothing_unless_started() -> None:
    runner = SimRunner(SimDevice(), 2, host_s=1e-4, piece_s=1e-4, attn_s=1e-4)
    probes = _probed(runner)
    runner.execute(_chunks(1, 64))
    with pytest.raises(RuntimeError, match="without start"):
        probes.stop()
    probes.start()
    runner.execute(_chunks(2, 64))
    runner.execute(_chunks(2, 64))
    assert [len(f.labels) for f in probes.stop()] == [7, 7]
    assert host_waits([], []) == {"num_as_is": 0, "num_held": 0}


def test_a_lag_window_probes_its_stretch_and_counts_drained_starts() -> None:
    runner = SimRunner(SimDevice(), 2, host_s=1e-4, piece_s=2e-4, attn_s=1e-4)
    device = runner.device
    probes = _probed(runner)
    window = LagWindow(probes, after_s=1.0, length_s=2.0)
    window.tick(0.5)
    runner.execute(_chunks(2, 2))  # before the window: not probed
    window.tick(1.0)
    runner.execute(_chunks(3, 1026))  # a prompt on a drained device
    device.queue(5e-3)
    runner.execute(_chunks(3, 3))  # decode rows behind 5 ms of work
    runner.execute(_chunks(3, 3))
    window.tick(3.5)
    runner.execute(_chunks(3, 1026))  # after the window: not probed
    summary = window.summary()
    assert summary is not None and (summary["after_s"], summary["length_s"]) == (1.0, 2.0)
    prompt, decode = summary["prompt_forwards"], summary["decode_forwards"]
    assert (prompt["num"], prompt["drained_at_start"]) == (1, 1)
    assert (decode["num"], decode["drained_at_start"]) == (2, 0)
    assert decode["lead_at_start_ms"] > 1.0 and prompt["tokens"] == 1026
    # Means beside the medians: of one prompt pass, its own figures and intervals.
    assert prompt["mean"]["device_ms"] == pytest.approx(prompt["device_ms"])
    assert sum(prompt["mean"]["intervals_ms"].values()) == pytest.approx(prompt["device_ms"])
    assert decode["mean"]["lead_at_start_ms"] > 1.0


def test_a_lag_window_the_run_never_reached_has_no_summary() -> None:
    runner = SimRunner(SimDevice(), 1, host_s=1e-4, piece_s=1e-4, attn_s=1e-4)
    window = LagWindow(_probed(runner), after_s=10.0, length_s=1.0)
    window.tick(2.0)
    runner.execute(_chunks(1, 64))
    assert window.summary() is None
