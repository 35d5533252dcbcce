"""`splitserve bench sweep` and `search`: runs at several loads, each --repeats times with
fresh prompts, then capacity with its interval (`sweep.py`) into sweep.json and a plot.

Order: `_run_points` makes one `Bench` (target, tokenizer), then for each load (a list for
sweep, chosen probe by probe for search) `Points.run_at` runs the repeats through
`Bench.run_once`, evaluates the SLOs over all their requests and keeps resampled verdicts
for the capacity interval.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from splitserve.benchmarks import plots, report
from splitserve.benchmarks.commands import Bench, output_dir, report_aborted
from splitserve.benchmarks.metrics import RequestMetrics
from splitserve.benchmarks.runner import BenchAborted
from splitserve.benchmarks.slo import bootstrap_meets, evaluate, parse_slos
from splitserve.benchmarks.sweep import (
    DEFAULT_NUM_BOOT,
    SWEEP_SCHEMA,
    capacity_section,
    point_from_summaries,
    search_max_rate,
)


class Points:
    """The points of a sweep or search: each load run --repeats times, with fresh prompts."""

    def __init__(self, bench: Bench, directory: Path, key: str) -> None:
        self.bench = bench
        self.directory = directory
        self.key = key  # rate | concurrency
        self.boots: dict[float, tuple[Any, Any]] = {}
        self.rng = np.random.default_rng(bench.args.seed)

    def run_at(self, load: float) -> dict[str, Any]:
        args, bench = self.bench.args, self.bench
        base = self.directory / f"{self.key}-{load:g}"
        summaries, paths, metrics = [], [], []
        for r in range(args.repeats):
            sub = base if args.repeats == 1 else base / f"repeat-{r + 1}"
            label = f"{args.label or self.key}@{load:g}" + (f"#{r + 1}" if args.repeats > 1 else "")
            summary, per_request = bench.run_once({self.key: load}, sub, label, with_plots=False)
            if summary["prefix_cache"].get("is_above_workload"):
                report.print_prefix_cache(summary, bench.console)
            summaries.append(summary)
            paths.append(str(sub / report.SUMMARY_FILE))
            metrics += per_request
        point = point_from_summaries(load, summaries, paths, self._verdict(summaries, metrics))
        target = bench.opts.target_attainment if bench.opts.slos else 1.0
        self.boots[load] = bootstrap_meets(
            metrics, bench.opts.slos, target, self.rng, DEFAULT_NUM_BOOT
        )
        low, high = point["attainment_ci95"]
        bench.console.print(
            f"{self.key} {load:g}: attainment {point['attainment']:.1%} [{low:.1%}, {high:.1%}], "
            f"{point['request_per_s']:.2f} req/s (sent {_num(point['achieved_rate'])}/s), "
            f"prompt cached {_pct(point['cached_fraction'])}, meets={point['meets']}"
        )
        return point

    def _verdict(
        self, summaries: list[dict[str, Any]], metrics: list[RequestMetrics | None]
    ) -> dict[str, Any]:
        """The SLO verdict over the requests of every repeat (no SLOs: all must complete)."""
        opts = self.bench.opts
        duration = sum(float(s["duration_s"]) for s in summaries)
        if opts.slos:
            return evaluate(metrics, opts.slos, duration, opts.target_attainment, ())
        return evaluate(metrics, (), duration, 1.0, ())

    def boots_of(self, points: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
        return [self.boots[p["load"]] for p in sorted(points, key=lambda p: p["load"])]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0%}"


def _sweep_result(
    args: argparse.Namespace, axis: str, points: list[dict[str, Any]], runner: Points
) -> dict[str, Any]:
    target = args.target_attainment if args.slo else 1.0
    ordered = sorted(points, key=lambda p: p["load"])
    return {
        "schema": SWEEP_SCHEMA,
        "label": args.label,
        "load_axis": axis,
        "slo_spec": [s.label for s in parse_slos(args.slo)],
        "target_attainment": target,
        "num_repeats": args.repeats,
        "reuse_prompts": args.reuse_prompts,
        "points": points,
        "capacity": capacity_section(
            ordered, runner.boots_of(points), target, axis.startswith("rate")
        ),
    }


def _print_capacity(console: Console, sweep: dict[str, Any], directory: Path) -> None:
    cap = sweep["capacity"]
    ci = cap.get("ci95")
    has_value = cap["interpolated_rate"] is not None
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}] ({cap['ci95_method']})" if ci and has_value else ""
    line = (
        f"capacity at {sweep['target_attainment']:.0%} attainment: {cap['status']}, "
        f"interpolated {_num(cap['interpolated_rate'])}{interval}, highest passing "
        f"{cap['highest_passing']}, lowest failing {cap['lowest_failing']}"
    )
    achieved = cap.get("achieved")
    if achieved and achieved["interpolated_rate"] is not None:
        line += f"; on the achieved-rate axis {_num(achieved['interpolated_rate'])}"
    console.print(line)
    search = sweep.get("search")
    if search and not search["is_converged"]:
        console.print(f"[bold yellow]search {search['reason']}[/]")
    console.print(f"results in {directory}")


def _run_points(args: argparse.Namespace, axis: str, loads: list[float] | None) -> int:
    bench = Bench(args)
    directory = output_dir(args, "sweep" if loads else "search")
    runner = Points(bench, directory, "concurrency" if axis.startswith("concurrency") else "rate")
    search = None
    try:
        if loads is not None:
            points = [runner.run_at(x) for x in loads]
        else:
            if not args.slo:
                raise ValueError("search needs SLOs to meet; pass e.g. --slo ttft=500ms,tpot=50ms")
            search = search_max_rate(
                runner.run_at, args.start_rate, args.max_rate, args.tolerance, args.max_probes
            )
            points = search.points
    except BenchAborted as exc:
        return report_aborted(exc)
    sweep = _sweep_result(args, axis, points, runner)
    if search is not None:
        sweep["search"] = {"is_converged": search.is_converged, "reason": search.reason}
        if not search.is_converged:
            sweep["capacity"]["status"] = "not_converged"
    report.write_json(directory / "sweep.json", sweep)
    if args.plots:
        plots.plot_sweep(sweep, directory / "attainment_vs_load.png")
    _print_capacity(bench.console, sweep, directory)
    return bench.exit_code()


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.rates:
        return _run_points(args, "rate (req/s)", list(args.rates))
    return _run_points(args, "concurrency (users)", list(args.concurrencies))


def cmd_search(args: argparse.Namespace) -> int:
    return _run_points(args, "rate (req/s)", None)
