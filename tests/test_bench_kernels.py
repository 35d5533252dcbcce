"""The kernel micro-benchmark's command line (benchmarks/kernels.py) on the CPU: its smoke
run, and the vLLM FlashAttention-3 comparison, refused with a hint where vLLM is absent;
on a GPU, its queued timing against do_bench."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from splitserve.benchmarks import kernels


def test_a_smoke_run_writes_rows_with_their_provenance(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    assert kernels.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] and result["provenance"]["command"].startswith("python3 -m")
    assert not kernels.parse_args([]).vllm_fa3 and kernels.parse_args(["--vllm-fa3"]).vllm_fa3


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_fa3_without_vllm_is_refused_with_a_hint() -> None:
    with pytest.raises(RuntimeError, match=r"source /tmp/site/vllm_env\.sh"):
        kernels._fresh_call(kernels.VLLM_FA3, None, 16)


def test_queued_is_recorded_and_off_by_default() -> None:
    assert not kernels.parse_args([]).queued and kernels.parse_args(["--queued"]).queued
    assert kernels.Timer(smoke=False, queued=True).queued


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_queued_timing_leaves_out_the_host_and_keeps_the_device() -> None:
    """A call that holds the host 2 ms around 0.2 ms of device work: do_bench times the
    host's pace, the queued timer the device's; a call of 2 ms on the device alone is
    timed at 2 ms by both."""
    cycles_per_ms = 1_000_000  # torch.cuda._sleep counts clock cycles (about 1-2 GHz)

    def host_bound() -> None:
        torch.cuda._sleep(cycles_per_ms // 5)
        time.sleep(0.002)

    def device_bound() -> None:
        torch.cuda._sleep(2 * cycles_per_ms)

    device_ms = kernels.queued_ms(device_bound)
    assert kernels.Timer(smoke=False)(host_bound) >= 2.0
    assert kernels.queued_ms(host_bound) < 0.4 * device_ms
    queued = kernels.Timer(smoke=False, queued=True)
    assert queued(device_bound) == pytest.approx(device_ms, rel=0.2)
