"""When each session of a benchmark is meant to start (seconds after the benchmark start).

Open-loop processes are built as a unit-rate renewal process (gaps of mean 1) mapped
through the inverse of the cumulative target rate, so a ramp-up is a time change and the
steady state is untouched:

* ``poisson``: exponential gaps (coefficient of variation 1).
* ``gamma``: gamma gaps with shape 1/cv^2 and scale cv^2, so the mean rate is `rate` and the
  coefficient of variation of the gaps is `cv` (vLLM's ``--burstiness b`` is ``cv = 1/sqrt(b)``;
  DistServe's ``cv`` is the same as ours). cv > 1 is burstier than Poisson, cv < 1 smoother.
* ``constant``: equal gaps of 1/rate.
* ``trace``: the workload's own timestamps times `time_scale` (2.0 replays twice as slow).
* ``closed``: no schedule; the runner keeps `max_concurrency` sessions in flight.

The first arrival is at t = 0. As in vLLM, the unit-rate draws are rescaled so that the
last of n arrivals lands at unit time n - 1: the scheduled rate, (n - 1) / (last - first),
then equals the label exactly (without a ramp) and a sweep's points run at the rates they
are named by. The shape of the process (the relative gaps, hence the cv) is unchanged. An
unscaled sample of 100 Poisson gaps is typically 10 % off its mean (0.84 x the label with
seed 0). Ramp-up raises the rate linearly from `ramp_start_rate` to `rate` over
`ramp_up_s` seconds. Seeded with numpy's PCG64: one seed, one schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

ArrivalKind = Literal["poisson", "gamma", "constant", "trace", "closed"]
ARRIVAL_KINDS: tuple[str, ...] = get_args(ArrivalKind)


@dataclass(frozen=True)
class ArrivalConfig:
    kind: ArrivalKind = "poisson"
    rate: float = math.inf  # requests (sessions) per second; inf sends everything at t = 0
    cv: float = 1.0  # coefficient of variation of gamma gaps (1.0 = Poisson)
    ramp_up_s: float = 0.0  # seconds to ramp from ramp_start_rate to rate (0 = no ramp)
    ramp_start_rate: float = 0.0  # requests/s at t = 0 when ramping
    time_scale: float = 1.0  # multiplies trace timestamps (0.5 = twice as fast)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ValueError(f"--arrival {self.kind!r}: choose one of {', '.join(ARRIVAL_KINDS)}")
        if not self.rate > 0:
            raise ValueError(f"--rate must be > 0 requests/s (or inf), got {self.rate}")
        if not self.cv > 0:
            raise ValueError(f"--cv must be > 0 (1.0 is Poisson), got {self.cv}")
        if self.ramp_up_s < 0 or not 0 <= self.ramp_start_rate <= self.rate:
            raise ValueError(
                "--ramp-up-s must be >= 0 and --ramp-start-rate in [0, --rate]; "
                f"got {self.ramp_up_s} and {self.ramp_start_rate}"
            )
        is_rate_driven = self.kind in ("poisson", "gamma", "constant")
        if self.ramp_up_s > 0 and math.isinf(self.rate) and is_rate_driven:
            raise ValueError("--ramp-up-s needs a finite --rate; set --rate R")
        if not self.time_scale > 0:
            raise ValueError(f"--time-scale must be > 0, got {self.time_scale}")

    @property
    def is_open_loop(self) -> bool:
        return self.kind != "closed"


def unit_gaps(kind: ArrivalKind, n: int, cv: float, rng: np.random.Generator) -> np.ndarray:
    """n inter-arrival gaps of a unit-rate process of the given kind (mean 1)."""
    if kind == "poisson":
        return rng.exponential(1.0, size=n)
    if kind == "gamma":
        shape = 1.0 / (cv * cv)
        return rng.gamma(shape, cv * cv, size=n)
    if kind == "constant":
        return np.ones(n)
    raise ValueError(f"arrival kind {kind!r} has no gap distribution")


def _inverse_cumulative_rate(u: np.ndarray, cfg: ArrivalConfig) -> np.ndarray:
    """Real time t at which the integrated target rate reaches u."""
    if cfg.ramp_up_s <= 0:
        return u / cfg.rate
    r0, r1, ramp = cfg.ramp_start_rate, cfg.rate, cfg.ramp_up_s
    a = (r1 - r0) / (2.0 * ramp)
    u_ramp = r0 * ramp + a * ramp * ramp
    with np.errstate(divide="ignore", invalid="ignore"):
        in_ramp = (-r0 + np.sqrt(r0 * r0 + 4.0 * a * u)) / (2.0 * a) if a > 0 else u / r0
    after = ramp + (u - u_ramp) / r1
    return np.where(u >= u_ramp, after, in_ramp)


def arrival_times(
    cfg: ArrivalConfig, n: int, trace_times_s: np.ndarray | None = None
) -> np.ndarray:
    """Intended start time (s) of each of n sessions; zeros for the closed loop."""
    if n < 0:
        raise ValueError(f"number of arrivals must be >= 0, got {n}")
    if cfg.kind == "closed":
        return np.zeros(n)
    if cfg.kind == "trace":
        if trace_times_s is None or len(trace_times_s) != n:
            raise ValueError(
                "--arrival trace needs a workload with timestamps (--workload mooncake); "
                "use --arrival poisson|gamma|constant for other workloads"
            )
        times = np.asarray(trace_times_s, dtype=np.float64)
        return (times - times.min()) * cfg.time_scale if n else times
    if math.isinf(cfg.rate):
        return np.zeros(n)
    rng = np.random.default_rng(cfg.seed)
    gaps = unit_gaps(cfg.kind, n, cfg.cv, rng)
    unit = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else gaps
    return _inverse_cumulative_rate(rescale_unit_times(unit), cfg)


def rescale_unit_times(unit: np.ndarray) -> np.ndarray:
    """Unit-rate arrival times (first at 0) stretched so the last is at n - 1."""
    if len(unit) < 2 or unit[-1] <= 0:
        return unit
    return unit * ((len(unit) - 1) / unit[-1])


def closed_loop_start_delays(num_slots: int, ramp_up_s: float) -> np.ndarray:
    """Start delay of each closed-loop slot: staggered evenly over the ramp-up."""
    if ramp_up_s <= 0 or num_slots <= 1:
        return np.zeros(num_slots)
    return np.arange(num_slots) * (ramp_up_s / num_slots)
