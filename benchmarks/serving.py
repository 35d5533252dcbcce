"""Serving benchmark: splitserve's OpenAI API against another server (vLLM), same load.

    # splitserve: starts `splitserve up` (router + one aggregated node) itself
    python -m splitserve.benchmarks.serving --system splitserve --model dummy:llama-3.1-8b \
        --node-arg=--dtype=bfloat16 --node-arg=--kv-cache-memory-gib=100 \
        --workloads 1024x256,4096x256 --rates 2,4,8,16,24,32 --num-requests 1000 \
        --out-dir benchmarks/results/serving_h200
    # any running OpenAI-compatible server, e.g. `vllm serve` (scripts/gpu_serving.sh)
    python -m splitserve.benchmarks.serving --system vllm --url http://127.0.0.1:8100 ...

For each workload (`<prompt>x<output>` tokens: random token-id prompts, ignore_eos) and rate,
one `splitserve bench run` with Poisson arrivals and its own seed, so every rate gets fresh
prompts (nothing for a prefix cache to find), and the same seed for every system, so both
serve the same prompts. Without `--url` the splitserve cluster is started with prefix
caching off (`--node-arg=--no-prefix-caching`) and `--trace-stream-timing`, so the bench's
server-metrics section shows where streaming time went (docs/performance.md).

A device call has a time limit: `--seconds-per-rate` sizes each rate's run by time rather
than count, and `--deadline-s` stops before a rate that would not finish in time
(estimated as requests / rate plus `--drain-s`); the rates left out are printed and can be
run by a later call with the same --out-dir, whose rows are merged in (the summary is
rewritten after every rate; benchmarks/serving_report.py writes summary.json, summary.md
and runs/).
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.benchmarks import serving_report
from splitserve.benchmarks.comparison import Targets
from splitserve.benchmarks.results_io import git_commit

logger = logging.getLogger(__name__)

_READY = re.compile(r"OpenAI API: (\S+)/v1")


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int

    @property
    def name(self) -> str:
        return f"{self.input_len}x{self.output_len}"


def parse_workloads(text: str) -> list[Workload]:
    out = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)", item.strip())
        if match is None or int(match[1]) < 1 or int(match[2]) < 2:
            raise argparse.ArgumentTypeError(
                f"bad workload {item!r}: write <prompt>x<output> tokens, e.g. 1024x256"
            )
        out.append(Workload(int(match[1]), int(match[2])))
    return out


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"rates must be numbers like 2,4,8, got {text!r}"
        ) from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", required=True, help="name in the results: splitserve, vllm, ...")
    p.add_argument("--url", help="load this running server (default: start `splitserve up`)")
    p.add_argument(
        "--warm-server", action="store_true",
        help="the --url server served load before this run: no row is its first after start",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="splitserve up --model (default: tiny model)")
    p.add_argument("--cpu", action="store_true", help="splitserve up --cpu")
    p.add_argument("--node-arg", action="append", default=[], help="extra flag for the node")
    p.add_argument("--router-arg", action="append", default=[], help="extra flag for the router")
    p.add_argument("--workloads", type=parse_workloads, default="1024x256,4096x256")
    p.add_argument("--rates", type=parse_rates, default="2,4,8,16,24,32")
    p.add_argument("--num-requests", type=int, default=1000, help="measured requests per rate")
    p.add_argument(
        "--seconds-per-rate",
        type=float,
        default=None,
        help="instead of a fixed count: rate x this many requests (at least --num-requests)",
    )
    p.add_argument("--num-warmup", type=int, default=0, help="uncounted requests before each")
    p.add_argument("--seed", type=int, default=0, help="base of the per-rate seeds")
    p.add_argument("--slo-ttft-ms", type=float, default=Targets().slo_ttft_ms)
    p.add_argument("--slo-tpot-ms", type=float, default=Targets().slo_tpot_ms)
    p.add_argument("--deadline-s", type=float, default=None, help="wall-clock budget")
    p.add_argument("--drain-s", type=float, default=45.0, help="per-rate allowance past arrivals")
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--bench-arg", action="append", default=[], help="extra flag for bench run")
    p.add_argument("--out-dir", required=True)
    return p


def rate_seed(base: int, workload: Workload, rate: float) -> int:
    """One seed per (workload, rate), the same for every system and every call."""
    return (
        base * 1_000_003 + workload.input_len * 1_009 + workload.output_len * 7 + round(rate * 100)
    )


def num_requests(args: argparse.Namespace, rate: float) -> int:
    if args.seconds_per_rate is None:
        return int(args.num_requests)
    return max(int(args.num_requests), round(rate * args.seconds_per_rate))


def bench_command(
    args: argparse.Namespace, url: str, workload: Workload, rate: float, out: Path
) -> list[str]:
    return [
        sys.executable, "-m", "splitserve.launch.cli", "bench", "run", "--url", url,
        "--workload", "random", "--prompt-format", "token-ids",
        "--input-len", str(workload.input_len), "--output-len", str(workload.output_len),
        "--ignore-eos", "--arrival", "poisson", "--rate", f"{rate:g}",
        "--num-requests", str(num_requests(args, rate)), "--num-warmup", str(args.num_warmup),
        "--seed", str(rate_seed(args.seed, workload, rate)),
        "--label", f"{args.system}@{rate:g}", "--no-progress", "--no-plots",
        "--output-dir", str(out), *args.bench_arg,
    ]  # fmt: skip


def up_command(args: argparse.Namespace) -> list[str]:
    node_args = list(args.node_arg)
    if "--no-prefix-caching" not in node_args:
        node_args.append("--no-prefix-caching")
    router_args = list(args.router_arg)
    if "--trace-stream-timing" not in router_args:
        router_args.append("--trace-stream-timing")
    command = ["up", "--num-prefill", "0", "--num-decode", "1", "--port", "0"]
    if args.model:
        command += ["--model", args.model]
    if args.cpu:
        command.append("--cpu")
    command += [f"--node-arg={a}" for a in node_args]
    command += [f"--router-arg={a}" for a in router_args]
    return command


@contextmanager
def server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(url, how it was started) of the server under test, started here without --url."""
    if args.url:
        yield args.url.rstrip("/"), f"already running at {args.url}"
        return
    from splitserve.launch.processes import ManagedProcess

    command = up_command(args)
    proc = ManagedProcess.splitserve("up", *command, ready_pattern=_READY)
    started = time.monotonic()
    proc.start(timeout_s=args.ready_timeout_s)
    logger.info("splitserve up ready in %.0f s at %s", time.monotonic() - started, proc.address)
    try:
        yield proc.address, shlex.join(["splitserve", *command])
    finally:
        code = proc.stop(timeout_s=60)
        if code not in (0, None):
            logger.warning("splitserve up exited with %s; its last lines:\n%s", code, proc.lines)


