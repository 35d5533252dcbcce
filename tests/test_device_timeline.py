"""benchmarks/device_timeline.py on a hand-made profile: kernels of two streams that
overlap count once, idle gaps are binned by size and charged to the host's `step.*`
range open when they began, kernel time is split by kind."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from splitserve.benchmarks.device_timeline import timeline_summary

CUDA = torch.autograd.DeviceType.CUDA
CPU = torch.autograd.DeviceType.CPU


def _event(name: str, start: float, end: float, device=CUDA) -> SimpleNamespace:
    return SimpleNamespace(
        name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end)
    )


class _Prof:
    def __init__(self, events: list[SimpleNamespace]) -> None:
        self._events = events

    def events(self) -> list[SimpleNamespace]:
        return self._events


def test_idle_gaps_are_charged_to_the_host_phase_they_began_in() -> None:
    thread_frame = _event("/usr/lib/threading.py(1): run", 1000, 3000, CPU)
    schedule_frame = _event("/x/splitserve/engine/scheduler.py(90): schedule", 1000, 2000, CPU)
    copy_ = _event("aten::copy_", 1050, 1400, CPU)
    copy_.cpu_parent, schedule_frame.cpu_parent = schedule_frame, thread_frame
    events = [
        # host: a step's model launches, then the next step's scheduling
        _event("step.model", 0, 1000, CPU),
        _event("step.schedule", 1000, 3000, CPU),
        _event("step.model", 3000, 4000, CPU),
        # with_stack: the copy's Python frames are CPU events too, its parents (only this
        # project's frames are kept)
        copy_,
        schedule_frame,
        thread_frame,
        # device: a GEMM, a decode kernel overlapping the flash kernel on another stream
        _event("sm90_xmma_gemm_bf16", 0, 400),
        _event("_decode_split_kernel", 400, 700),
        _event("flash_fwd_kernel", 500, 900),
        # a 30 us gap (model), then a 1,500 us gap that began during scheduling
        _event("rmsnorm_kernel", 930, 1100),
        _event("sm90_xmma_gemm_bf16", 2600, 3000),
        _event("step.model", 2600, 2700),  # a CUDA-side range mirror: not a kernel
    ]
    out = timeline_summary(_Prof(events))
    assert out["num_kernels"] == 5
    assert out["span_ms"] == pytest.approx(3.0)
    assert out["busy_ms"] == pytest.approx((900 + 170 + 400) / 1e3)
    assert out["idle_ms"] == pytest.approx((30 + 1500) / 1e3)
    assert out["gaps"]["over_20us"] == {"num": 2, "total_ms": pytest.approx(1.53)}
    assert out["gaps"]["over_100us"] == {"num": 1, "total_ms": pytest.approx(1.5)}
    assert out["gaps"]["over_1000us"]["num"] == 1
    assert out["idle_ms_by_host_phase"] == {
        "step.model": pytest.approx(0.03),
        "step.schedule": pytest.approx(1.5),
    }
    assert out["idle_ms_by_host_op"] == {
        "aten::copy_": pytest.approx(1.5),
        "step.model": pytest.approx(0.03),
    }
    # the longest gap first: the host was scheduling (innermost op: its copy)
    first, second = out["largest_gaps"]
    assert first == {
        "ms": pytest.approx(1.5),
        "host_phase": "step.schedule",
        "host_op": "aten::copy_",
        "kernel_before": "rmsnorm_kernel",
        "kernel_after": "sm90_xmma_gemm_bf16",
        "host_stack": ["/x/splitserve/engine/scheduler.py(90): schedule"],
    }
    assert second["ms"] == pytest.approx(0.03)
    assert (second["host_op"], second["kernel_before"]) == ("step.model", "flash_fwd_kernel")
    kinds = out["kernel_ms_by_kind"]
    assert kinds["gemm"] == pytest.approx(0.8)
    assert kinds["attention"] == pytest.approx(0.7)
    assert kinds["other"] == pytest.approx(0.17)


def test_a_profile_without_kernels_says_so() -> None:
    assert timeline_summary(_Prof([_event("step.model", 0, 10, CPU)])) == {"num_kernels": 0}
