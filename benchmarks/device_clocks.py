"""The device's clocks and power while a benchmark phase runs, from `nvidia-smi`.

    with ClockSampler() as sampler:
        ...                                   # the phase: steps on the device
    summary = sampler.summary()               # medians, extremes, event reasons

`ClockSampler` starts `nvidia-smi --query-gpu=... --loop-ms=PERIOD` as a child process
when the phase begins (entering waits for its first sample) and ends it when the phase
ends; each line it printed in between is one sample of the SM and memory clocks (MHz), the
instantaneous power (W), the temperature (°C) and the active clock event reasons (the bit
mask of why the SM clock is below its maximum: power cap, thermal, ...). Two engines whose
same kernels take different times can be told apart this way: the same kernel at a lower
SM clock is slower, whatever the engine around it. Nothing is read from the device by this
process itself.
"""

from __future__ import annotations

import collections
import dataclasses
import shutil
import statistics
import subprocess
import threading
from typing import Any

FIELDS = (
    "clocks.sm",
    "clocks.mem",
    "power.draw.instant",
    "temperature.gpu",
    "clocks_event_reasons.active",
)
PERIOD_MS = 20
# How long entering a sampler waits for nvidia-smi's first sample.
START_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class ClockSample:
    sm_mhz: float
    mem_mhz: float
    power_w: float
    temp_c: float
    reasons: str  # the event-reason mask as nvidia-smi prints it, e.g. "0x0000000000000004"


def nvidia_smi_command(device_index: int, period_ms: int = PERIOD_MS) -> list[str]:
    return [
        "nvidia-smi", f"--id={device_index}", f"--query-gpu={','.join(FIELDS)}",
        "--format=csv,noheader,nounits", f"--loop-ms={period_ms}",
    ]  # fmt: skip


def require_on_path(program: str) -> None:
    if shutil.which(program) is None:
        raise RuntimeError(
            f"{program} is not on PATH: clock sampling needs the NVIDIA driver's tools (run on "
            "the GPU machine, or leave --clocks off)"
        )


def check_query(device_index: int = 0) -> None:
    """One query of every field, before a run relies on them: RuntimeError with what
    nvidia-smi said when the driver lacks one (older drivers name them differently)."""
    command = nvidia_smi_command(device_index)[:-1]  # no loop: one sample
    require_on_path(command[0])
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or not parse_samples(done.stdout):
        said = (done.stdout + done.stderr).strip()[:300]
        raise RuntimeError(f"{' '.join(command)} gave no sample: {said or 'no output'}")


def parse_samples(text: str) -> list[ClockSample]:
    """One sample a line of `--format=csv,noheader,nounits` output; lines that are not five
    numbers-and-mask (a partial last line, "[N/A]") are left out."""
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(FIELDS):
            continue
        try:
            numbers = [float(p) for p in parts[:4]]
        except ValueError:
            continue
        samples.append(ClockSample(numbers[0], numbers[1], numbers[2], numbers[3], parts[4]))
    return samples


def summarize(samples: list[ClockSample]) -> dict[str, Any]:
    """Medians and extremes of each quantity, and how many samples had each reason mask."""
    if not samples:
        return {"samples": 0}

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {
        "samples": len(samples),
        "sm_mhz": spread([s.sm_mhz for s in samples]),
        "mem_mhz": spread([s.mem_mhz for s in samples]),
        "power_w": spread([s.power_w for s in samples]),
        "temp_c": spread([s.temp_c for s in samples]),
        "event_reasons": dict(collections.Counter(s.reasons for s in samples)),
    }


class ClockSampler:
    """Samples the device while the `with` block runs (the module's docstring). Entering
    waits for the first sample, so the phase starts with the sampler running; samples
    taken before then are left out."""

    def __init__(self, device_index: int = 0, command: list[str] | None = None) -> None:
        self._command = command or nvidia_smi_command(device_index)
        require_on_path(self._command[0])
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._lines: list[str] = []
        self._first = threading.Event()
        self._skip = 0

    def __enter__(self) -> ClockSampler:
        self._process = subprocess.Popen(
            self._command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, name="clock-sampler", daemon=True)
        self._reader.start()
        self._first.wait(timeout=START_TIMEOUT_S)
        if not self._lines:
            err = self._stop()
            raise RuntimeError(
                f"{' '.join(self._command)} gave no sample in {START_TIMEOUT_S:.0f} s: "
                f"{err.strip()[:300] or 'no output'}"
            )
        self._skip = len(self._lines)
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.append(line)
            self._first.set()
        self._first.set()  # the child ended

    def _stop(self) -> str:
        """End the child and the reader; the child's stderr."""
        assert self._process is not None and self._reader is not None
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        finally:
            self._reader.join(timeout=10)
        assert self._process.stderr is not None
        return self._process.stderr.read()

    def __exit__(self, *exc_info: object) -> None:
        self._stop()  # an error of the phase's own goes on up

    def summary(self) -> dict[str, Any]:
        return summarize(parse_samples("".join(self._lines[self._skip :])))
