"""Sweeps over load and the search for the highest rate that meets the SLOs.

A sweep runs the same workload at several rates (open loop) or concurrencies (closed
loop) and keeps one point per run. Capacity, as DistServe defines goodput, is the highest
load at which SLO attainment stays >= the target (0.9 by default): it is read off the
points by linear interpolation between the last load that meets the target and the next
that does not (DistServe's `find_intersection`).

`search_max_rate` finds it without a grid: it doubles the rate from `start_rate` while runs
meet the SLOs (halves while they do not), then bisects between the highest passing and the
lowest failing rate until they are within `tolerance` (relative) or `max_probes` runs are
spent. Attainment is noisy at small sample sizes, so the points are all kept and reported.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

SWEEP_SCHEMA = "splitserve.bench.sweep/1"


def point_from_summary(load: float, summary: dict[str, Any], path: str) -> dict[str, Any]:
    """One sweep point: the load, attainment, goodput and a few latency percentiles."""
    slo = summary.get("slo") or {}
    metrics = summary["metrics"]

    def pct(name: str, q: str) -> float | None:
        stat = metrics.get(f"{name}_ms", {}).get(q)
        return stat["value"] if stat else None

    completed = summary["counts"]["num_completed"] / max(1, summary["counts"]["num_requests"])
    return {
        "load": load,
        "summary": path,
        "attainment": slo.get("attainment", completed),
        "per_objective_attainment": slo.get("per_objective_attainment", {}),
        "meets": slo.get("meets", completed >= 1.0),
        "goodput_rps": slo.get("goodput_rps"),
        "request_per_s": summary["throughput"]["request_per_s"],
        "output_tokens_per_s": summary["throughput"]["output_tokens_per_s"],
        "achieved_rate": summary["load"].get("achieved_rate"),
        "fell_behind": summary["load"].get("fell_behind", False),
        "num_failed": summary["counts"]["num_failed"],
        **{f"{n}_{q}_ms": pct(n, q) for n in ("ttft", "tpot", "e2e") for q in ("p50", "p99")},
    }


def interpolate_capacity(points: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Highest load with attainment >= target, interpolated between probed loads."""
    pts = sorted(points, key=lambda p: p["load"])
    passing = [p["load"] for p in pts if p["meets"]]
    failing = [p["load"] for p in pts if not p["meets"]]
    out: dict[str, Any] = {
        "highest_passing": max(passing, default=None),
        "lowest_failing": min(failing, default=None),
        "interpolated_rate": None,
    }
    if not pts or not pts[0]["meets"]:
        out["status"] = "none_pass"
        return out
    for a, b in itertools.pairwise(pts):
        if a["meets"] and not b["meets"]:
            ya, yb = a["attainment"], b["attainment"]
            # b may fail on a percentile check with attainment >= target: stay at a then
            frac = min(1.0, max(0.0, (ya - target) / (ya - yb))) if ya > yb else 0.0
            out["interpolated_rate"] = a["load"] + frac * (b["load"] - a["load"])
            out["status"] = "found"
            return out
    out["status"] = "all_pass"
    out["interpolated_rate"] = pts[-1]["load"]
    return out


def search_max_rate(
    run_at: Callable[[float], dict[str, Any]],
    start_rate: float,
    max_rate: float | None,
    tolerance: float,
    max_probes: int,
) -> list[dict[str, Any]]:
    """Probe rates (see the module docstring); returns every point probed, in order."""
    if start_rate <= 0 or tolerance <= 0 or max_probes < 1:
        raise ValueError("--start-rate and --tolerance must be > 0 and --max-probes >= 1")
    if max_rate is not None and max_rate < start_rate:
        raise ValueError("--max-rate must be >= --start-rate")
    points: list[dict[str, Any]] = []
    lo: float | None = None
    hi: float | None = None
    rate = start_rate
    for _ in range(max_probes):
        point = run_at(rate)
        points.append(point)
        if point["meets"]:
            lo = rate
        else:
            hi = rate
        if lo is not None and hi is not None:
            if hi - lo <= tolerance * lo:
                break
            rate = (lo + hi) / 2.0
        elif lo is not None:
            if max_rate is not None and lo >= max_rate:
                break
            rate = lo * 2.0 if max_rate is None else min(lo * 2.0, max_rate)
        else:
            rate = rate / 2.0
    return points
