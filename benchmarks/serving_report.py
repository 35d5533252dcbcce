"""Rows, merging and the markdown table of the serving benchmark (benchmarks/serving.py).

`summary.json` is a list of rows, one per (system, workload, rate), each with where it came
from (command, commit, device, date): a later call replaces the rows it re-measures and
keeps the others, so one system or one workload per device call still ends in one file.
Each row's per-request file is `runs/<name>/requests.jsonl.gz` beside it, with the bench
tool's own summary of the run (`runs/<name>/summary.json`). It keeps every field of the
bench's `requests.jsonl` but two, in a smaller form (`archived_request`): the chunk
arrival times as `chunk_gaps_us`, whole microseconds from the previous chunk (the first
from the bench's clock zero; their running sum is `chunk_times_s` to the microsecond), and
the generated text as its length, `generated_text_chars` (a 1,000-request run of 256
tokens each: 1.6 MB compressed as the bench wrote it, about 0.5 MB archived).

Results of calls unpacked apart merge into one directory:

    python -m splitserve.benchmarks.serving_report merge OUT_DIR IN_DIR [IN_DIR ...]

A row also gets `engine_steps` and `tokens_per_step` where the server's /metrics counts
them (`engine_steps`): how each system batched the same arrivals; and `preemptions` (over
the run) and `kv_cache_tokens` (the KV pool's size) where it exposes them (`kv_pool`); and
for splitserve `prefill_attention_runs`, the prefill runs of each attention path over the
run (`prefill_attention_runs`, kernels/prefill_runs.py), and `forwards` and `device_busy`,
its forward passes by kind with their mean device time, and the share of the run the
device spent in them (`forward_passes`, engine/forward_times.py), and `node_gc_pauses`, the
nodes' garbage collections by generation with their total ms (node/gc_pauses.py).

Capacity (in the table): the highest rate whose TTFT p90 and TPOT p90 meet the SLO
(default 1 s and 50 ms), read off the rates measured; the issue's definition.

One system against another, every head-to-head check in one table
(benchmarks/comparison.py):

    python -m splitserve.benchmarks.serving_report compare RESULTS_DIR [--baseline vllm]

What moves capacity: per system and workload, the fixed cost of a step and the GPU time
of a request, fitted to TPOT against the rate (benchmarks/capacity_fit.py):

    python -m splitserve.benchmarks.serving_report fit RESULTS_DIR

What a decode step and each prompt prefilled beside a request cost it, fitted to the
per-request records of every run (benchmarks/request_costs.py):

    python -m splitserve.benchmarks.serving_report costs RESULTS_DIR [--baseline vllm]

Each workload and rate's two runs side by side: TPOT p50 and p90 with the intervals each
run's bench gave them, and the two systems request by request (benchmarks/request_pairs.py):

    python -m splitserve.benchmarks.serving_report pairs RESULTS_DIR [--baseline vllm]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from splitserve.benchmarks import capacity_fit, request_costs, request_pairs
from splitserve.benchmarks.comparison import Targets, capacity
from splitserve.benchmarks.comparison import compare as compare_rows
from splitserve.benchmarks.comparison import markdown as comparison_markdown
from splitserve.benchmarks.report import ARCHIVED_REQUESTS_FILE
from splitserve.benchmarks.served_code import same_served_code

logger = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"
ROW_KEYS = (
    "system", "workload", "rate", "num_requests", "cached_prompt_fraction",
    "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "output_tok_s",
)  # fmt: skip


def run_name(system: str, workload: str, rate: float) -> str:
    return f"{system}_{workload}_rate{rate:g}"


def _pct(summary: dict[str, Any], metric: str, q: str) -> float | None:
    stat = summary["metrics"].get(f"{metric}_ms", {}).get(q)
    return None if stat is None else stat["value"]


def cached_fraction(requests: list[dict[str, Any]]) -> float:
    """Prompt tokens the server reported cached over prompt tokens, over the requests
    that reported usage (0 when none did)."""
    prompt = sum(r.get("num_prompt_tokens") or 0 for r in requests)
    cached = sum(r.get("num_cached_tokens") or 0 for r in requests)
    return cached / prompt if prompt else 0.0


def make_row(
    system: str, workload: str, rate: float, run_dir: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    """The row of one bench run, from its summary.json and requests.jsonl."""
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = (run_dir / "requests.jsonl").read_text().splitlines()
    requests = [json.loads(line) for line in lines if line.strip()]
    counts = summary["counts"]
    row: dict[str, Any] = {
        "system": system,
        "workload": workload,
        "rate": rate,
        "num_requests": counts["num_completed"],
        "cached_prompt_fraction": cached_fraction(requests),
        **{f"ttft_{q}_ms": _pct(summary, "ttft", q) for q in ("p50", "p90", "p99")},
        **{f"tpot_{q}_ms": _pct(summary, "tpot", q) for q in ("p50", "p90")},
        "output_tok_s": summary["throughput"]["output_tokens_per_s"],
        "num_failed": counts["num_failed"],
        "achieved_rate": summary["load"].get("achieved_rate"),
    }
    stages = stream_stages_ms(summary)
    if stages:
        row["stream_stage_mean_ms"] = stages
    steps = engine_steps(summary)
    if steps is not None:
        row["engine_steps"], row["tokens_per_step"] = steps
    row.update(kv_pool(summary))
    runs = prefill_attention_runs(summary)
    if runs:
        row["prefill_attention_runs"] = runs
    row.update(forward_passes(summary))
    pauses = node_gc_pauses(summary)
    if pauses:
        row["node_gc_pauses"] = pauses
    row.update(extra)
    return row


def stream_stages_ms(summary: dict[str, Any]) -> dict[str, float]:
    """Mean per-message time of each streaming stage (splitserve's router with
    --trace-stream-timing), from the bench's scrape of the server's /metrics."""
    means = (summary.get("server_metrics") or {}).get("histogram_means") or {}
    out = {}
    for key, value in means.items():
        match = re.fullmatch(r'splitserve_router_stream_stage_seconds\{stage="(\w+)"\}', key)
        if match and value is not None:
            out[match[1]] = value * 1000.0
    return out


def _summed(deltas: dict[str, float], name: str) -> float:
    """A counter's delta summed over its label sets (0 when absent)."""
    return sum(v for k, v in deltas.items() if k == name or k.startswith(name + "{"))


