"""Where a profiled stretch of engine steps left the device idle, and what the host was
doing then.

`timeline_summary(prof)` reads a torch.profiler run (CPU and CUDA activities) of whole
engine steps, as `benchmarks/engine_load.py --profile-s` records one under load, and
returns:

- the device span (first kernel start to last kernel end), the time at least one kernel
  ran (the union of kernel intervals: kernels of two streams that overlap count once), and
  the idle time between;
- idle gaps by size (over 20 µs, 100 µs and 1 ms: count and total ms);
- idle time by the host phase running when each gap began: the engine's `step.*` ranges
  (engine/core.py, engine/overlap.py: outputs, schedule, model, sample) or "other" (the
  benchmark's own loop, the profiler);
- kernel time by kind: GEMMs, attention, and the rest;
- idle time by the innermost host op open when each gap began (`idle_ms_by_host_op`, the
  twelve ops with the most: a synchronising copy, a launch, the engine's own Python);
- the largest gaps one by one (`largest_gaps`): length, host phase, the innermost host op
  open when the gap began (any profiled CPU op: a launch, a copy, a synchronisation) and
  the kernels either side, and, when the profiler recorded stacks, the Python frames
  around that op (outside torch and the standard library), so that a gap can be traced to
  the code that left it.

The device is idle in a gap because nothing was queued: the host had not yet launched
the next kernel. A gap that begins while the host is in `step.schedule` is time the
device waited for the scheduler.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from typing import Any

import torch

GAP_THRESHOLDS_US = (20, 100, 1000)
NUM_LARGEST_GAPS = 12
NUM_HOST_OPS = 12
_MAX_HOST_WALK = 20_000
_STACK_FRAMES = 6
_FOREIGN_PATHS = ("site-packages/", "dist-packages/", "/lib/python3", "threading.py(")
# Substrings of kernel names, lower-cased, per kind (the first kind that matches wins).
KERNEL_KINDS = (
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "splitk")),
    ("attention", ("flash", "_decode_", "_prefill_", "attention", "fmha")),
)
STEP_PREFIX = "step."


def device_kernels(prof: Any) -> list[Any]:
    """A torch.profiler run's device kernels, without the engine's named `step.*` ranges
    (which the profiler also shows on the device)."""
    return [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(STEP_PREFIX)
    ]


def _kind(name: str) -> str:
    lowered = name.lower()
    for kind, words in KERNEL_KINDS:
        if any(w in lowered for w in words):
            return kind
    return "other"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _host_phase(ranges: list[tuple[float, float, str]], starts: list[float], t: float) -> str:
    """The innermost `step.*` range open on the host at time t, or "other"."""
    i = bisect.bisect_right(starts, t) - 1
    while i >= 0:
        start, end, name = ranges[i]
        if start <= t <= end:
            return name
        if t - start > 1e6:  # no step range lasts a second
            break
        i -= 1
    return "other"


class _HostOps:
    """The profile's CPU ops, sorted by start, to find the innermost one open at a time."""

    def __init__(self, prof: Any) -> None:
        self.events = sorted(
            (e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CUDA),
            key=lambda e: e.time_range.start,
        )
        self.starts = [e.time_range.start for e in self.events]

    def _innermost(self, t: float) -> Any:
        """The op open at time t that began last, or None when none is (the walk back stops
        after `_MAX_HOST_WALK` ops)."""
        i = bisect.bisect_right(self.starts, t) - 1
        for j in range(i, max(-1, i - _MAX_HOST_WALK), -1):
            event = self.events[j]
            if event.time_range.start <= t <= event.time_range.end:
                return event
        return None

    def innermost(self, t: float) -> str:
        """The name of the op open at time t that began last, or "" when none is."""
        event = self._innermost(t)
        return "" if event is None else event.name

    def stack(self, t: float) -> list[str]:
        """The Python frames (outside torch and the standard library) around the innermost
        op open at time t, innermost first, when the profiler recorded them (`with_stack`:
        each frame is a CPU event, "file(line): function", among the op's `cpu_parent`s);
        else []."""
        frames: list[str] = []
        event = self._innermost(t)
        while event is not None and len(frames) < _STACK_FRAMES:
            if _is_own_frame(event.name):
                frames.append(event.name)
            event = getattr(event, "cpu_parent", None)
        return frames


