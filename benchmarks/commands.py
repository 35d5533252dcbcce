"""The `splitserve bench` actions: build configs from the CLI, run, write, plot, print
(`run`, `compare`, `plot` here; `sweep` and `search` in `points.py`).

Exit codes: 0 when every run's failed requests stay within --max-error-rate; 1 when a run
exceeded it, or the first requests all failed and the run stopped early (the first error,
the server's own message, is printed); 2 for a usage error (bad flags, no server to ask
for its model name). A sweep runs every point before exiting 1 for an error rate, but stops
at once when a point's first requests all fail.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from splitserve.benchmarks import plots, report, server_metrics
from splitserve.benchmarks.arrivals import ArrivalConfig
from splitserve.benchmarks.client import TargetConfig
from splitserve.benchmarks.metrics import RequestMetrics, fill_output_counts, request_metrics
from splitserve.benchmarks.runner import BenchAborted, RunConfig, run_benchmark
from splitserve.benchmarks.slo import parse_slos
from splitserve.benchmarks.summary import SummaryOptions, build_summary
from splitserve.benchmarks.tokenizer import BenchTokenizer, load_tokenizer
from splitserve.benchmarks.workload_factory import (
    MEASURED_STREAM,
    WARMUP_STREAM,
    build_sessions,
    draw_seed,
    workload_section,
)
from splitserve.benchmarks.workloads import Session

ARRIVAL_STREAM = 2  # draw_seed stream of the arrival schedules

logger = logging.getLogger(__name__)


def discover_model(base_url: str, api_key: str | None) -> str:
    req = urllib.request.Request(f"{base_url}/v1/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return str(json.loads(resp.read())["data"][0]["id"])
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"could not read the model name from {base_url}/v1/models ({exc}); is the server "
            "up? Pass --model NAME to skip the lookup"
        ) from exc


def build_target(args: argparse.Namespace) -> TargetConfig:
    headers = []
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--header {item!r} must be KEY=VALUE")
        headers.append((key.strip(), value.strip()))
    try:
        extra = json.loads(args.extra_body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--extra-body is not JSON ({exc}); pass e.g. '{{\"top_k\": 1}}'") from exc
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    target = TargetConfig(
        base_url=args.url,
        endpoint=args.endpoint,
        model=args.model or "",
        stream=args.stream,
        api_key=args.api_key,
        headers=tuple(headers),
        extra_body=tuple(extra.items()),
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        max_tokens_field=args.max_tokens_field,
        request_timeout_s=args.request_timeout_s,
    )
    if not target.model:
        target = replace(target, model=discover_model(target.base_url, target.api_key))
    if args.prompt_format == "token-ids" and target.endpoint == "chat":
        raise ValueError("--prompt-format token-ids needs --endpoint completions")
    return target


def _arrival_kind(args: argparse.Namespace, rate: float, is_rate_sweep: bool) -> str:
    kind: str | None = args.arrival
    if is_rate_sweep and kind in ("closed", "trace"):
        raise ValueError(
            f"--rates sweeps open-loop rates; drop --arrival {kind} (use --concurrencies for "
            "closed-loop users, --time-scale for traces)"
        )
    if kind is not None:
        return kind
    if args.workload == "mooncake" and not is_rate_sweep:
        return "trace"
    return "closed" if args.max_concurrency and math.isinf(rate) else "poisson"


def build_run_config(args: argparse.Namespace, index: int = 0, **overrides: Any) -> RunConfig:
    """The run's load from the flags; `rate=` or `concurrency=` overrides for sweep points;
    `index` (the run's number in a sweep) picks a fresh arrival seed."""
    rate = float(overrides.get("rate", args.rate))
    kind = _arrival_kind(args, rate, "rate" in overrides)
    max_concurrency = args.max_concurrency
    if "concurrency" in overrides:
        kind, rate, max_concurrency = "closed", math.inf, int(overrides["concurrency"])
    arrival = ArrivalConfig(
        kind=kind,  # type: ignore[arg-type]
        rate=rate,
        cv=args.cv,
        ramp_up_s=args.ramp_up_s,
        ramp_start_rate=args.ramp_start_rate,
        time_scale=args.time_scale,
        seed=draw_seed(args.seed, ARRIVAL_STREAM, index),
    )
    return RunConfig(
        arrival,
        max_concurrency,
        args.num_warmup,
        args.progress,
        duration_s=args.duration_s,
        abort_after_failures=args.abort_after_failures,
    )


def num_sessions(args: argparse.Namespace, cfg: RunConfig) -> int | None:
    """Sessions to prepare: --num-requests, else enough for --duration-s at the rate."""
    if args.num_requests is not None or cfg.duration_s is None:
        return int(args.num_requests) if args.num_requests is not None else None
    arrival = cfg.arrival
    if arrival.kind in ("poisson", "gamma", "constant") and not math.isinf(arrival.rate):
        return max(1, math.ceil(arrival.rate * cfg.duration_s))
    if arrival.kind == "trace":
        return None
    raise ValueError(
        "--duration-s with a closed loop or --rate inf needs --num-requests N, the most "
        "sessions to prepare (the run stops at whichever comes first)"
    )


def summary_options(args: argparse.Namespace) -> SummaryOptions:
    return SummaryOptions(
        percentiles=tuple(args.percentiles),
        slos=parse_slos(args.slo),
        target_attainment=args.target_attainment,
        slo_scales=tuple(args.slo_scales),
        max_lag_s=args.max_lag_ms / 1000.0,
        seed=args.seed,
        label=args.label,
    )


def output_dir(args: argparse.Namespace, kind: str) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("bench-results") / f"{args.label or kind}-{stamp}"


def _recorded_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of a run for its summary, without secrets (API key, header values)."""
    flags = {k: v for k, v in vars(args).items() if k != "api_key"}
    flags["header"] = [h.partition("=")[0] for h in args.header]
    return flags


def make_console() -> Console:
    """Rich console; wide enough for the latency table when output is not a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=160)


