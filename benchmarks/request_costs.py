"""What each prompt prefilled beside a decoding request cost it, from a serving run's
per-request records.

    python -m splitserve.benchmarks.serving_report costs RESULTS_DIR

A request decodes from its first token to its last. Every other request whose first token
came in between had its prompt prefilled in steps that also carried this one's decode rows
(each step serves every running request). Over one run's requests, the decode time is
fitted by least squares, with no intercept, as

    last - first = (output tokens - 1) · d + n · p

where n counts the other requests' first tokens inside the interval: `decode_ms` (d) is
what a step costs at that load, `prompt_ms` (p) what one prompt prefilled meanwhile added.
Two systems loaded with the same arrivals and prompts (benchmarks/serving.py gives both the
same seeds) then split their TPOT difference into the decode steps and the prompt steps:
at 4096x256 and 4 req/s on one H100 (`benchmarks/results/serving_h100_2026-12-06_64eba65_4096/`)
splitserve's d was 7.69 against vLLM's 8.21 ms and its p 131.3 against 122.5 ms.

The fit reads `first_event_s`, `last_event_s` and `num_output_tokens` of the records
(`runs/<system>_<workload>_rate<r>/requests.jsonl.gz`, benchmarks/serving_report.py);
requests that failed or produced fewer than two tokens are left out.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.benchmarks.report import read_requests


@dataclass(frozen=True)
class Costs:
    decode_ms: float  # d: a decode step at this load
    prompt_ms: float  # p: what one prompt prefilled during a request's decode added to it
    r2: float  # the fit's coefficient of determination
    mean_prompts: float  # prompts prefilled during a request's decode, on average
    num_requests: int


def fit_costs(requests: list[dict[str, Any]]) -> Costs | None:
    """The fit over one run's records; None with fewer than three usable requests."""
    usable = [
        r
        for r in requests
        if not r.get("error") and (r.get("num_output_tokens") or 0) >= 2
        and r.get("first_event_s") is not None and r.get("last_event_s") is not None
    ]  # fmt: skip
    if len(usable) < 3:
        return None
    firsts = sorted(r["first_event_s"] for r in usable)
    x = np.empty((len(usable), 2))
    y = np.empty(len(usable))
    for i, r in enumerate(usable):
        start, end = r["first_event_s"], r["last_event_s"]
        x[i] = (
            r["num_output_tokens"] - 1,
            bisect.bisect_right(firsts, end) - bisect.bisect_right(firsts, start),
        )
        y[i] = (end - start) * 1000.0
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - x @ coef) ** 2).sum()) / spread if spread else 1.0
    return Costs(float(coef[0]), float(coef[1]), r2, float(x[:, 1].mean()), len(usable))


def markdown(runs: list[tuple[dict[str, Any], Path]]) -> str:
    """One line per (summary.json row, its run's records file) whose file exists."""
    lines = [
        "| workload | rate | system | decode step ms | per prompt ms | R² | prompts seen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    ordered = sorted(runs, key=lambda run: (run[0]["workload"], run[0]["rate"], run[0]["system"]))
    for row, path in ordered:
        costs = fit_costs(read_requests(path)) if path.exists() else None
        if costs is None:
            continue
        lines.append(
            f"| {row['workload']} | {row['rate']:g} | {row['system']} | {costs.decode_ms:.2f} | "
            f"{costs.prompt_ms:.1f} | {costs.r2:.2f} | {costs.mean_prompts:.1f} |"
        )
    return "\n".join(lines) + "\n"