def engine_steps(summary: dict[str, Any]) -> tuple[float, float] | None:
    """(engine steps, tokens a step carried) over the run, from the server's counters: vLLM's
    `vllm:iteration_tokens_total` histogram, splitserve's per-node totals on the router (the
    run's warm-up requests included); None when the server exposes neither."""
    deltas = (summary.get("server_metrics") or {}).get("deltas") or {}
    steps = _summed(deltas, "vllm:iteration_tokens_total_count")
    tokens = _summed(deltas, "vllm:iteration_tokens_total_sum")
    if not steps:
        prefix = "splitserve_router_node_"
        steps = _summed(deltas, prefix + "engine_steps_total")
        tokens = _summed(deltas, prefix + "prompt_tokens_computed_total") + _summed(
            deltas, prefix + "generation_tokens_total"
        )
    return (steps, tokens / steps) if steps else None


def kv_pool(summary: dict[str, Any]) -> dict[str, float]:
    """`preemptions` over the run and `kv_cache_tokens`, where the server exposes them:
    vLLM's `vllm:num_preemptions_total` and its `cache_config_info` label
    `kv_cache_size_tokens`; splitserve's decode nodes' totals on the router (`node_
    preemptions_total`, `node_kv_cache_tokens`)."""
    metrics = summary.get("server_metrics") or {}
    deltas, gauges = metrics.get("deltas") or {}, metrics.get("gauges_after") or {}
    out: dict[str, float] = {}
    for name in ("vllm:num_preemptions_total", "splitserve_router_node_preemptions_total"):
        if any(k == name or k.startswith(name + "{") for k in deltas):
            out["preemptions"] = _summed(deltas, name)
    tokens = [
        float(match[1])
        for key in gauges
        if key.startswith("vllm:cache_config_info{")
        and (match := re.search(r'kv_cache_size_tokens="(\d+)"', key))
    ]
    tokens += [
        value
        for key, value in gauges.items()
        if key.startswith("splitserve_router_node_kv_cache_tokens{") and 'role="decode"' in key
    ]
    if tokens:
        out["kv_cache_tokens"] = sum(tokens)
    return out


