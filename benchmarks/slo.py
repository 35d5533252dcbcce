"""Service-level objectives: parsing ``--slo``, goodput, attainment, SLO-scale curves.

Syntax: comma-separated ``metric=limit`` or ``metric:pXX=limit`` with metric one of
ttft, tpot, itl, e2e and limit a duration (``500ms``, ``1.5s``, ``800us``; a bare number is
milliseconds). Example: ``--slo ttft=500ms,tpot=50ms,e2e:p99=10s``.

* Per-request form (``ttft=500ms``): each request is tested on its own value. For ``itl``
  the request's largest gap is tested. A request with an undefined TPOT (<= 1 output token)
  or no gap passes that objective. A failed request meets no objective.
* Percentile form (``ttft:p90=1s``): the percentile over the run is tested once. Failed
  requests count as infinitely slow for ttft, tpot and e2e; itl uses the pooled gaps.

Definitions (DistServe's):
* SLO attainment = requests meeting every per-request objective / all requests sent, with
  its 95 % Wilson interval (`attainment_ci95`).
* goodput = requests meeting every per-request objective / duration (requests per second).
* A run *meets* the SLOs when attainment >= the target (0.9 by default) and every
  percentile objective holds; the goodput search looks for the highest rate that does.
* SLO-scale curve: attainment when every per-request limit is multiplied by s (s < 1 is
  tighter), DistServe's second figure.

`bootstrap_meets` redoes the verdict on resamples of the requests (attainment and every
percentile check recomputed), the input of the capacity interval in `sweep.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from splitserve.benchmarks.metrics import RequestMetrics
from splitserve.benchmarks.stats import bootstrap_percentiles, wilson_interval

SLO_METRICS = ("ttft", "tpot", "itl", "e2e")
DEFAULT_SCALES = (0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6)
_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "": 1e-3}
_FAILED_S = 1e12  # stands in for "never" when a percentile includes failed requests


@dataclass(frozen=True)
class Slo:
    metric: str  # ttft | tpot | itl | e2e
    limit_s: float
    percentile: float | None = None  # None: per-request objective

    @property
    def label(self) -> str:
        where = f":p{self.percentile:g}" if self.percentile is not None else ""
        return f"{self.metric}{where}<={self.limit_s * 1000:g}ms"


def parse_duration_s(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(us|ms|s|)\s*", text)
    if not match:
        raise ValueError(f"bad duration {text!r}; write e.g. 500ms, 1.5s or 800us")
    return float(match.group(1)) * _UNITS_S[match.group(2)]


def parse_slos(spec: str | None) -> tuple[Slo, ...]:
    """Parse ``ttft=500ms,tpot:p90=50ms`` (see the module docstring)."""
    if not spec:
        return ()
    slos = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\w+)(?::p([0-9.]+))?\s*=\s*(.+)", item)
        if not match or match.group(1) not in SLO_METRICS:
            raise ValueError(
                f"bad --slo item {item!r}; write metric=limit or metric:pXX=limit with metric "
                f"in {', '.join(SLO_METRICS)}, e.g. --slo ttft=500ms,tpot:p90=50ms"
            )
        q = float(match.group(2)) if match.group(2) else None
        if q is not None and not 0 < q <= 100:
            raise ValueError(f"--slo percentile p{q:g} must be in (0, 100]")
        slos.append(Slo(match.group(1), parse_duration_s(match.group(3)), q))
    return tuple(slos)


def request_value_s(metric: str, m: RequestMetrics) -> float | None:
    """A request's value of an objective's metric (None: undefined, which passes)."""
    if metric == "ttft":
        return m.ttft_s
    if metric == "e2e":
        return m.e2e_s
    if metric == "tpot":
        return m.tpot_s
    return m.max_itl_s


def meets(m: RequestMetrics | None, slos: tuple[Slo, ...], scale: float = 1.0) -> bool:
    """True when a successful request meets every per-request objective (limits x scale)."""
    if m is None:
        return False
    for slo in slos:
        if slo.percentile is None:
            value = request_value_s(slo.metric, m)
            if value is not None and value > slo.limit_s * scale:
                return False
    return True


def _distribution_value_s(slo: Slo, metrics: list[RequestMetrics | None]) -> float:
    if slo.metric == "itl":
        values = [g for m in metrics if m is not None for g in m.itls_s]
    else:
        values = []
        for m in metrics:
            v = _FAILED_S if m is None else request_value_s(slo.metric, m)
            if v is not None:
                values.append(v)
    if not values:
        return float("nan")
    value = float(np.percentile(values, slo.percentile or 100.0))
    return float("inf") if value >= _FAILED_S / 10 else value


def attainment(
    metrics: list[RequestMetrics | None], slos: tuple[Slo, ...], scale: float = 1.0
) -> float:
    return sum(meets(m, slos, scale) for m in metrics) / len(metrics) if metrics else 0.0


def evaluate(
    metrics: list[RequestMetrics | None],
    slos: tuple[Slo, ...],
    duration_s: float,
    target: float,
    scales: tuple[float, ...] = DEFAULT_SCALES,
) -> dict[str, object]:
    """The SLO section of a summary; `metrics` has None for each failed request."""
    num_good = sum(meets(m, slos) for m in metrics)
    per_request = [s for s in slos if s.percentile is None]
    checks = []
    for slo in (s for s in slos if s.percentile is not None):
        value = _distribution_value_s(slo, metrics)
        checks.append({"slo": slo.label, "value_ms": value * 1000, "passed": value <= slo.limit_s})
    att = num_good / len(metrics) if metrics else 0.0
    return {
        "spec": [s.label for s in slos],
        "target_attainment": target,
        "num_good": num_good,
        "attainment": att,
        "attainment_ci95": list(wilson_interval(num_good, len(metrics))),
        "num_requests": len(metrics),
        "goodput_rps": num_good / duration_s if duration_s > 0 else 0.0,
        "per_objective_attainment": {s.label: attainment(metrics, (s,)) for s in per_request},
        "percentile_checks": checks,
        "meets": att >= target and all(bool(c["passed"]) for c in checks),
        "scale_curve": [{"scale": s, "attainment": attainment(metrics, slos, s)} for s in scales]
        if per_request
        else [],
    }


def _request_values_s(metric: str, metrics: list[RequestMetrics | None]) -> np.ndarray:
    """Per request: its value (failed: never; undefined: nan, left out of percentiles)."""
    out = []
    for m in metrics:
        v = _FAILED_S if m is None else request_value_s(metric, m)
        out.append(np.nan if v is None else v)
    return np.array(out, dtype=np.float64)


def bootstrap_meets(
    metrics: list[RequestMetrics | None],
    slos: tuple[Slo, ...],
    target: float,
    rng: np.random.Generator,
    num_boot: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(attainment, meets) of `num_boot` resamples of the requests, with replacement."""
    n = len(metrics)
    if n == 0:
        return np.zeros(num_boot), np.zeros(num_boot, dtype=bool)
    idx = rng.integers(0, n, size=(num_boot, n))
    good = np.array([meets(m, slos) for m in metrics])
    att = good[idx].mean(axis=1)
    ok = att >= target
    for slo in (s for s in slos if s.percentile is not None):
        if slo.metric == "itl":
            gaps = np.sort([g for m in metrics if m is not None for g in m.itls_s])
            if len(gaps) == 0:
                continue
            values = bootstrap_percentiles(gaps, slo.percentile or 100.0, rng, num_boot)
        else:
            x = _request_values_s(slo.metric, metrics)[idx]
            with np.errstate(all="ignore"):
                values = np.nanpercentile(x, slo.percentile or 100.0, axis=1)
            values = np.where(np.isnan(values), np.inf, values)  # as in `evaluate`
        ok &= values <= slo.limit_s
    return att, ok
