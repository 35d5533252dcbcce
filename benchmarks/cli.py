"""`splitserve bench`: SLO benchmarking against any OpenAI-compatible server.

    splitserve bench run     --url URL [workload] [load] [--slo ...]   one run
    splitserve bench sweep   --url URL (--rates 1,2,4 | --concurrencies 1,4,16) ...
    splitserve bench search  --url URL --slo ttft=500ms,tpot=50ms [--start-rate R] ...
    splitserve bench compare A.json B.json [...]                       side by side
    splitserve bench plot    RESULT                                   redraw the PNGs

Metric definitions: docs/benchmarking.md (and metrics.py / slo.py docstrings).
"""

from __future__ import annotations

import argparse
import sys

from splitserve.benchmarks.flags import (
    dataset_args,
    floats,
    load_args,
    output_args,
    points_args,
    target_args,
    workload_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    runs = argparse.ArgumentParser(add_help=False)
    for adder in (target_args, workload_args, dataset_args, load_args, output_args):
        adder(runs)
    sub.add_parser("run", parents=[runs], help="one benchmark run")
    sweep = sub.add_parser("sweep", parents=[runs], help="runs over rates or concurrencies")
    points_args(sweep)
    axis = sweep.add_mutually_exclusive_group(required=True)
    axis.add_argument("--rates", type=floats, help="open-loop rates, e.g. 1,2,4,8 (default: none)")
    axis.add_argument(
        "--concurrencies", type=floats, help="closed-loop users, e.g. 1,4,16 (default: none)"
    )
    search = sub.add_parser("search", parents=[runs], help="highest rate meeting the SLOs")
    points_args(search)
    search.add_argument("--start-rate", type=float, default=1.0, help="first rate (default: 1.0)")
    search.add_argument("--max-rate", type=float, help="highest rate to try (default: none)")
    search.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="stop when passing and failing rates are this close, relative (default: 0.1)",
    )
    search.add_argument(
        "--max-probes",
        type=int,
        default=8,
        help="most runs; stopping on it is reported as not converged (default: 8)",
    )
    compare = sub.add_parser("compare", help="compare result files side by side")
    compare.add_argument("results", nargs="+", help="summary.json / sweep.json / run dirs")
    compare.add_argument(
        "--output", default="compare.png", help="PNG to write (default: compare.png)"
    )
    plot = sub.add_parser("plot", help="redraw the plots of a result")
    plot.add_argument("result", help="run or sweep directory (or its summary/sweep JSON)")


def run(args: argparse.Namespace) -> int:
    from splitserve.benchmarks import commands, points

    handlers = {
        "run": commands.cmd_run,
        "sweep": points.cmd_sweep,
        "search": points.cmd_search,
        "compare": commands.cmd_compare,
        "plot": commands.cmd_plot,
    }
    return int(handlers[args.bench_command](args))


def main(argv: list[str] | None = None) -> int:
    """`python -m splitserve.benchmarks.cli ...` (same as `splitserve bench ...`)."""

    from splitserve.launch.cli import main as launch_main

    return launch_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