def _node_deltas(summary: dict[str, Any], metric: str, label: str) -> dict[str, float]:
    """The run's delta of the router's `node_<metric>_total{<label>}`, every node together,
    by label value; empty where not exposed."""
    deltas = (summary.get("server_metrics") or {}).get("deltas") or {}
    pattern = rf'splitserve_router_node_{metric}_total\{{.*{label}="(\w+)".*\}}'
    out: dict[str, float] = {}
    for key, value in deltas.items():
        match = re.fullmatch(pattern, key)
        if match:
            out[match[1]] = out.get(match[1], 0.0) + value
    return out


def prefill_attention_runs(summary: dict[str, Any]) -> dict[str, float]:
    """splitserve's prefill attention runs over the run by path, every node together, from
    the router's `node_prefill_attention_runs_total{path}`; empty where not exposed."""
    return _node_deltas(summary, "prefill_attention_runs", "path")


def forward_passes(summary: dict[str, Any]) -> dict[str, Any]:
    """splitserve's forward passes over the run (engine/forward_times.py), every node
    together: `forwards`, per kind the passes, their mean device ms and rows; and
    `device_busy`, their device seconds over the time between the bench's two scrapes of
    /metrics (the warm-up and the run; above 1 with several nodes). Empty where not
    exposed."""
    num = _node_deltas(summary, "forwards", "kind")
    if not any(num.values()):
        return {}
    seconds = _node_deltas(summary, "forward_device_seconds", "kind")
    rows = _node_deltas(summary, "forward_rows", "kind")
    forwards = {
        kind: {
            "num": n,
            "mean_device_ms": seconds.get(kind, 0.0) / n * 1e3 if n else None,
            "mean_rows": rows.get(kind, 0.0) / n if n else None,
        }
        for kind, n in sorted(num.items())
    }
    out: dict[str, Any] = {"forwards": forwards}
    interval = (summary.get("server_metrics") or {}).get("interval_s")
    if interval:
        out["device_busy"] = sum(seconds.values()) / interval
    return out


def node_gc_pauses(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """splitserve's nodes' garbage collections over the run by generation (node/
    gc_pauses.py): how many and their total ms, every node together; empty where not
    exposed."""
    num = _node_deltas(summary, "gc_collections", "generation")
    seconds = _node_deltas(summary, "gc_pause_seconds", "generation")
    return {
        f"gen{g}": {"num": n, "total_ms": seconds.get(g, 0.0) * 1e3} for g, n in sorted(num.items())
    }


def archived_request(record: dict[str, Any]) -> dict[str, Any]:
    """One line of the archived per-request file (see the module docstring)."""
    out = dict(record)
    times = out.pop("chunk_times_s", None)
    if times is not None:
        micros = [round(t * 1e6) for t in times]
        out["chunk_gaps_us"] = [b - a for a, b in itertools.pairwise([0, *micros])]
    text = out.pop("generated_text", None)
    if text is not None:
        out["generated_text_chars"] = len(text)
    return out


def keep_run(run_dir: Path, out_dir: Path, name: str) -> None:
    """Copy a run's summary, and its per-request file archived and compressed, under
    out_dir/runs/."""
    dest = out_dir / "runs" / name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "summary.json", dest / "summary.json")
    with (
        (run_dir / "requests.jsonl").open() as src,
        gzip.open(dest / ARCHIVED_REQUESTS_FILE, "wt") as dst,
    ):
        for line in src:
            if line.strip():
                dst.write(json.dumps(archived_request(json.loads(line))) + "\n")


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`old` with every row `new` re-measures replaced; sorted by system, workload, rate."""
    key = lambda r: (r["system"], r["workload"], float(r["rate"]))  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    return [merged[k] for k in sorted(merged)]


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / SUMMARY_FILE
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path} is not a list of rows; move it away or pick another --out-dir")
    return rows


def _cell(*values: float | None) -> str:
    return " / ".join("-" if v is None else f"{v:,.1f}" for v in values)


def markdown(rows: list[dict[str, Any]], slo_ttft_ms: float, slo_tpot_ms: float) -> str:
    """One table per workload: a line per rate, each system's TTFT and TPOT side by side."""
    systems = sorted({r["system"] for r in rows})
    out = []
    for workload in sorted({r["workload"] for r in rows}):
        mine = [r for r in rows if r["workload"] == workload]
        by = {(r["system"], r["rate"]): r for r in mine}
        head = ["rate (req/s)"]
        for s in systems:
            head += [f"{s} TTFT p50 / p90 / p99 ms", f"{s} TPOT p50 / p90 ms", f"{s} out tok/s"]
        out += [f"### {workload} (prompt x output tokens)", "", "| " + " | ".join(head) + " |"]
        out.append("|" + " --- |" * len(head))
        for rate in sorted({r["rate"] for r in mine}):
            cells = [f"{rate:g}"]
            for s in systems:
                r = by.get((s, rate))
                if r is None:
                    cells += ["not run"] * 3
                    continue
                ttft = _cell(r["ttft_p50_ms"], r["ttft_p90_ms"], r["ttft_p99_ms"])
                cells += [ttft, _cell(r["tpot_p50_ms"], r["tpot_p90_ms"]), _cell(r["output_tok_s"])]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for s in systems:
            cap = capacity([r for r in mine if r["system"] == s], slo_ttft_ms, slo_tpot_ms)
            text = "no rate measured met it" if cap is None else f"{cap:g} req/s"
            out.append(
                f"- {s}: capacity at TTFT p90 <= {slo_ttft_ms:g} ms and TPOT p90 <= "
                f"{slo_tpot_ms:g} ms: {text}"
            )
        for s in systems:
            for line in (_steps_line(s, mine), _pool_line(s, mine)):
                if line is not None:
                    out.append(line)
        out.append("")
    return "\n".join(out)