def _is_own_frame(name: str) -> bool:
    """A Python frame event ("file.py(line): function") outside torch and the installed
    packages and standard library."""
    return (
        ".py(" in name
        and not name.startswith(("torch/", "<"))
        and not any(part in name for part in _FOREIGN_PATHS)
    )


def _idle_by(gaps: list[tuple[float, float]], key_of: Callable[[float], str]) -> dict[str, float]:
    """Idle ms of the gaps over `GAP_THRESHOLDS_US[0]`, summed by `key_of(gap start)`."""
    idle: dict[str, float] = {}
    for gap, began in gaps:
        if gap > GAP_THRESHOLDS_US[0]:
            key = key_of(began)
            idle[key] = idle.get(key, 0.0) + gap / 1e3
    return idle


def _largest_gaps(
    gaps: list[tuple[float, float]],
    kernels: list[tuple[float, float, str]],
    host_ops: _HostOps,
    phase_of: Callable[[float], str],
) -> list[dict[str, Any]]:
    """The `NUM_LARGEST_GAPS` longest of `gaps` ((length, start) between busy intervals),
    longest first (see the module docstring)."""
    ordered = sorted(kernels)
    kernel_starts = [start for start, _, _ in ordered]
    # A gap begins at some kernel's end and ends at some kernel's start.
    ending_at = {end: name for _, end, name in kernels}
    out = []
    for gap, began in sorted(gaps, reverse=True)[:NUM_LARGEST_GAPS]:
        after = ordered[bisect.bisect_left(kernel_starts, began + gap)]
        out.append(
            {
                "ms": gap / 1e3,
                "host_phase": phase_of(began),
                "host_op": host_ops.innermost(began),
                "kernel_before": ending_at[began],
                "kernel_after": after[2],
                "host_stack": host_ops.stack(began),
            }
        )
    return out


def timeline_summary(prof: Any) -> dict[str, Any]:
    """The summary described in the module docstring; times in ms."""
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in device_kernels(prof)]
    if not kernels:
        return {"num_kernels": 0}
    host_ops = _HostOps(prof)
    ranges = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in host_ops.events
        if e.name.startswith(STEP_PREFIX)
    ]
    starts = [r[0] for r in ranges]
    busy = _union([(s, e) for s, e, _ in kernels])
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(e - s for s, e in busy)
    gaps = [(b[0] - a[1], a[1]) for a, b in itertools.pairwise(busy)]
    by_kind: dict[str, float] = {}
    for start, end, name in kernels:
        kind = _kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + (end - start) / 1e3

    def phase_of(t: float) -> str:
        return _host_phase(ranges, starts, t)

    idle_by_op = _idle_by(gaps, lambda t: host_ops.innermost(t) or "none")
    return {
        "num_kernels": len(kernels),
        "span_ms": span / 1e3,
        "busy_ms": busy_us / 1e3,
        "idle_ms": (span - busy_us) / 1e3,
        "gaps": {
            f"over_{t}us": {
                "num": sum(1 for g, _ in gaps if g > t),
                "total_ms": sum(g for g, _ in gaps if g > t) / 1e3,
            }
            for t in GAP_THRESHOLDS_US
        },
        "idle_ms_by_host_phase": _idle_by(gaps, phase_of),
        "kernel_ms_by_kind": by_kind,
        "idle_ms_by_host_op": dict(
            sorted(idle_by_op.items(), key=lambda item: -item[1])[:NUM_HOST_OPS]
        ),
        "largest_gaps": _largest_gaps(gaps, kernels, host_ops, phase_of),
    }
