"""Sweeps over load and the search for the highest rate that meets the SLOs.

A sweep runs the same workload at several rates (open loop) or concurrencies (closed
loop) and keeps one point per run. Capacity, as DistServe defines goodput, is the highest
load at which SLO attainment stays >= the target (0.9 by default): it is read off the
points by linear interpolation between the last load that meets the target and the next
that does not (DistServe's `find_intersection`).

`search_max_rate` finds it without a grid: it doubles the rate from `start_rate` while runs
meet the SLOs (halves while they do not), then bisects between the highest passing and the
lowest failing rate until they are within `tolerance` (relative) or `max_probes` runs are
spent; in the second case the search reports that it did not converge. Attainment is noisy
at small sample sizes, so the points are all kept and reported.

Uncertainty (`capacity_section`): each point carries `num_boot` resampled verdicts (its
requests drawn with replacement, attainment and percentile checks redone: `slo.
bootstrap_meets`); capacity is interpolated on each resampled sweep, and the 2.5th-97.5th
percentiles of those capacities are its bootstrap interval. With `--repeats N` (N >= 2)
every point is run N times with fresh prompts and arrivals; capacity is found on each
repeat's sweep and the t-interval of those N values is the interval reported (`ci95_method`
"repeats"), as it also holds run-to-run variation (server state, client timing) that a
resample of one run's requests cannot see. Capacity is found on two axes: the labelled
rate (`load`) and the achieved rate (`achieved`: what the client actually sent). A
resample in which no point passes counts as capacity 0, one in which every point passes as
the highest load swept: an interval ending there means "at least".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from splitserve.benchmarks.stats import t_interval

SWEEP_SCHEMA = "splitserve.bench.sweep/2"
DEFAULT_NUM_BOOT = 1000  # resampled sweeps for the capacity interval


class SearchResult(NamedTuple):
    points: list[dict[str, Any]]
    is_converged: bool  # highest passing and lowest failing within the tolerance
    reason: str  # why the search stopped


def point_from_summaries(
    load: float, summaries: list[dict[str, Any]], paths: list[str], verdict: dict[str, Any]
) -> dict[str, Any]:
    """One sweep point from the summaries of its repeats (one or more runs at this load);
    `verdict` is the SLO evaluation over the requests of all of them."""
    first = summaries[0]

    def mean(values: list[Any]) -> float | None:
        vals = [float(v) for v in values if v is not None]
        return float(np.mean(vals)) if vals else None

    def pct(name: str, q: str) -> float | None:
        return mean(
            [(s["metrics"].get(f"{name}_ms", {}).get(q) or {}).get("value") for s in summaries]
        )

    return {
        "load": load,
        "summary": paths[0],
        "summaries": paths,
        "num_repeats": len(summaries),
        "attainment": verdict["attainment"],
        "attainment_ci95": verdict["attainment_ci95"],
        "per_objective_attainment": verdict.get("per_objective_attainment", {}),
        "meets": verdict["meets"],
        "goodput_rps": mean([(s.get("slo") or {}).get("goodput_rps") for s in summaries]),
        "request_per_s": mean([s["throughput"]["request_per_s"] for s in summaries]),
        "output_tokens_per_s": mean([s["throughput"]["output_tokens_per_s"] for s in summaries]),
        "scheduled_rate": mean([s["load"].get("scheduled_rate") for s in summaries]),
        "achieved_rate": mean([s["load"].get("achieved_rate") for s in summaries]),
        "fell_behind": any(s["load"].get("fell_behind", False) for s in summaries),
        "num_requests": sum(s["counts"]["num_requests"] for s in summaries),
        "num_failed": sum(s["counts"]["num_failed"] for s in summaries),
        "cached_fraction": mean([s["prefix_cache"]["cached_fraction"] for s in summaries]),
        "repeats": [
            {
                "attainment": (s.get("slo") or {}).get("attainment", _completed(s)),
                "meets": (s.get("slo") or {}).get("meets", _completed(s) >= 1.0),
                "achieved_rate": s["load"].get("achieved_rate"),
            }
            for s in summaries
        ],
        "label": first.get("label"),
        **{f"{n}_{q}_ms": pct(n, q) for n in ("ttft", "tpot", "e2e") for q in ("p50", "p99")},
    }


def _completed(summary: dict[str, Any]) -> float:
    counts = summary["counts"]
    return float(counts["num_completed"]) / max(1, int(counts["num_requests"]))


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


def _capacity_value(points: list[dict[str, Any]], target: float) -> float:
    """Capacity of one (resampled or repeated) sweep: 0 when none passes."""
    cap = interpolate_capacity(points, target)
    return float(cap["interpolated_rate"]) if cap["interpolated_rate"] is not None else 0.0


def _bootstrap_ci(
    points: list[dict[str, Any]],
    boots: list[tuple[np.ndarray, np.ndarray]],
    axis: str,
    target: float,
) -> list[float] | None:
    if not boots or any(p.get(axis) is None for p in points):
        return None
    caps = [
        _capacity_value(
            [{"load": p[axis], "attainment": float(att[b]), "meets": bool(ok[b])}
             for p, (att, ok) in zip(points, boots, strict=True)],
            target,
        )
        for b in range(len(boots[0][0]))
    ]  # fmt: skip
    low, high = np.quantile(caps, [0.025, 0.975])
    return [float(low), float(high)]


def _axis_capacity(
    points: list[dict[str, Any]],
    boots: list[tuple[np.ndarray, np.ndarray]],
    axis: str,
    target: float,
) -> dict[str, Any]:
    moved = [{**p, "load": p[axis]} for p in points]
    cap = interpolate_capacity(moved, target)
    cap["bootstrap_ci95"] = _bootstrap_ci(points, boots, axis, target)
    num_repeats = min((len(p["repeats"]) for p in points), default=1)
    per_repeat = []
    for r in range(num_repeats if num_repeats >= 2 else 0):
        rep = [
            {
                "load": p["load"] if axis == "load" else p["repeats"][r]["achieved_rate"],
                "attainment": p["repeats"][r]["attainment"],
                "meets": p["repeats"][r]["meets"],
            }
            for p in points
        ]
        if all(x["load"] is not None for x in rep):
            per_repeat.append(_capacity_value(rep, target))
    cap["per_repeat"] = per_repeat
    repeats_ci = t_interval(per_repeat)
    cap["ci95"] = list(repeats_ci) if repeats_ci else cap["bootstrap_ci95"]
    cap["ci95_method"] = "repeats" if repeats_ci else "bootstrap"
    return cap


def capacity_section(
    points: list[dict[str, Any]],
    boots: list[tuple[np.ndarray, np.ndarray]],
    target: float,
    is_rate_axis: bool,
) -> dict[str, Any]:
    """Capacity on the labelled axis with its interval, and on the achieved-rate axis."""
    out = _axis_capacity(points, boots, "load", target)
    if is_rate_axis and points and all(p.get("achieved_rate") for p in points):
        out["achieved"] = _axis_capacity(points, boots, "achieved_rate", target)
    return out


def search_max_rate(
    run_at: Callable[[float], dict[str, Any]],
    start_rate: float,
    max_rate: float | None,
    tolerance: float,
    max_probes: int,
) -> SearchResult:
    """Probe rates (see the module docstring); every point probed, in order, and whether the
    bracket closed within the tolerance."""
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
                return SearchResult(points, True, f"bracket {lo:g}-{hi:g} within the tolerance")
            rate = (lo + hi) / 2.0
        elif lo is not None:
            if max_rate is not None and lo >= max_rate:
                return SearchResult(points, True, f"--max-rate {max_rate:g} met the SLOs")
            rate = lo * 2.0 if max_rate is None else min(lo * 2.0, max_rate)
        else:
            rate = rate / 2.0
    if lo is None or hi is None:
        side = "no rate met the SLOs" if lo is None else "every rate met the SLOs"
        reason = f"not converged: {side} in {max_probes} probes"
    else:
        reason = (
            f"not converged: {max_probes} probes left {lo:g}-{hi:g} req/s, wider than "
            f"--tolerance {tolerance:g}; raise --max-probes"
        )
    return SearchResult(points, False, reason)
