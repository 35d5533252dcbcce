"""The sampler's random draw at serving shapes: the torch draw against the fused one.

    python -m splitserve.benchmarks.sampler_draw --out sampler_draw.json
    python -m splitserve.benchmarks.sampler_draw --device cpu --smoke   # checks the script

Each case is one `Sampler.sample` call over `rows` float32 logits rows of `--vocab`
columns (Llama-3's 128,256 by default), every row at temperature 1 with no top-k, top-p or
min-p (what the serving benchmarks' requests ask for), without reading the tokens back:

- `torch`: a sampler without a fused draw (temperature, softmax, exponential noise,
  division, argmax: `Sampler._draw`);
- `fused`: the sampler the "triton" kernel backend builds (kernels/gumbel_sample.py).

Reported per case: the device time per call (`triton.testing.do_bench`, median, the L2
flushed before each call) and the wall time per call of 200 back-to-back calls (the host
building and queueing each call, or the device, whichever is slower). `--smoke` runs a
tiny vocabulary on the CPU under Triton's interpreter, timed by the host clock.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from splitserve.benchmarks.arg_types import positive_ints
from splitserve.benchmarks.results_io import provenance, write_result

logger = logging.getLogger(__name__)

LLAMA3_VOCAB = 128_256
ROWS = (1, 8, 16, 32, 48, 64, 96, 128, 192, 256)
_WALL_CALLS = 200


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab", type=int, default=LLAMA3_VOCAB)
    p.add_argument("--rows", type=positive_ints, default=list(ROWS), help="comma-separated")
    p.add_argument("--smoke", action="store_true", help="tiny vocabulary, host timing")
    p.add_argument("--out", help="write the JSON result here")
    return p.parse_args(argv)


def _device_ms(call: Callable[[], Any], device: torch.device, smoke: bool) -> float:
    if smoke or device.type != "cuda":
        started = time.perf_counter()
        call()
        return (time.perf_counter() - started) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(call, return_mode="median"))


def _wall_ms(call: Callable[[], Any], device: torch.device, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1e3 / calls


def bench_case(rows: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from splitserve.engine.sampler import Sampler, SamplingRow
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.kernels.gumbel_sample import gumbel_argmax

    logits = torch.randn(rows, args.vocab, device=device) * 4
    params = SamplingParams(temperature=1.0)
    sampling = [SamplingRow(params, None, [1], []) for _ in range(rows)]
    row: dict[str, Any] = {"rows": rows}
    for name, draw in (("torch", None), ("fused", gumbel_argmax)):
        sampler = Sampler(args.vocab, device, seed=0, draw=draw)

        def call(sampler: Sampler = sampler) -> torch.Tensor:
            return sampler.sample(logits, sampling).token_ids

        call()  # compiles the fused kernels on first use
        row[f"{name}_device_ms"] = _device_ms(call, device, args.smoke)
        row[f"{name}_wall_ms"] = _wall_ms(call, device, 2 if args.smoke else _WALL_CALLS)
    return row


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"vocab {result['vocab']}, temperature 1, float32 logits ({result['device']})",
        f"{'rows':>5} {'torch dev ms':>13} {'fused dev ms':>13} {'torch wall':>11} "
        f"{'fused wall':>11}",
    ]
    for r in result["cases"]:
        lines.append(
            f"{r['rows']:>5} {r['torch_device_ms']:>13.4f} {r['fused_device_ms']:>13.4f} "
            f"{r['torch_wall_ms']:>11.4f} {r['fused_wall_ms']:>11.4f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.smoke:
        args.vocab, args.rows = min(args.vocab, 300), [1, 3]
    cases = [bench_case(r, args, device) for r in args.rows]
    return {**provenance(args.device), "vocab": args.vocab, "smoke": args.smoke, "cases": cases}


def _argument_problem(args: argparse.Namespace) -> str | None:
    if args.vocab < 1:
        return f"--vocab must be at least 1, got {args.vocab}"
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    problem = _argument_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cpu":
        # The fused draw runs in Triton's interpreter on the CPU, chosen before triton is
        # first imported (the kernels are imported lazily).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    result = run(args)
    print(format_table(result))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