class Bench:
    """Everything one command needs to run the workload once or many times."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.target = build_target(args)
        self.opts = summary_options(args)
        if not 0 <= args.max_error_rate <= 1:
            raise ValueError(f"--max-error-rate must be in [0, 1], got {args.max_error_rate}")
        if getattr(args, "repeats", 1) < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        self.tokenizer: BenchTokenizer = load_tokenizer(
            args.tokenizer, self.target.base_url, self.target.model
        )
        self.console = make_console()
        self.num_runs = 0  # runs so far: the index of the next run's seeds
        self.num_file_sessions = 0  # ShareGPT conversations sent so far
        self.over_error_rate: list[str] = []  # runs whose error rate passed the limit
        self._reused: list[Session] | None = None

    def _draw(self, seed: int, num: int | None) -> list[Session]:
        sessions = build_sessions(self.args, self.tokenizer, seed, num, self.num_file_sessions)
        self.num_file_sessions += len(sessions)
        return sessions

    def workload(self, cfg: RunConfig, index: int) -> tuple[list[Session], list[Session]]:
        """(measured sessions, warm-up sessions) of run `index`: fresh prompts for both,
        unless --reuse-prompts (one workload; warm-ups send its first prompts)."""
        num = num_sessions(self.args, cfg)
        if self.args.reuse_prompts:
            if self._reused is None:
                self._reused = self._draw(self.args.seed, num)
            return self._reused, self._reused[: cfg.num_warmup]
        warmup = []
        if cfg.num_warmup:
            warmup = self._draw(draw_seed(self.args.seed, WARMUP_STREAM, index), cfg.num_warmup)
        return self._draw(draw_seed(self.args.seed, MEASURED_STREAM, index), num), warmup

    def run_once(
        self, load: dict[str, float], directory: Path, label: str, with_plots: bool
    ) -> tuple[dict[str, Any], list[RequestMetrics | None]]:
        """One run at `load` (a `rate=` or `concurrency=` override, or none): its summary,
        written with the records, and the per-request metrics."""
        index = self.num_runs
        self.num_runs += 1
        cfg = build_run_config(self.args, index, **load)
        sessions, warmup = self.workload(cfg, index)
        scrape = self.args.server_metrics
        scraped_at = time.monotonic()
        before = server_metrics.scrape(self.target.base_url) if scrape else None
        result = run_benchmark(self.target, cfg, sessions, warmup)
        after = (
            server_metrics.scrape(self.target.base_url) if scrape and before is not None else None
        )
        interval_s = time.monotonic() - scraped_at
        fill_output_counts(result.records, self.tokenizer)
        extra = {
            "cli": _recorded_flags(self.args),
            "workload": workload_section(self.args, sessions),
            "tokenizer": {"name": self.tokenizer.name, "is_exact": self.tokenizer.is_exact},
            "server_metrics": server_metrics.diff(before, after, interval_s),
        }
        summary = build_summary(result, self.target, cfg, replace(self.opts, label=label), extra)
        out = report.write_run(directory, result.records, summary)
        if with_plots:
            rows = report.read_requests(out.requests)
            summary["files"] = [str(p) for p in plots.plot_run(directory, rows, summary)]
            report.write_json(out.summary, summary)
        self._check_error_rate(summary, label or str(directory))
        return summary, [request_metrics(r) for r in result.records]

    def _check_error_rate(self, summary: dict[str, Any], name: str) -> None:
        counts = summary["counts"]
        if counts["error_rate"] > self.args.max_error_rate:
            self.over_error_rate.append(
                f"{name}: {counts['num_failed']} of {counts['num_requests']} requests failed "
                f"({counts['error_rate']:.0%} > --max-error-rate {self.args.max_error_rate:.0%}); "
                f"the first error: {counts['first_error']}"
            )

    def exit_code(self) -> int:
        for line in self.over_error_rate:
            print(f"splitserve bench: error: {line}", file=sys.stderr)
        return 1 if self.over_error_rate else 0


def report_aborted(exc: BenchAborted) -> int:
    print(f"splitserve bench: error: {exc}", file=sys.stderr)
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    directory = output_dir(args, "run")
    try:
        summary, _ = bench.run_once({}, directory, args.label, args.plots)
    except BenchAborted as exc:
        return report_aborted(exc)
    report.print_summary(summary, bench.console)
    bench.console.print(f"results in {directory}")
    return bench.exit_code()


def cmd_compare(args: argparse.Namespace) -> int:
    results = [report.load_result(p) for p in args.results]
    report.print_comparison(results, make_console())
    path = plots.plot_compare(results, Path(args.output))
    print(f"wrote {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    result = report.load_result(args.result)
    directory = Path(result["_path"]).parent
    if "points" in result:
        written = [plots.plot_sweep(result, directory / "attainment_vs_load.png")]
    else:
        rows = report.read_requests(directory / report.REQUESTS_FILE)
        written = plots.plot_run(directory, rows, result)
    for p in written:
        print(f"wrote {p}")
    return 0
