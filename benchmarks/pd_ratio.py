"""P:D ratio experiment: which split of a host's GPUs into prefill and decode nodes serves a
workload best, against the same GPUs as aggregated replicas.

    python -m splitserve.benchmarks.pd_ratio --model dummy:llama-3.1-8b \
        --configs 1P3D,2P2D,3P1D,0P4D --out-dir benchmarks/results/pd_ratio_h200x4
    python -m splitserve.benchmarks.pd_ratio --cpu --configs 1P1D,0P2D --scale 0.125 \
        --rates-prompt-heavy 1,2,4 --rates-decode-heavy 1,2,4 --num-requests 40 \
        --out-dir benchmarks/results/pd_ratio_cpu_tiny

For each configuration (`xPyD`: x prefill and y decode nodes, one per GPU; `0PyD` is y
aggregated replicas, decode nodes that prefill locally) a local cluster is started
(Redis, router, nodes: `launch/local_cluster.py`), and for each workload a discarded
warm-up run, then `splitserve bench sweep`, sends Poisson arrivals at each rate to the
router's OpenAI API with the SLOs (default TTFT p90 <= 1 s and TPOT p90 <= 50 ms, on the
distribution). Every rate, every workload and the warm-up send prompts of their own, so
the prefix cache serves none of the measured ones (each point's `cached_fraction` shows it).
The goodput of a (configuration, workload) is the sweep's capacity: the highest rate whose
attainment reaches the target (0.9), interpolated between the last passing and the first
failing rate. Workloads (lengths times `--scale`, random tokens, ignore_eos):

    prompt-heavy   4,096 prompt tokens, 256 output tokens
    decode-heavy     512 prompt tokens, 1,024 output tokens

Writes under --out-dir: one sweep directory per (configuration, workload) (the bench
tool's JSON, JSONL and plots), and `summary.json` / `summary.md` with the goodput table,
the best configuration per workload, and the best disaggregated configuration's goodput
as a ratio of the aggregated one's.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.benchmarks.results_io import provenance
from splitserve.benchmarks.workload_factory import draw_seed

logger = logging.getLogger(__name__)

WORKLOADS = {"prompt-heavy": (4096, 256), "decode-heavy": (512, 1024)}
PD_RATIO_STREAM = 3  # draw_seed stream of the per-workload bench seeds


@dataclass(frozen=True)
class Config:
    num_prefill: int
    num_decode: int

    @property
    def name(self) -> str:
        return f"{self.num_prefill}P{self.num_decode}D"

    @property
    def is_aggregated(self) -> bool:
        return self.num_prefill == 0


def parse_configs(text: str) -> list[Config]:
    configs = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)P(\d+)D", item.strip(), flags=re.IGNORECASE)
        if match is None or int(match[2]) < 1:
            raise argparse.ArgumentTypeError(
                f"bad configuration {item!r}: write xPyD with y >= 1, e.g. 1P3D or 0P4D"
            )
        configs.append(Config(int(match[1]), int(match[2])))
    return configs


def parse_rates(text: str) -> str:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        message = f"rates must be numbers like 1,2,4, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return ",".join(f"{r:g}" for r in rates)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the built-in tiny model")
    parser.add_argument("--configs", type=parse_configs, default="1P3D,2P2D,3P1D,0P4D")
    parser.add_argument("--workloads", default="prompt-heavy,decode-heavy")
    parser.add_argument("--rates-prompt-heavy", type=parse_rates, default="0.5,1,2,4,8")
    parser.add_argument("--rates-decode-heavy", type=parse_rates, default="2,4,8,16,32")
    parser.add_argument("--num-requests", type=int, default=200, help="per rate")
    parser.add_argument(
        "--num-warmup", type=int, default=10, help="uncounted requests before each rate"
    )
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=100,
        help="a discarded run of this many requests per workload before its sweep",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies token lengths")
    parser.add_argument("--slo", default="ttft:p90=1s,tpot:p90=50ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run every node on the CPU")
    parser.add_argument("--node-arg", action="append", default=[], help="extra flag for every node")
    parser.add_argument(
        "--bench-arg", action="append", default=[], help="extra flag for every bench sweep"
    )
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument("--out-dir", required=True)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; pick from {', '.join(WORKLOADS)}")
    if args.num_requests < 1 or args.num_warmup < 0 or args.warmup_requests < 0:
        parser.error("--num-requests must be >= 1, --num-warmup and --warmup-requests >= 0")
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    if not args.cpu:
        import torch

        need = max(c.num_prefill + c.num_decode for c in args.configs)
        have = torch.cuda.device_count()
        if have < need:
            parser.error(f"the configurations need {need} GPUs, this host has {have}; add --cpu")


def workload_lengths(name: str, scale: float) -> tuple[int, int]:
    prompt, output = WORKLOADS[name]
    return max(1, round(prompt * scale)), max(2, round(output * scale))


def workload_seed(args: argparse.Namespace, workload: str, is_warmup: bool) -> int:
    """A --seed per (workload, warm-up or sweep): the workloads of one cluster and the
    warm-up run draw prompts no other run of the cluster sends (the sweep itself draws
    fresh prompts per rate), so the prefix cache serves none of the measured prompts."""
    index = 2 * list(WORKLOADS).index(workload) + int(is_warmup)
    return draw_seed(args.seed, PD_RATIO_STREAM, index)


def sweep_command(args: argparse.Namespace, url: str, workload: str, out_dir: Path) -> list[str]:
    rates = getattr(args, f"rates_{workload.replace('-', '_')}")
    return [
        *_bench(args, url, workload, "sweep", workload_seed(args, workload, False)),
        "--rates", rates,
        "--num-requests", str(args.num_requests), "--num-warmup", str(args.num_warmup),
        "--slo", args.slo, "--output-dir", str(out_dir), *args.bench_arg,
    ]  # fmt: skip


def warmup_command(args: argparse.Namespace, url: str, workload: str, out_dir: Path) -> list[str]:
    """A run at the workload's lowest rate whose results are thrown away: a fresh cluster
    serves its first requests of a shape slowly (on the CPU, for the first few dozen)."""
    rates = getattr(args, f"rates_{workload.replace('-', '_')}")
    return [
        *_bench(args, url, workload, "run", workload_seed(args, workload, True)),
        "--rate", rates.split(",")[0],
        "--num-requests", str(args.warmup_requests), "--no-plots",
        "--output-dir", str(out_dir),
    ]  # fmt: skip


def _bench(args: argparse.Namespace, url: str, workload: str, verb: str, seed: int) -> list[str]:
    prompt, output = workload_lengths(workload, args.scale)
    return [
        sys.executable, "-m", "splitserve.launch.cli", "bench", verb,
        "--url", url, "--workload", "random", "--input-len", str(prompt),
        "--output-len", str(output), "--ignore-eos", "--arrival", "poisson",
        "--seed", str(seed), "--no-progress",
    ]  # fmt: skip


def check_requests_served(config: Config, workload: str, sweep: dict[str, Any]) -> None:
    """A rate at which every request failed measures an error, not a capacity."""
    for point in sweep["points"]:
        summary = json.loads(Path(point["summary"]).read_text())
        counts = summary["counts"]
        if counts["num_requests"] and counts["num_failed"] == counts["num_requests"]:
            raise RuntimeError(
                f"{config.name} {workload} at rate {point['load']:g}: every request failed "
                f"({counts['errors']}); a prompt longer than the model's context fails with "
                "HTTP 400: lower --scale"
            )


POINT_KEYS = ("load", "attainment", "attainment_ci95", "meets", "achieved_rate", "cached_fraction")


def run_sweep(
    args: argparse.Namespace, config: Config, url: str, workload: str, sweep_dir: Path
) -> dict[str, Any]:
    """One bench sweep; exit code 1 (a rate's error rate above the bench tool's limit)
    still gives a sweep, whose failed requests count against the SLOs."""
    command = sweep_command(args, url, workload, sweep_dir)
    logger.info("%s %s: %s", config.name, workload, shlex.join(command))
    done = subprocess.run(command, check=False)
    if done.returncode not in (0, 1) or not (sweep_dir / "sweep.json").exists():
        raise RuntimeError(
            f"{config.name} {workload}: the bench sweep exited {done.returncode} without "
            f"results; its command: {shlex.join(command)}"
        )
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    check_requests_served(config, workload, sweep)
    return {
        "command": shlex.join(command),
        "exit_code": done.returncode,
        "sweep": str(sweep_dir / "sweep.json"),
        "goodput_rps": sweep["capacity"]["interpolated_rate"],
        "goodput_ci95": sweep["capacity"].get("ci95"),
        "goodput_achieved_rps": (sweep["capacity"].get("achieved") or {}).get("interpolated_rate"),
        "capacity": sweep["capacity"],
        "points": [{k: p.get(k) for k in POINT_KEYS} for p in sweep["points"]],
    }


def run_config(args: argparse.Namespace, config: Config, out_dir: Path) -> dict[str, Any]:
    """Start the cluster, sweep every workload against it, stop it."""
    from splitserve.launch.local_cluster import ClusterConfig, LocalCluster
    from splitserve.launch.up_cmd import (
        TINY_MODEL_NAME,
        gpu_devices,
        tiny_model_dir,
        wait_until_ready,
    )

    model = args.model or str(tiny_model_dir())
    num_nodes = config.num_prefill + config.num_decode
    cluster_config = ClusterConfig(
        model=model,
        served_model_name=TINY_MODEL_NAME if args.model is None else None,
        num_prefill=config.num_prefill,
        num_decode=config.num_decode,
        router_port=0,  # any free port
        cluster=f"pd-{config.name.lower()}",
        node_args=tuple(args.node_arg),
        devices=gpu_devices(args)[:num_nodes],
    )
    results: dict[str, Any] = {}
    logger.info("starting %s", config.name)
    with LocalCluster(cluster_config) as cluster:
        url = cluster.router_url
        wait_until_ready(url, config.num_prefill, config.num_decode, args.ready_timeout_s)
        for workload in args.workloads.split(","):
            if args.warmup_requests:
                with tempfile.TemporaryDirectory() as scratch:
                    warmup = warmup_command(args, url, workload, Path(scratch))
                    logger.info("%s %s warm-up: %s", config.name, workload, shlex.join(warmup))
                    subprocess.run(warmup, check=True, stdout=subprocess.DEVNULL)
            sweep_dir = out_dir / f"{config.name}_{workload}"
            results[workload] = run_sweep(args, config, url, workload, sweep_dir)
    return results


def summarize(configs: list[Config], results: dict[str, dict[str, Any]], workloads: list[str]):
    """Best configuration per workload, and the best disaggregated one against aggregated."""
    verdicts = {}
    for workload in workloads:

        def goodput(c: Config, w: str = workload) -> float:
            value = results[c.name][w]["goodput_rps"]
            return float(value) if value is not None else 0.0

        best = max(configs, key=goodput)
        ties = [c.name for c in configs if goodput(c) == goodput(best)]
        disagg = [c for c in configs if not c.is_aggregated]
        agg = [c for c in configs if c.is_aggregated]
        # Several names (joined by " = ") when configurations tie at the rates swept.
        verdict: dict[str, Any] = {"best": " = ".join(ties), "best_goodput_rps": goodput(best)}
        if disagg and agg:
            best_disagg = max(disagg, key=goodput)
            base = goodput(agg[0])
            verdict.update(
                best_disaggregated=best_disagg.name,
                aggregated=agg[0].name,
                disaggregated_over_aggregated=goodput(best_disagg) / base if base else None,
            )
        verdicts[workload] = verdict
    return verdicts


def markdown(configs: list[Config], results: dict, verdicts: dict, workloads: list[str]) -> str:
    lines = [
        "| configuration | " + " | ".join(f"{w} goodput (req/s) [95% CI]" for w in workloads) + " |"
    ]
    lines.append("| --- |" + " --- |" * len(workloads))
    for c in configs:
        cells = []
        for w in workloads:
            value, ci = results[c.name][w]["goodput_rps"], results[c.name][w].get("goodput_ci95")
            interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            cells.append("none passed" if value is None else f"{value:.2f}{interval}")
        lines.append(f"| {c.name} | " + " | ".join(cells) + " |")
    lines.append("")
    for w in workloads:
        v = verdicts[w]
        line = f"- {w}: best {v['best']} ({v['best_goodput_rps']:.2f} req/s)"
        if v.get("disaggregated_over_aggregated") is not None:
            line += (
                f"; best disaggregated {v['best_disaggregated']} = "
                f"{v['disaggregated_over_aggregated']:.2f} x {v['aggregated']}"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if isinstance(args.configs, str):
        args.configs = parse_configs(args.configs)
    check_args(parser, args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workloads = args.workloads.split(",")
    results = {c.name: run_config(args, c, out_dir) for c in args.configs}
    verdicts = summarize(args.configs, results, workloads)
    command = shlex.join(["python", "-m", "splitserve.benchmarks.pd_ratio", *sys.argv[1:]])
    summary = {
        "provenance": {**provenance("cpu" if args.cpu else "cuda"), "command": command},
        "model": args.model or "built-in tiny model",
        "slo": args.slo,
        "scale": args.scale,
        "workloads": {w: workload_lengths(w, args.scale) for w in workloads},
        "results": results,
        "verdicts": verdicts,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(args.configs, results, verdicts, workloads)
    (out_dir / "summary.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
