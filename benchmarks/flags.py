"""The flags of `splitserve bench run/sweep/search`, by group; each says what it does and
its default (`--help`). `cli.py` assembles them into the subcommands."""

from __future__ import annotations

import argparse
import math
import os

from splitserve.benchmarks.arrivals import ARRIVAL_KINDS
from splitserve.benchmarks.runner import DEFAULT_ABORT_AFTER_FAILURES
from splitserve.benchmarks.workloads import LENGTH_DISTS, PROMPT_FORMATS

WORKLOADS = ("random", "shared-prefix", "multi-turn", "sharegpt", "mooncake")


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from exc


def _rate(text: str) -> float:
    return math.inf if text.lower() == "inf" else float(text)


def target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument(
        "--url", required=True, help="server root, e.g. http://127.0.0.1:8000 (default: required)"
    )
    g.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="/v1/completions or /v1/chat/completions (default: completions)",
    )
    g.add_argument("--model", help="model name sent (default: the first of GET /v1/models)")
    g.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SSE streaming; without it only E2E latency is measured (default: on)",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token, never written to results (default: $OPENAI_API_KEY)",
    )
    g.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="K=V",
        help="extra HTTP header, repeatable; values are not written to results (default: none)",
    )
    g.add_argument(
        "--extra-body", default="{}", help="JSON object merged into every request (default: {})"
    )
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for exactly the output length (default: on)",
    )
    g.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    g.add_argument(
        "--max-tokens-field",
        choices=("max_tokens", "max_completion_tokens"),
        default="max_tokens",
        help="body field of the output length (default: max_tokens)",
    )
    g.add_argument(
        "--request-timeout-s",
        type=float,
        default=600.0,
        help="per request; a timeout is a failure (default: 600)",
    )
    g.add_argument(
        "--tokenizer",
        help="local Hugging Face tokenizer directory (default: the server's /tokenize)",
    )


def workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument(
        "--workload", choices=WORKLOADS, default="random", help="what is sent (default: random)"
    )
    g.add_argument(
        "--num-requests",
        type=int,
        help="sessions per run (default: 100; files: all; with --duration-s: rate x duration)",
    )
    g.add_argument(
        "--input-len", type=int, default=256, help="prompt tokens per turn (default: 256)"
    )
    g.add_argument(
        "--output-len", type=int, default=64, help="output tokens per turn (default: 64)"
    )
    g.add_argument(
        "--length-dist",
        choices=LENGTH_DISTS,
        default="fixed",
        help="distribution of the lengths around their means (default: fixed)",
    )
    g.add_argument(
        "--length-spread",
        type=float,
        default=0.0,
        help="uniform: +-fraction of the mean; normal: std as a fraction of it (default: 0)",
    )
    g.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default="text",
        help="token-exact text, or token ids as the completions prompt (default: text)",
    )
    g.add_argument(
        "--num-prefixes", type=int, default=4, help="shared-prefix: system prompts (default: 4)"
    )
    g.add_argument(
        "--prefix-len", type=int, default=512, help="shared-prefix: tokens each (default: 512)"
    )
    g.add_argument("--num-turns", type=int, default=3, help="multi-turn: user turns (default: 3)")
    g.add_argument(
        "--think-time-s",
        type=float,
        default=1.0,
        help="multi-turn: pause after an answer before the next turn (default: 1.0)",
    )
    g.add_argument(
        "--reuse-prompts",
        action="store_true",
        help="send the same prompts at every point and in the warm-up; a prefix-caching server "
        "then serves them from cache (default: off, fresh prompts per run)",
    )


def dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("file workloads")
    g.add_argument("--dataset", help="ShareGPT JSON or Mooncake JSONL file (default: none)")
    g.add_argument(
        "--sharegpt-turns",
        choices=("first", "all"),
        default="first",
        help="first human turn only, or every turn as a conversation (default: first)",
    )
    g.add_argument(
        "--sharegpt-output-len",
        type=int,
        help="fixed output length (default: each first answer's length)",
    )
    g.add_argument(
        "--block-size", type=int, default=512, help="mooncake: tokens per hash id (default: 512)"
    )
    g.add_argument(
        "--trace-timestamp-unit",
        choices=("ms", "s"),
        default="ms",
        help="unit of the trace's timestamps (default: ms)",
    )


def load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument(
        "--arrival",
        choices=ARRIVAL_KINDS,
        help="arrival process (default: trace for mooncake, closed with only --max-concurrency, "
        "else poisson)",
    )
    g.add_argument(
        "--rate", type=_rate, default=math.inf, help="sessions per second; inf: all at once "
        "(default: inf)",
    )  # fmt: skip
    g.add_argument(
        "--cv", type=float, default=1.0, help="gamma: coefficient of variation (default: 1.0)"
    )
    g.add_argument(
        "--max-concurrency",
        type=int,
        help="cap on requests in flight; closed loop: the users (default: none)",
    )
    g.add_argument(
        "--ramp-up-s", type=float, default=0.0, help="seconds to reach --rate (default: 0)"
    )
    g.add_argument(
        "--ramp-start-rate", type=float, default=0.0, help="rate at t = 0 of a ramp (default: 0)"
    )
    g.add_argument(
        "--time-scale", type=float, default=1.0, help="trace: multiplies timestamps (default: 1.0)"
    )
    g.add_argument(
        "--duration-s",
        type=float,
        help="start no session after this many seconds (default: none, all sessions)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds prompts, arrivals and bootstrap; each run draws its own (default: 0)",
    )
    g.add_argument(
        "--num-warmup",
        type=int,
        default=0,
        help="unrecorded requests with their own prompts before each run (default: 0)",
    )
    g.add_argument(
        "--max-lag-ms", type=float, default=50.0, help="warn above this p99 send lag (default: 50)"
    )


def output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics and output")
    g.add_argument(
        "--slo", help="objectives, e.g. ttft=500ms,tpot=50ms,e2e:p99=10s (default: none)"
    )
    g.add_argument(
        "--target-attainment",
        type=float,
        default=0.9,
        help="fraction of requests that must meet the SLOs (default: 0.9)",
    )
    g.add_argument(
        "--percentiles",
        type=floats,
        default=(50.0, 90.0, 95.0, 99.0),
        help="reported percentiles (default: 50,90,95,99)",
    )
    g.add_argument(
        "--slo-scales",
        type=floats,
        default=(0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6),
        help="SLO scales of the attainment curve (default: 0.4,0.6,...,1.6)",
    )
    g.add_argument(
        "--max-error-rate",
        type=float,
        default=0.05,
        help="exit 1 when a run's failed fraction exceeds this (default: 0.05)",
    )
    g.add_argument(
        "--abort-after-failures",
        type=int,
        default=DEFAULT_ABORT_AFTER_FAILURES,
        help="stop and exit 1 when this many first requests all fail; 0: never "
        f"(default: {DEFAULT_ABORT_AFTER_FAILURES})",
    )
    g.add_argument("--output-dir", help="where results go (default: bench-results/<label>-<time>)")
    g.add_argument("--label", default="", help="name in tables and plots (default: none)")
    g.add_argument(
        "--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNGs "
        "(default: on)",
    )  # fmt: skip
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar (default: on)",
    )
    g.add_argument(
        "--server-metrics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scrape the server's /metrics before and after (default: on)",
    )
    g.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=("debug", "info", "warning", "error"),
        help="logging level (default: info)",
    )


def points_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per load, each with fresh prompts; >= 2 gives capacity a t-interval over "
        "them (default: 1, a bootstrap interval over requests)",
    )