def device_name(is_cpu: bool) -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this process), else the CPU."""
    if not is_cpu:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, check=True, timeout=30,
            )  # fmt: skip
            return out.stdout.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            logger.warning("nvidia-smi did not name a GPU; recording the CPU")
    from splitserve.benchmarks.results_io import device_name as cpu_name

    return cpu_name("cpu")


def run_rate(
    args: argparse.Namespace, url: str, workload: Workload, rate: float, extra: dict[str, Any]
) -> dict[str, Any]:
    """One bench run; its row, with its files kept under --out-dir/runs/."""
    out_dir = Path(args.out_dir)
    name = serving_report.run_name(args.system, workload.name, rate)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / name
        command = bench_command(args, url, workload, rate, run_dir)
        logger.info("%s %s at %g req/s: %s", args.system, workload.name, rate, shlex.join(command))
        subprocess.run(command, check=True)
        serving_report.keep_run(run_dir, out_dir, name)
        shown = ["splitserve", *command[command.index("bench") :]]
        shown[shown.index("--output-dir") + 1] = f"<out-dir>/runs/{name}"
        row_extra = {**extra, "command": shlex.join(shown)}
        return serving_report.make_row(args.system, workload.name, rate, run_dir, row_extra)


def fits(args: argparse.Namespace, started: float, rate: float) -> bool:
    if args.deadline_s is None:
        return True
    needed = (num_requests(args, rate) + args.num_warmup) / rate + args.drain_s
    return time.monotonic() - started + needed <= args.deadline_s


def run_all(args: argparse.Namespace, started: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows measured and the (workload, rate) points left out for time."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    provenance = {
        "commit": git_commit(),
        "device": device_name(args.cpu),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with server(args) as (url, server_command):
        for workload in args.workloads:
            for rate in args.rates:
                if not fits(args, started, rate):
                    skipped.append(f"{workload.name}@{rate:g}")
                    continue
                extra = {
                    **provenance,
                    "server": server_command,
                    "is_first_after_start": not rows and not args.warm_server,
                }
                rows.append(run_rate(args, url, workload, rate, extra))
                # After every rate: a call cut short keeps what it measured.
                serving_report.write_summary(
                    Path(args.out_dir), rows, args.slo_ttft_ms, args.slo_tpot_ms
                )
    return rows, skipped


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, parse in (("workloads", parse_workloads), ("rates", parse_rates)):
        if isinstance(getattr(args, name), str):
            setattr(args, name, parse(getattr(args, name)))
    if args.num_requests < 1 or args.num_warmup < 0:
        parser.error("--num-requests must be >= 1 and --num-warmup >= 0")
    started = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, skipped = run_all(args, started)
    serving_report.write_summary(out_dir, [], args.slo_ttft_ms, args.slo_tpot_ms)
    print((out_dir / serving_report.TABLE_FILE).read_text(), end="")
    if skipped:
        print(f"left out for --deadline-s {args.deadline_s:g}: {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
