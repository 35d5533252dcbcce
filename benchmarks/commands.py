"""The `splitserve bench` actions: build configs from the CLI, run, write, plot, print."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from splitserve.benchmarks import plots, report, server_metrics
from splitserve.benchmarks.arrivals import ArrivalConfig
from splitserve.benchmarks.client import TargetConfig
from splitserve.benchmarks.metrics import fill_output_counts
from splitserve.benchmarks.runner import RunConfig, run_benchmark
from splitserve.benchmarks.slo import parse_slos
from splitserve.benchmarks.summary import SummaryOptions, build_summary
from splitserve.benchmarks.sweep import (
    SWEEP_SCHEMA,
    interpolate_capacity,
    point_from_summary,
    search_max_rate,
)
from splitserve.benchmarks.tokenizer import BenchTokenizer, load_tokenizer
from splitserve.benchmarks.workload_factory import build_sessions, workload_section

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


def build_run_config(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """The run's load from the flags; `rate=` or `concurrency=` overrides for sweep points."""
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
        seed=args.seed,
    )
    return RunConfig(arrival, max_concurrency, args.num_warmup, args.progress)


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


class _Bench:
    """Everything one command needs to run the workload once or many times."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.target = build_target(args)
        self.opts = summary_options(args)
        self.tokenizer: BenchTokenizer = load_tokenizer(
            args.tokenizer, self.target.base_url, self.target.model
        )
        self.sessions = build_sessions(args, self.tokenizer)
        self.console = make_console()

    def run_once(
        self, cfg: RunConfig, directory: Path, label: str, with_plots: bool
    ) -> dict[str, Any]:
        scrape = self.args.server_metrics
        before = server_metrics.scrape(self.target.base_url) if scrape else None
        result = run_benchmark(self.target, cfg, self.sessions)
        after = (
            server_metrics.scrape(self.target.base_url) if scrape and before is not None else None
        )
        fill_output_counts(result.records, self.tokenizer)
        extra = {
            "cli": _recorded_flags(self.args),
            "workload": workload_section(self.args, self.sessions),
            "tokenizer": {"name": self.tokenizer.name, "is_exact": self.tokenizer.is_exact},
            "server_metrics": server_metrics.diff(before, after),
        }
        opts = replace(self.opts, label=label)
        summary = build_summary(result, self.target, cfg, opts, extra)
        out = report.write_run(directory, result.records, summary)
        if with_plots:
            rows = report.read_requests(out.requests)
            summary["files"] = [str(p) for p in plots.plot_run(directory, rows, summary)]
            report.write_json(out.summary, summary)
        return summary


def cmd_run(args: argparse.Namespace) -> int:
    bench = _Bench(args)
    directory = output_dir(args, "run")
    summary = bench.run_once(build_run_config(args), directory, args.label, args.plots)
    report.print_summary(summary, bench.console)
    bench.console.print(f"results in {directory}")
    return 0


def _sweep_result(
    args: argparse.Namespace, axis: str, points: list[dict[str, Any]]
) -> dict[str, Any]:
    target = args.target_attainment
    return {
        "schema": SWEEP_SCHEMA,
        "label": args.label,
        "load_axis": axis,
        "slo_spec": [s.label for s in parse_slos(args.slo)],
        "target_attainment": target,
        "points": points,
        "capacity": interpolate_capacity(points, target),
    }


def _run_points(args: argparse.Namespace, axis: str, loads: list[float] | None) -> int:
    bench = _Bench(args)
    directory = output_dir(args, "sweep" if loads else "search")
    key = "concurrency" if axis.startswith("concurrency") else "rate"

    def run_at(load: float) -> dict[str, Any]:
        cfg = build_run_config(args, **{key: load})
        sub = directory / f"{key}-{load:g}"
        summary = bench.run_once(cfg, sub, f"{args.label or key}@{load:g}", with_plots=False)
        point = point_from_summary(load, summary, str(sub / report.SUMMARY_FILE))
        bench.console.print(
            f"{key} {load:g}: attainment {point['attainment']:.1%}, "
            f"{point['request_per_s']:.2f} req/s, meets={point['meets']}"
        )
        return point

    if loads is not None:
        points = [run_at(x) for x in loads]
    else:
        if not args.slo:
            raise ValueError("search needs SLOs to meet; pass e.g. --slo ttft=500ms,tpot=50ms")
        points = search_max_rate(
            run_at, args.start_rate, args.max_rate, args.tolerance, args.max_probes
        )
    sweep = _sweep_result(args, axis, points)
    report.write_json(directory / "sweep.json", sweep)
    if args.plots:
        plots.plot_sweep(sweep, directory / "attainment_vs_load.png")
    cap = sweep["capacity"]
    bench.console.print(
        f"capacity at {args.target_attainment:.0%} attainment: {cap['status']}, "
        f"interpolated {cap['interpolated_rate']}, highest passing {cap['highest_passing']}, "
        f"lowest failing {cap['lowest_failing']}; results in {directory}"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.rates:
        return _run_points(args, "rate (req/s)", list(args.rates))
    return _run_points(args, "concurrency (users)", list(args.concurrencies))


def cmd_search(args: argparse.Namespace) -> int:
    return _run_points(args, "rate (req/s)", None)


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
