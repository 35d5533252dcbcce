"""Builds the summary of one run from its records (the content of summary.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from splitserve.benchmarks.client import RequestRecord, TargetConfig
from splitserve.benchmarks.fidelity import DEFAULT_MAX_LAG_S, load_summary
from splitserve.benchmarks.metrics import (
    RequestMetrics,
    error_counts,
    latency_summary,
    metric_samples,
    request_metrics,
    throughput_summary,
    token_count_sources,
)
from splitserve.benchmarks.prefix_cache import prefix_cache_summary
from splitserve.benchmarks.report import SUMMARY_SCHEMA
from splitserve.benchmarks.runner import RunConfig, RunResult
from splitserve.benchmarks.slo import DEFAULT_SCALES, Slo, evaluate


@dataclass(frozen=True)
class SummaryOptions:
    percentiles: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0)
    slos: tuple[Slo, ...] = ()
    target_attainment: float = 0.9  # DistServe's 90 %
    slo_scales: tuple[float, ...] = DEFAULT_SCALES
    max_lag_s: float = DEFAULT_MAX_LAG_S
    seed: int = 0  # of the bootstrap
    label: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.target_attainment <= 1:
            raise ValueError(f"--target-attainment must be in (0, 1], got {self.target_attainment}")


def _counts(
    records: list[RequestRecord], result: RunResult, metrics: list[RequestMetrics | None]
) -> dict[str, Any]:
    num_ok = sum(m is not None for m in metrics)
    return {
        "num_requests": len(records),
        "num_completed": num_ok,
        "num_failed": len(records) - num_ok,
        "error_rate": (len(records) - num_ok) / len(records) if records else 0.0,
        "errors": error_counts(records),
        "first_error": next((r.error for r in records if r.error), None),
        "num_textless": sum(r.is_textless and r.is_success for r in records),
        "num_sessions_not_started": result.num_sessions_not_started,
        "output_token_sources": token_count_sources(records),
    }


def _notes(records: list[RequestRecord], result: RunResult, run_cfg: RunConfig) -> list[str]:
    """Warnings about what was counted how: approximate counts, textless successes, the
    sessions a --duration-s left unsent."""
    notes = []
    sources = token_count_sources(records)
    if sources.get("approx"):
        notes.append(
            f"{sources['approx']} output token counts are word-count approximations (no usage "
            "from the server and no tokenizer); pass --tokenizer PATH"
        )
    num_textless = sum(r.is_textless and r.is_success for r in records)
    if num_textless:
        notes.append(
            f"{num_textless} responses had output tokens in usage but no text (tokens that "
            "decode to nothing, e.g. random weights); counted as successes, their TTFT and E2E "
            "from the chunks carrying choices, no ITL"
        )
    is_closed = not run_cfg.arrival.is_open_loop
    if run_cfg.duration_s is not None and is_closed and result.num_sessions_not_started == 0:
        notes.append(
            f"every prepared session ran before --duration-s {run_cfg.duration_s:g} ended; "
            "raise --num-requests for a run bounded by the duration"
        )
    return notes


def _target_section(target: TargetConfig) -> dict[str, Any]:
    return {
        "url": target.url,
        "endpoint": target.endpoint,
        "model": target.model,
        "stream": target.stream,
        "ignore_eos": target.ignore_eos,
        "temperature": target.temperature,
    }


def build_summary(
    result: RunResult,
    target: TargetConfig,
    run_cfg: RunConfig,
    opts: SummaryOptions,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Summary dict of a run; `extra` adds sections such as workload, tokenizer, server_metrics."""
    records = result.records
    metrics = [request_metrics(r) for r in records]
    latency, warnings = latency_summary(metric_samples(metrics), opts.percentiles, opts.seed)
    load, load_warnings = load_summary(
        records, run_cfg.arrival, run_cfg.max_concurrency, opts.max_lag_s
    )
    warnings = load_warnings + warnings
    counts = _counts(records, result, metrics)
    if counts["errors"]:
        warnings.insert(
            0,
            f"{counts['num_failed']} of {len(records)} requests failed: {counts['errors']}; "
            f"the first error: {counts['first_error']}",
        )
    prefix_cache, cache_warnings = prefix_cache_summary(records, extra.get("server_metrics", {}))
    warnings = cache_warnings + warnings + _notes(records, result, run_cfg)
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "label": opts.label,
        "started_at": result.started_at,
        "target": _target_section(target),
        "config": {
            "percentiles": list(opts.percentiles),
            "num_warmup": run_cfg.num_warmup,
            "duration_s": run_cfg.duration_s,
            "arrival": asdict(run_cfg.arrival),
        },
        "load": load,
        "counts": counts,
        "prefix_cache": prefix_cache,
        "duration_s": result.duration_s,
        "throughput": throughput_summary(records, metrics, result.duration_s),
        "metrics": latency,
        "warnings": warnings,
    }
    if opts.slos:
        summary["slo"] = evaluate(
            metrics, opts.slos, result.duration_s, opts.target_attainment, opts.slo_scales
        )
    summary.update(extra)
    return summary