def _steps_line(system: str, rows: list[dict[str, Any]]) -> str | None:
    """The engine steps of each run and the tokens a step carried, where counted."""
    rows = [r for r in rows if r["system"] == system]
    counted = sorted((r for r in rows if r.get("engine_steps")), key=lambda r: r["rate"])
    if not counted:
        return None
    runs = ", ".join(
        f"{r['rate']:g} req/s {r['engine_steps']:,.0f} ({r['tokens_per_step']:,.0f})"
        for r in counted
    )
    return f"- {system}: engine steps over each run (tokens a step): {runs}"


def _pool_line(system: str, rows: list[dict[str, Any]]) -> str | None:
    """The preemptions of each run and the KV pool's size in tokens, where exposed."""
    rows = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
    counted = [r for r in rows if "preemptions" in r]
    sizes = sorted({r["kv_cache_tokens"] for r in rows if "kv_cache_tokens" in r})
    if not counted and not sizes:
        return None
    runs = ", ".join(f"{r['rate']:g} req/s {r['preemptions']:,.0f}" for r in counted)
    pool = " / ".join(f"{s:,.0f}" for s in sizes) or "not exposed"
    return f"- {system}: preemptions over each run: {runs or 'not counted'}; KV pool {pool} tokens"


def write_summary(
    out_dir: Path, new_rows: list[dict[str, Any]], slo_ttft_ms: float, slo_tpot_ms: float
) -> list[dict[str, Any]]:
    """Merge `new_rows` into out_dir/summary.json and rewrite the markdown table."""
    rows = merge_rows(read_rows(out_dir), new_rows)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / TABLE_FILE).write_text(markdown(rows, slo_ttft_ms, slo_tpot_ms))
    return rows


def merge_dirs(out_dir: Path, in_dirs: list[Path], slo_ttft_ms: float, slo_tpot_ms: float) -> int:
    """Merge the rows and runs/ of `in_dirs` (later ones win) into `out_dir`; row count."""
    rows = read_rows(out_dir)
    for in_dir in in_dirs:
        if not (in_dir / SUMMARY_FILE).exists():
            raise ValueError(f"{in_dir} has no {SUMMARY_FILE}: pass the unpacked results folder")
        rows = merge_rows(rows, read_rows(in_dir))
        if (in_dir / "runs").is_dir():
            shutil.copytree(in_dir / "runs", out_dir / "runs", dirs_exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / TABLE_FILE).write_text(markdown(rows, slo_ttft_ms, slo_tpot_ms))
    return len(rows)


