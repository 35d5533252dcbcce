"""Results on disk and on the console: per-request JSONL, summary JSON, rich tables.

Layout of a run's output directory:
    requests.jsonl   one line per request: the client record plus its derived metrics (ms)
    summary.json     schema SUMMARY_SCHEMA: config, load, counts, throughput, metrics, slo,
                     server_metrics, warnings
    *.png            plots (plots.py)
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from splitserve.benchmarks.client import RequestRecord
from splitserve.benchmarks.metrics import LATENCY_METRICS, RequestMetrics, request_metrics

SUMMARY_SCHEMA = "splitserve.bench.summary/1"
REQUESTS_FILE = "requests.jsonl"
SUMMARY_FILE = "summary.json"
# A run's records as a results folder keeps them (benchmarks/serving_report.py), gzipped.
ARCHIVED_REQUESTS_FILE = REQUESTS_FILE + ".gz"


@dataclass(frozen=True)
class RunOutputs:
    directory: Path
    requests: Path
    summary: Path


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def fixed(value: float, digits: int) -> str:
    """`value` to `digits` decimals, with no sign on what rounds to zero."""
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def request_row(rec: RequestRecord, m: RequestMetrics | None) -> dict[str, Any]:
    row = rec.to_dict()
    row.update(
        ttft_ms=_ms(m.ttft_s) if m else None,
        tpot_ms=_ms(m.tpot_s) if m else None,
        e2e_ms=_ms(m.e2e_s) if m else None,
        max_itl_ms=_ms(m.max_itl_s) if m else None,
        lag_ms=_ms(rec.send_s - rec.intended_send_s),
    )
    return row


def _clean(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings / null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("inf" if obj > 0 else None)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(data), indent=2) + "\n")


def write_run(directory: Path, records: list[RequestRecord], summary: dict[str, Any]) -> RunOutputs:
    directory.mkdir(parents=True, exist_ok=True)
    out = RunOutputs(directory, directory / REQUESTS_FILE, directory / SUMMARY_FILE)
    with out.requests.open("w") as f:
        for rec in records:
            f.write(json.dumps(_clean(request_row(rec, request_metrics(rec)))) + "\n")
    write_json(out.summary, summary)
    return out


def read_requests(path: Path) -> list[dict[str, Any]]:
    """A run's records: the bench's requests.jsonl, or an archived requests.jsonl.gz."""
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def load_result(path: str | Path) -> dict[str, Any]:
    """A summary.json or sweep.json; a directory means the summary/sweep inside it."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_FILE if (p / SUMMARY_FILE).exists() else p / "sweep.json"
    if not p.exists():
        raise ValueError(
            f"{path}: no such result; pass a summary.json, sweep.json or run directory"
        )
    data = json.loads(p.read_text())
    data.setdefault("_path", str(p))
    return dict(data)


def _cell(stat: Any) -> str:
    if isinstance(stat, dict):
        low, high = stat["ci95"]
        mark = "" if stat.get("is_supported", True) else "*"
        return f"{stat['value']:.1f} [{low:.1f}, {high:.1f}]{mark}"
    return "-" if stat is None else f"{stat:.1f}"


def _capacity_cell(capacity: dict[str, Any] | None) -> str:
    if not capacity or capacity.get("interpolated_rate") is None:
        return "-"
    ci = capacity.get("ci95")
    interval = f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""
    return f"{capacity['interpolated_rate']:.1f}{interval}"


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    counts, thr, load = summary["counts"], summary["throughput"], summary["load"]
    console.print(
        f"[bold]{summary.get('label') or 'run'}[/] {summary['target']['url']} "
        f"({summary['target']['model']}), {load['arrival']} rate={load['rate']} "
        f"concurrency={load['max_concurrency']}"
    )
    console.print(
        f"requests {counts['num_completed']}/{counts['num_requests']} ok, "
        f"{counts['num_failed']} failed {counts['errors'] or ''}; "
        f"duration {summary['duration_s']:.2f} s; "
        f"{thr['request_per_s']:.2f} req/s, {thr['output_tokens_per_s']:.1f} out tok/s"
    )
    print_prefix_cache(summary, console)
    pcts = summary["config"]["percentiles"]
    table = Table(title="latency (ms): value [95% CI], * = too few samples for this tail")
    for col in ("metric", "n", "mean", *[f"p{q:g}" for q in pcts]):
        table.add_column(col, justify="right")
    for name in LATENCY_METRICS:
        stats = summary["metrics"][f"{name}_ms"]
        cells = [_cell(stats.get(f"p{q:g}")) for q in pcts]
        table.add_row(name, str(stats["n"]), _cell(stats.get("mean")), *cells)
    console.print(table)
    slo = summary.get("slo")
    if slo:
        console.print(
            f"SLO {', '.join(slo['spec'])}: attainment {slo['attainment']:.1%}, goodput "
            f"{slo['goodput_rps']:.2f} req/s, meets target {slo['target_attainment']:.0%}: "
            f"{'yes' if slo['meets'] else 'no'}"
        )
    for warning in summary.get("warnings", []):
        if "prefix cache" not in warning:  # printed loudly above
            console.print(f"[yellow]warning:[/] {warning}")


def print_prefix_cache(summary: dict[str, Any], console: Console) -> None:
    """The cached-prompt fraction, and a loud warning when it exceeds the workload's."""
    cache = summary.get("prefix_cache") or {}
    if cache.get("cached_fraction") is None:
        console.print("prefix cache: unknown (no cached_tokens in usage, no server counters)")
        return
    console.print(
        f"prefix cache: {cache['cached_fraction']:.1%} of prompt tokens served from cache "
        f"(the workload shares {cache['workload_fraction']:.1%}; from {cache['source']})"
    )
    for warning in summary.get("warnings", []):
        if "prefix cache" in warning:
            console.print(f"[bold red]WARNING:[/] {warning}", soft_wrap=True)


def print_comparison(results: list[dict[str, Any]], console: Console | None = None) -> None:
    """Side-by-side p50/p90/p99 of each latency metric, throughput and attainment."""
    console = console or Console()
    table = Table(title="comparison (ms unless noted)")
    table.add_column("metric")
    for r in results:
        table.add_column(str(r.get("label") or r["_path"]), justify="right")
    for name in LATENCY_METRICS:
        for q in ("p50", "p90", "p99"):
            cells = [_cell(r.get("metrics", {}).get(f"{name}_ms", {}).get(q)) for r in results]
            table.add_row(f"{name} {q}", *cells)
    table.add_row("req/s", *[_cell(r.get("throughput", {}).get("request_per_s")) for r in results])
    table.add_row(
        "out tok/s", *[_cell(r.get("throughput", {}).get("output_tokens_per_s")) for r in results]
    )
    table.add_row(
        "attainment %",
        *[_cell(100 * r["slo"]["attainment"]) if r.get("slo") else "-" for r in results],
    )
    table.add_row("capacity req/s", *[_capacity_cell(r.get("capacity")) for r in results])
    table.add_row(
        "capacity, achieved req/s",
        *[_capacity_cell((r.get("capacity") or {}).get("achieved")) for r in results],
    )
    console.print(table)
