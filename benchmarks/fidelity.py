"""Did the client make the load it claims? Lag between intended and actual send times.

lag = send - intended send, per request. It has two parts: `queue_wait_s` (waiting for one
of --max-concurrency slots in an open-loop run: the server was too slow to keep up with
the schedule) and event-loop lateness (the client itself could not keep up). A run whose
p99 lag exceeds `max_lag_s` is flagged: its latencies were measured under a lighter load
than the arrival process describes. Rates: `scheduled` is what the arrival draws offered
(first turns of sessions), `achieved` is what was actually sent.
"""

from __future__ import annotations

import numpy as np

from splitserve.benchmarks.arrivals import ArrivalConfig
from splitserve.benchmarks.client import RequestRecord

DEFAULT_MAX_LAG_S = 0.050


def _rate(times: np.ndarray) -> float | None:
    if len(times) < 2 or times.max() <= times.min():
        return None
    return float((len(times) - 1) / (times.max() - times.min()))


def _cv(times: np.ndarray) -> float | None:
    gaps = np.diff(np.sort(times))
    return float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else None


def load_summary(
    records: list[RequestRecord],
    arrival: ArrivalConfig,
    max_concurrency: int | None,
    max_lag_s: float = DEFAULT_MAX_LAG_S,
) -> tuple[dict[str, object], list[str]]:
    """The `load` section of a summary and its warnings."""
    sent = [r for r in records if not (r.error or "").startswith("skipped")]
    lag = np.array([r.send_s - r.intended_send_s for r in sent])
    wait = np.array([r.queue_wait_s for r in sent])
    first = [r for r in sent if r.turn_index == 0]
    intended = np.array([r.intended_send_s for r in first])
    actual = np.array([r.send_s for r in first])
    out: dict[str, object] = {
        "arrival": arrival.kind,
        "rate": arrival.rate,
        "cv": arrival.cv if arrival.kind == "gamma" else None,
        "max_concurrency": max_concurrency,
        "ramp_up_s": arrival.ramp_up_s,
        "time_scale": arrival.time_scale if arrival.kind == "trace" else None,
        "seed": arrival.seed,
        "scheduled_rate": _rate(intended) if arrival.is_open_loop else None,
        "scheduled_cv": _cv(intended) if arrival.is_open_loop else None,
        "achieved_rate": _rate(actual),
        "achieved_cv": _cv(actual),
    }
    warnings: list[str] = []
    if len(lag) == 0:
        return out, warnings
    p50, p99 = np.percentile(lag, [50, 99])
    out["lag_ms"] = {"p50": p50 * 1e3, "p99": p99 * 1e3, "max": float(lag.max()) * 1e3}
    out["queue_wait_ms_p99"] = float(np.percentile(wait, 99)) * 1e3
    is_behind = arrival.is_open_loop and p99 > max_lag_s
    out["fell_behind"] = bool(is_behind)
    if is_behind:
        cause = (
            "requests waited for a --max-concurrency slot"
            if np.percentile(wait, 99) > max_lag_s / 2
            else "the client's event loop was late (client CPU-bound?)"
        )
        warnings.append(
            f"client fell behind the schedule: p99 send lag {p99 * 1e3:.1f} ms > "
            f"{max_lag_s * 1e3:g} ms ({cause}); the load made is lighter than the load claimed"
        )
    return out, warnings
