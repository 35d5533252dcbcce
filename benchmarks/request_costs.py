"""What each prompt prefilled beside a decoding request cost it, from a serving run's
per-request records.

    python -m splitserve.benchmarks.serving_report costs RESULTS_DIR [--baseline vllm]

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

Each cost comes with a 95% interval: the fit repeated on resamples of the run's requests
(drawn with replacement, each keeping its own n; a percentile bootstrap, seeded so that the
command prints the same table each time). Requests that decode at the same time share their
steps, so their errors are not independent and the interval can understate the
uncertainty. Two systems' runs of one workload and rate get the difference of their costs
(system less baseline) over the requests both served, by `request_id`, resampled together:
the same requests in both fits, so what the arrivals did to both cancels out.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.benchmarks.report import fixed, read_requests
from splitserve.benchmarks.stats import CONFIDENCE, DEFAULT_NUM_BOOT

# The resamples' seed (the tables are reproducible).
BOOT_SEED = 0


@dataclass(frozen=True)
class Costs:
    decode_ms: float  # d: a decode step at this load
    prompt_ms: float  # p: what one prompt prefilled during a request's decode added to it
    r2: float  # the fit's coefficient of determination
    mean_prompts: float  # prompts prefilled during a request's decode, on average
    num_requests: int
    decode_ci: tuple[float, float]  # 95% interval of decode_ms
    prompt_ci: tuple[float, float]  # 95% interval of prompt_ms


@dataclass(frozen=True)
class Design:
    """One run's usable requests: their ids, the fit's columns (decode steps, other
    requests' first tokens in between) and the decode time in ms."""

    ids: list[str]
    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class CostDifference:
    num: int  # requests both runs served
    decode_ms: tuple[float, float, float]  # difference, 95% low, high
    prompt_ms: tuple[float, float, float]


def design(requests: list[dict[str, Any]]) -> Design | None:
    """The fit's data; None with fewer than three usable requests."""
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
    return Design([str(r.get("request_id", "")) for r in usable], x, y)


def resample_weights(num: int) -> np.ndarray:
    """(DEFAULT_NUM_BOOT, num): how many times each row is drawn in each resample."""
    rng = np.random.default_rng(BOOT_SEED)
    draws = rng.multinomial(num, np.full(num, 1.0 / num), size=DEFAULT_NUM_BOOT)
    return draws.astype(np.float64)


def weighted_fits(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(len(weights), 2): least squares with no intercept, one fit per row of weights
    (a row that leaves the normal equations singular gives NaN)."""
    gram = np.einsum("bn,ni,nj->bij", weights, x, x)
    rhs = np.einsum("bn,ni,n->bi", weights, x, y)
    scale = np.einsum("bii->b", gram) ** 2
    singular = np.abs(np.linalg.det(gram)) <= 1e-12 * scale
    gram[singular] = np.eye(2)
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
    coef[singular] = np.nan
    return coef


def _interval(values: np.ndarray) -> tuple[float, float]:
    alpha = (1.0 - CONFIDENCE) / 2.0
    low, high = np.nanquantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def fit_costs(requests: list[dict[str, Any]]) -> Costs | None:
    """The fit over one run's records; None with fewer than three usable requests."""
    data = design(requests)
    return None if data is None else costs_of(data)


def costs_of(data: Design) -> Costs:
    """The fit over one run's usable requests, with its intervals."""
    x, y = data.x, data.y
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - x @ coef) ** 2).sum()) / spread if spread else 1.0
    boot = weighted_fits(x, y, resample_weights(len(y)))
    return Costs(
        float(coef[0]), float(coef[1]), r2, float(x[:, 1].mean()), len(y),
        _interval(boot[:, 0]), _interval(boot[:, 1]),
    )  # fmt: skip


def cost_difference(ours: Design, theirs: Design) -> CostDifference | None:
    """Our costs less theirs over the requests both served, resampled together; None
    when fewer than three requests are on both sides or the fit is undetermined."""
    rows_of = {request_id: i for i, request_id in enumerate(theirs.ids) if request_id}
    pairs = [
        (i, rows_of[request_id]) for i, request_id in enumerate(ours.ids) if request_id in rows_of
    ]
    if len(pairs) < 3:
        return None
    a, b = (np.array(side) for side in zip(*pairs, strict=True))
    weights = np.vstack([np.ones(len(pairs)), resample_weights(len(pairs))])
    diff = weighted_fits(ours.x[a], ours.y[a], weights) - weighted_fits(
        theirs.x[b], theirs.y[b], weights
    )
    point, boot = diff[0], diff[1:]
    if np.isnan(point).any():  # no matched request decoded across a prompt: p is undefined
        return None
    return CostDifference(
        len(pairs),
        (float(point[0]), *_interval(boot[:, 0])),
        (float(point[1]), *_interval(boot[:, 1])),
    )


def _ms(value: float, low: float, high: float, digits: int) -> str:
    """'value (low, high)', with no sign on what rounds to zero."""
    return f"{fixed(value, digits)} ({fixed(low, digits)}, {fixed(high, digits)})"


def markdown(runs: list[tuple[dict[str, Any], Path]], system: str, baseline: str) -> str:
    """One line per (summary.json row, its run's records file) whose file exists; then,
    for each workload and rate with both systems' records, system less baseline."""
    lines = [
        "| workload | rate | system | decode step ms (95%) | per prompt ms (95%) | R² | "
        "prompts seen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    designs: dict[tuple[str, float, str], Design] = {}
    ordered = sorted(runs, key=lambda run: (run[0]["workload"], run[0]["rate"], run[0]["system"]))
    for row, path in ordered:
        data = design(read_requests(path)) if path.exists() else None
        if data is None:
            continue
        costs = costs_of(data)
        designs[(row["workload"], row["rate"], row["system"])] = data
        lines.append(
            f"| {row['workload']} | {row['rate']:g} | {row['system']} | "
            f"{_ms(costs.decode_ms, *costs.decode_ci, 2)} | "
            f"{_ms(costs.prompt_ms, *costs.prompt_ci, 1)} | {costs.r2:.2f} | "
            f"{costs.mean_prompts:.1f} |"
        )
    return "\n".join(lines + _difference_lines(designs, system, baseline)) + "\n"


def _difference_lines(
    designs: dict[tuple[str, float, str], Design], system: str, baseline: str
) -> list[str]:
    lines = []
    for workload, rate, name in sorted(designs):
        if name != system or (workload, rate, baseline) not in designs:
            continue
        diff = cost_difference(designs[workload, rate, system], designs[workload, rate, baseline])
        if diff is not None:
            lines.append(
                f"| {workload} | {rate:g} | {diff.num} | {_ms(*diff.decode_ms, 2)} | "
                f"{_ms(*diff.prompt_ms, 1)} |"
            )
    if not lines:
        return []
    return [
        "",
        f"{system} less {baseline}, over the requests both served:",
        "",
        "| workload | rate | matched | decode step ms (95%) | per prompt ms (95%) |",
        "| --- | --- | --- | --- | --- |",
        *lines,
    ]
