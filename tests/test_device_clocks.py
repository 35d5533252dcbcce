"""benchmarks/device_clocks.py: nvidia-smi's samples parsed and summarised, and the sampler
run as a real child process (a stand-in for nvidia-smi that prints the same lines)."""

from __future__ import annotations

import sys
import time

import pytest

from splitserve.benchmarks.device_clocks import (
    ClockSampler,
    nvidia_smi_command,
    parse_samples,
    summarize,
)

# What `nvidia-smi --query-gpu=<FIELDS> --format=csv,noheader,nounits` prints, a line a sample.
SMI_LINES = """1980, 2619, 412.35, 45, 0x0000000000000000
1755, 2619, 699.80, 52, 0x0000000000000004
[N/A], 2619, 300.00, 50, 0x0000000000000000
1980, 2619
"""

# A stand-in for `nvidia-smi --loop-ms=20`: the same two samples again and again until ended.
FAKE_SMI = [
    sys.executable, "-c",
    "import sys, time\n"
    "while True:\n"
    "    print('1980, 2619, 412.35, 45, 0x0000000000000000', flush=True)\n"
    "    print('1755, 2619, 699.80, 52, 0x0000000000000004', flush=True)\n"
    "    time.sleep(0.02)\n",
]  # fmt: skip


def test_samples_are_the_whole_lines_of_numbers_and_a_mask() -> None:
    samples = parse_samples(SMI_LINES)
    assert [(s.sm_mhz, s.power_w, s.reasons) for s in samples] == [
        (1980.0, 412.35, "0x0000000000000000"),
        (1755.0, 699.8, "0x0000000000000004"),
    ]


def test_summary_gives_medians_extremes_and_reason_counts() -> None:
    summary = summarize(parse_samples(SMI_LINES))
    assert summary["samples"] == 2
    assert summary["sm_mhz"] == {"median": 1867.5, "min": 1755.0, "max": 1980.0}
    assert summary["power_w"]["max"] == 699.8 and summary["temp_c"]["min"] == 45.0
    assert summary["event_reasons"] == {"0x0000000000000000": 1, "0x0000000000000004": 1}
    assert summarize([]) == {"samples": 0}


def test_the_command_queries_one_device_every_period() -> None:
    command = nvidia_smi_command(3, period_ms=50)
    assert command[0] == "nvidia-smi" and "--id=3" in command and "--loop-ms=50" in command
    assert "--format=csv,noheader,nounits" in command


def test_sampler_collects_what_the_child_printed_while_the_phase_ran() -> None:
    with ClockSampler(command=FAKE_SMI) as sampler:
        time.sleep(0.5)
    summary = sampler.summary()
    assert summary["samples"] >= 4
    assert summary["sm_mhz"]["min"] == 1755.0 and summary["sm_mhz"]["max"] == 1980.0


def test_a_failing_sampler_says_what_failed_and_a_missing_one_how_to_fix_it() -> None:
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('bad field'); sys.exit(2)"]
    with pytest.raises(RuntimeError, match="bad field"), ClockSampler(command=failing):
        time.sleep(0.3)
    with pytest.raises(RuntimeError, match="not on PATH"):
        ClockSampler(command=["no-such-nvidia-smi-here"])


def test_an_error_in_the_phase_is_the_one_raised() -> None:
    with pytest.raises(ValueError, match="the phase's own"), ClockSampler(command=FAKE_SMI):
        raise ValueError("the phase's own")


def test_samples_from_before_the_phase_are_left_out() -> None:
    # one sample at once (entering waits for it), the next ones half a second later
    late = [sys.executable, "-c", "import time\n"
            "print('1980, 2619, 400.0, 45, 0x0', flush=True)\n"
            "time.sleep(0.5)\n"
            "while True:\n"
            "    print('1755, 2619, 700.0, 50, 0x4', flush=True); time.sleep(0.01)\n"]  # fmt: skip
    with ClockSampler(command=late) as sampler:
        pass  # over before the second sample
    assert sampler.summary() == {"samples": 0}
    with ClockSampler(command=late) as sampler:
        time.sleep(0.8)
    assert set(sampler.summary()["event_reasons"]) == {"0x4"}


def test_a_query_the_driver_refuses_is_an_error_before_the_run(monkeypatch) -> None:
    from splitserve.benchmarks import device_clocks

    refusing = [sys.executable, "-c", "print('Field \"power.draw.instant\" is not a valid field')"]
    monkeypatch.setattr(device_clocks, "nvidia_smi_command", lambda index: [*refusing, "-loop"])
    with pytest.raises(RuntimeError, match="not a valid field"):
        device_clocks.check_query(0)
    answering = [sys.executable, "-c", "print('1980, 2619, 400.0, 45, 0x0')"]
    monkeypatch.setattr(device_clocks, "nvidia_smi_command", lambda index: [*answering, "-loop"])
    device_clocks.check_query(0)