def _parser() -> argparse.ArgumentParser:
    targets = Targets()
    parser = argparse.ArgumentParser(description="merge and compare serving benchmark results")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge result folders into OUT_DIR")
    merge.add_argument("out_dir", type=Path)
    merge.add_argument("in_dirs", type=Path, nargs="+")
    compare = sub.add_parser("compare", help="one system's rows against a baseline's")
    compare.add_argument("results_dir", type=Path, help="a folder with summary.json")
    compare.add_argument("--min-requests", type=int, default=targets.min_requests)
    compare.add_argument("--capacity-ratio", type=float, default=targets.capacity_ratio)
    compare.add_argument("--fresh-ratio", type=float, default=targets.fresh_ratio)
    compare.add_argument("--lowest-rate", type=float, default=targets.lowest_rate)
    fit = sub.add_parser("fit", help="each system's step and request cost, fitted to TPOT")
    fit.add_argument("results_dir", type=Path, help="a folder with summary.json")
    for p in (merge, compare, fit):
        p.add_argument("--slo-ttft-ms", type=float, default=targets.slo_ttft_ms)
        p.add_argument("--slo-tpot-ms", type=float, default=targets.slo_tpot_ms)
    costs = sub.add_parser("costs", help="decode step and per-prompt costs, from the requests")
    costs.add_argument("results_dir", type=Path, help="a folder with summary.json and runs/")
    pairs = sub.add_parser("pairs", help="TPOT intervals and the two systems request by request")
    pairs.add_argument("results_dir", type=Path, help="a folder with summary.json and runs/")
    for p in (compare, costs, pairs):
        p.add_argument("--system", default="splitserve")
        p.add_argument("--baseline", default="vllm")
    return parser


def _compare(args: argparse.Namespace) -> str:
    rows = _rows_of(args.results_dir)
    targets = Targets(
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
        capacity_ratio=args.capacity_ratio, fresh_ratio=args.fresh_ratio,
        min_requests=args.min_requests, lowest_rate=args.lowest_rate,
    )  # fmt: skip
    checks = compare_rows(rows, args.system, args.baseline, targets, same_served_code)
    if not checks:
        raise ValueError(f"no workload has rows of both {args.system} and {args.baseline}")
    return comparison_markdown(checks, args.system, args.baseline)


def _rows_of(results_dir: Path) -> list[dict[str, Any]]:
    rows = read_rows(results_dir)
    if not rows:
        raise ValueError(f"{results_dir} has no {SUMMARY_FILE}: pass a results folder")
    return rows


def _fit(args: argparse.Namespace) -> str:
    rows = _rows_of(args.results_dir)
    return capacity_fit.markdown(capacity_fit.fits(rows, args.slo_ttft_ms, args.slo_tpot_ms))


def _costs(args: argparse.Namespace) -> str:
    def records(row: dict[str, Any]) -> Path:
        run = _run_dir(args.results_dir, row["system"], row["workload"], row["rate"])
        return run / ARCHIVED_REQUESTS_FILE

    runs = [(row, records(row)) for row in _rows_of(args.results_dir)]
    return request_costs.markdown(runs, args.system, args.baseline)


def _run_dir(results_dir: Path, system: str, workload: str, rate: float) -> Path:
    return results_dir / "runs" / run_name(system, workload, rate)


def _pairs(args: argparse.Namespace) -> str:
    points = {(row["workload"], row["rate"]) for row in _rows_of(args.results_dir)}
    runs = [
        (
            workload,
            rate,
            _run_dir(args.results_dir, args.system, workload, rate),
            _run_dir(args.results_dir, args.baseline, workload, rate),
        )
        for workload, rate in points
    ]
    return request_pairs.markdown(runs, args.system, args.baseline)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            print(_compare(args), end="")
            return 0
        if args.command in ("fit", "costs", "pairs"):
            report = {"fit": _fit, "costs": _costs, "pairs": _pairs}[args.command]
            print(report(args), end="")
            return 0
        num = merge_dirs(args.out_dir, args.in_dirs, args.slo_ttft_ms, args.slo_tpot_ms)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{num} rows in {args.out_dir / SUMMARY_FILE}")
    print((args.out_dir / TABLE_FILE).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
