"""Arrival generators checked statistically (10,000 draws) and for reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitserve.benchmarks.arrivals import (
    ArrivalConfig,
    arrival_times,
    closed_loop_start_delays,
    unit_gaps,
)

N = 10_000


def rate_and_cv(times: np.ndarray) -> tuple[float, float]:
    gaps = np.diff(times)
    return 1.0 / gaps.mean(), gaps.std() / gaps.mean()


@pytest.mark.parametrize(
    ("kind", "cv", "rate", "cv_tol"),
    [
        ("poisson", 1.0, 5.0, 0.04),
        ("gamma", 2.0, 20.0, 0.12),  # burstier than Poisson
        ("gamma", 0.5, 2.0, 0.03),  # smoother than Poisson
        ("gamma", 1.0, 50.0, 0.04),  # gamma with cv 1 is Poisson
    ],
)
def test_mean_rate_and_cv_within_tolerance(
    kind: str, cv: float, rate: float, cv_tol: float
) -> None:
    for seed in (0, 1, 2):
        times = arrival_times(ArrivalConfig(kind=kind, rate=rate, cv=cv, seed=seed), N)  # type: ignore[arg-type]
        got_rate, got_cv = rate_and_cv(times)
        assert got_rate == pytest.approx(rate, rel=0.05 * max(1.0, cv))
        assert got_cv == pytest.approx(cv, abs=cv_tol * max(1.0, cv))
        assert times[0] == 0.0 and np.all(np.diff(times) >= 0)


@pytest.mark.parametrize("kind", ["poisson", "gamma"])
def test_scheduled_rate_equals_the_label(kind: str) -> None:
    # unscaled, 100 Poisson draws with seed 0 ran at 0.84 x the label
    for seed in range(20):
        cfg = ArrivalConfig(kind=kind, rate=8.0, cv=2.0, seed=seed)  # type: ignore[arg-type]
        times = arrival_times(cfg, 100)
        assert 99 / times[-1] == pytest.approx(8.0, rel=0.02)
        gaps = np.diff(times)
        assert gaps.min() >= 0 and gaps.std() > 0.5 / 8.0  # still random gaps


def test_poisson_counts_have_unit_dispersion() -> None:
    times = arrival_times(ArrivalConfig(kind="poisson", rate=10.0, seed=3), N)
    counts = np.bincount(times.astype(int))[:-1]  # arrivals per 1-s window
    assert counts.mean() == pytest.approx(10.0, rel=0.05)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.2)  # index of dispersion


def test_constant_rate_is_exact() -> None:
    times = arrival_times(ArrivalConfig(kind="constant", rate=4.0), 9)
    assert times == pytest.approx(np.arange(9) / 4.0)


def test_seeds_reproduce_and_differ() -> None:
    for kind in ("poisson", "gamma"):
        a = arrival_times(ArrivalConfig(kind=kind, rate=3.0, cv=1.5, seed=7), 100)  # type: ignore[arg-type]
        b = arrival_times(ArrivalConfig(kind=kind, rate=3.0, cv=1.5, seed=7), 100)  # type: ignore[arg-type]
        c = arrival_times(ArrivalConfig(kind=kind, rate=3.0, cv=1.5, seed=8), 100)  # type: ignore[arg-type]
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_linear_ramp_up_is_a_time_change() -> None:
    cfg = ArrivalConfig(kind="constant", rate=10.0, ramp_up_s=4.0, ramp_start_rate=2.0)
    times = arrival_times(cfg, 200)
    # cumulative target rate: 2 t + t^2 (during the ramp), 24 + 10 (t - 4) after it
    cum = np.where(times <= 4.0, 2 * times + times**2, 24.0 + 10.0 * (times - 4.0))
    assert cum == pytest.approx(np.arange(200), abs=1e-9)
    steady = arrival_times(ArrivalConfig(kind="poisson", rate=10.0, ramp_up_s=5.0, seed=0), N)
    early = np.sum(steady < 5.0)  # expected 10 * 5 / 2 = 25 arrivals in the ramp
    assert 10 <= early <= 42
    assert rate_and_cv(steady[steady > 5.0])[0] == pytest.approx(10.0, rel=0.05)


def test_trace_times_scale_and_start_at_zero() -> None:
    trace = np.array([3.0, 3.0, 4.5, 10.0])
    times = arrival_times(ArrivalConfig(kind="trace", time_scale=0.5), 4, trace)
    assert times == pytest.approx([0.0, 0.0, 0.75, 3.5])
    with pytest.raises(ValueError, match="mooncake"):
        arrival_times(ArrivalConfig(kind="trace"), 4, None)


def test_infinite_rate_and_closed_loop() -> None:
    assert np.all(arrival_times(ArrivalConfig(kind="poisson"), 5) == 0)
    assert np.all(arrival_times(ArrivalConfig(kind="closed"), 5) == 0)
    assert closed_loop_start_delays(4, 2.0) == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert np.all(closed_loop_start_delays(4, 0.0) == 0)


def test_unit_gaps_have_mean_one() -> None:
    rng = np.random.default_rng(0)
    for kind, cv in (("poisson", 1.0), ("gamma", 3.0), ("constant", 1.0)):
        assert unit_gaps(kind, N, cv, rng).mean() == pytest.approx(1.0, rel=0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0.0},
        {"rate": -1.0},
        {"kind": "gamma", "cv": 0.0},
        {"kind": "weibull"},
        {"rate": 5.0, "ramp_up_s": -1.0},
        {"rate": 5.0, "ramp_up_s": 1.0, "ramp_start_rate": 6.0},
        {"rate": math.inf, "ramp_up_s": 1.0},
        {"kind": "trace", "time_scale": 0.0},
    ],
)
def test_bad_configs_raise_with_a_hint(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="--"):
        ArrivalConfig(**kwargs)  # type: ignore[arg-type]
