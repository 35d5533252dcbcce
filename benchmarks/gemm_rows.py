"""A decoder layer's GEMMs against the number of rows (tokens) in the step.

    python -m splitserve.benchmarks.gemm_rows --model dummy:llama-3.1-8b --device cuda \
        --dtype bfloat16 --rows 48,1024,1072,1152 --out gemm_rows.json
    python -m splitserve.benchmarks.gemm_rows --model dummy:tiny --device cpu --smoke \
        --rows 8,16

For each row count M, one layer's four projections (q/k/v fused, output, gate/up fused,
down) of the model's shapes are timed on random inputs of `--dtype`: each alone, and the four in
a row (median of `Timer`, triton's do_bench on CUDA). The layer's TFLOP/s shows where the
GEMMs stop being bound by reading the weights, and the cost of a row count just past a
multiple of the GEMM's row tile (docs/performance.md: a prompt step's 1,024 prompt rows
plus its decode rows). Writes JSON with provenance (--out).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Any

import torch

from splitserve.benchmarks.kernels import Timer
from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.dummy_presets import dummy_arch

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b", help="a dummy:NAME preset")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rows", default="48,64,96,512,576,1024,1072,1152,2048", help="M,...")
    parser.add_argument("--smoke", action="store_true", help="host-timed, for the CPU")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    return parser


def layer_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of one decoder layer's projections, fused as the engine runs them."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) * head_dim
    return {
        "qkv": (hidden, qkv),
        "o": (arch.num_heads * head_dim, hidden),
        "gate_up": (hidden, 2 * arch.intermediate_size),
        "down": (arch.intermediate_size, hidden),
    }


def time_rows(
    shapes: dict[str, tuple[int, int]], rows: int, device: str, dtype: torch.dtype, timer: Timer
) -> dict[str, Any]:
    weights = {n: torch.randn(o, i, device=device, dtype=dtype) for n, (i, o) in shapes.items()}
    inputs = {n: torch.randn(rows, i, device=device, dtype=dtype) for n, (i, _) in shapes.items()}
    per_gemm = {
        name: timer(functools.partial(torch.nn.functional.linear, inputs[name], weights[name]))
        for name in shapes
    }

    def layer() -> None:
        for name in shapes:
            torch.nn.functional.linear(inputs[name], weights[name])

    layer_ms = timer(layer)
    flops = 2 * rows * sum(i * o for i, o in shapes.values())
    return {
        "rows": rows,
        "layer_us": round(layer_ms * 1e3, 1),
        "layer_tflop_s": round(flops / (layer_ms * 1e-3) / 1e12, 1),
        "per_gemm_us": {name: round(ms * 1e3, 1) for name, ms in per_gemm.items()},
    }


def run(args: argparse.Namespace, rows: list[int]) -> dict[str, Any]:
    arch = dummy_arch(args.model)
    dtype = getattr(torch, args.dtype)
    shapes = layer_shapes(arch)
    timer = Timer(args.smoke)
    table = [time_rows(shapes, m, args.device, dtype, timer) for m in rows]
    return {
        **provenance(args.device),
        "model": args.model,
        "dtype": args.dtype,
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "rows": table,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        rows = [int(m) for m in args.rows.split(",")]
    except ValueError:
        print(f"--rows takes comma-separated integers, got {args.rows!r}", file=sys.stderr)
        return 2
    if not rows or min(rows) < 1:
        print(f"--rows takes positive integers, got {args.rows!r}", file=sys.stderr)
        return 2
    try:
        result = run(args, rows)
    except ValueError as exc:  # an unknown preset
        print(f"{exc}", file=sys.stderr)
        return 2
    for row in result["rows"]:
        logger.info(
            "%6d rows  layer %8.1f us  %6.1f TFLOP/s  %s",
            row["rows"],
            row["layer_us"],
            row["layer_tflop_s"],
            row["per_gemm_us"],
        )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
