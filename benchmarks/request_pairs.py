"""Two systems' runs of one workload and rate, side by side and request by request.

    python -m splitserve.benchmarks.serving_report pairs RESULTS_DIR

`benchmarks/serving.py` loads both systems with the same seeds, so their runs at a rate
send the same prompts at the same times under the same `request_id`s. For each such pair of
runs (`runs/<system>_<workload>_rate<r>/`, benchmarks/serving_report.py):

- each system's TPOT p50 and p90 with the 95% interval its own bench run gave them (the
  run's `summary.json`, `metrics.tpot_ms`: a percentile bootstrap, benchmarks/stats.py);
- over the requests both systems served (`requests.jsonl.gz`, `tpot_ms` by `request_id`):
  the Pearson correlation of the two TPOTs, the median of their differences (system less
  baseline), and the mean difference over the requests whose baseline TPOT is at or above
  its 90th percentile (the slowest tenth, those that decoded through the most prompt
  steps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.benchmarks.report import (
    ARCHIVED_REQUESTS_FILE,
    SUMMARY_FILE,
    fixed,
    read_requests,
)

# The TPOT percentiles reported, each with its interval.
QUANTILES = ("p50", "p90")


@dataclass(frozen=True)
class Matched:
    num: int
    correlation: float
    median_difference_ms: float
    slow_tenth_difference_ms: float


def tpot_by_request(records: list[dict[str, Any]]) -> dict[str, float]:
    """request_id -> tpot_ms, for the records that have both."""
    return {
        str(r["request_id"]): float(r["tpot_ms"])
        for r in records
        if r.get("tpot_ms") is not None and r.get("request_id") is not None
    }


def match(ours: dict[str, float], theirs: dict[str, float]) -> Matched | None:
    """The request-by-request figures; None when fewer than three requests have a TPOT on
    both sides."""
    ids = sorted(set(ours) & set(theirs))
    if len(ids) < 3:
        return None
    a = np.array([ours[i] for i in ids])
    b = np.array([theirs[i] for i in ids])
    slow = b >= np.percentile(b, 90)
    return Matched(
        num=len(ids),
        correlation=float(np.corrcoef(a, b)[0, 1]),
        median_difference_ms=float(np.median(a - b)),
        slow_tenth_difference_ms=float(np.mean(a[slow] - b[slow])),
    )


def tpot_cells(run_dir: Path) -> dict[str, str]:
    """'value (low–high)' of each of QUANTILES from the run's summary ('' where it has
    none)."""
    metrics = json.loads((run_dir / SUMMARY_FILE).read_text()).get("metrics", {})
    tpot = metrics.get("tpot_ms", {})
    cells = dict.fromkeys(QUANTILES, "")
    for quantile in QUANTILES:
        if estimate := tpot.get(quantile):
            low, high = estimate["ci95"]
            cells[quantile] = f"{estimate['value']:.3f} ({low:.2f}–{high:.2f})"
    return cells


def markdown(pairs: list[tuple[str, float, Path, Path]], system: str, baseline: str) -> str:
    """One line per (workload, rate, system's run folder, baseline's) where both folders
    have records that share requests."""
    head = " | ".join(f"{system} TPOT {q} ms (95%) | {baseline}" for q in QUANTILES)
    lines = [
        f"| workload | rate | {head} | matched | correlation | median difference ms | "
        "slowest tenth ms |",
        "| --- | --- | " + "--- | --- | " * len(QUANTILES) + "--- | --- | --- | --- |",
    ]
    for workload, rate, ours, theirs in sorted(pairs, key=lambda p: (p[0], p[1])):
        records = [ours / ARCHIVED_REQUESTS_FILE, theirs / ARCHIVED_REQUESTS_FILE]
        if not all(path.exists() for path in records):
            continue
        matched = match(*(tpot_by_request(read_requests(path)) for path in records))
        if matched is None:
            continue
        mine, base = tpot_cells(ours), tpot_cells(theirs)
        cells = " | ".join(f"{mine[q]} | {base[q]}" for q in QUANTILES)
        lines.append(
            f"| {workload} | {rate:g} | {cells} | {matched.num} | {matched.correlation:.3f} | "
            f"{fixed(matched.median_difference_ms, 2)} | "
            f"{fixed(matched.slow_tenth_difference_ms, 2)} |"
        )
    return "\n".join(lines) + "\n"
