"""A decoder layer's GEMMs against the number of rows (tokens) in the step.

    python -m splitserve.benchmarks.gemm_rows --model dummy:llama-3.1-8b --device cuda \
        --dtype bfloat16 --rows 48,1024,1072,1152 --out gemm_rows.json
    python -m splitserve.benchmarks.gemm_rows --model dummy:llama-3.1-8b --device cuda \
        --rows 48,8192 --operands normal,uniform --repeat 3 --out gemm_operands.json
    python -m splitserve.benchmarks.gemm_rows --model dummy:tiny --device cpu --smoke \
        --rows 8,16

For each row count M, one layer's four projections (q/k/v fused, output, gate/up fused,
down) of the model's shapes are timed on random inputs of `--dtype`: each alone, and the four in
a row (median of `Timer`, triton's do_bench on CUDA). The layer's TFLOP/s shows where the
GEMMs stop being bound by reading the weights, and the cost of a row count just past a
multiple of the GEMM's row tile (docs/performance.md: a prompt step's 1,024 prompt rows
plus its decode rows). Writes JSON with provenance (--out).

`--operands` names how the operands are drawn, one timing of each kind at each row count,
`--repeat` times over in turn (so that a difference that follows the data can be told from
one that follows the order): "randn", inputs and weights N(0, 1); "normal", the engine's
dummy weights (N(0, 0.02)) on inputs N(0, 1), a norm's output at scale 1; "uniform", vLLM's
and SGLang's dummy weights (U(-1e-3, 1e-3)) on inputs N(0, 1) times a norm scale drawn from
the same U(-1e-3, 1e-3) per feature (engine/model/dummy.py, `--dummy-weights`).

`--blas` names the library torch's GEMMs go to (`torch.backends.cuda.preferred_blas_library`),
one timing with each at every row count and operand kind, in turn: "default" (torch's own
choice, cuBLAS), "cublas", "cublaslt" (CUDA only), so that a row count where one library's
choice of kernel is slow (just past a row tile) can be told from what the shape costs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import statistics
import sys
from collections.abc import Iterator
from typing import Any

import torch

from splitserve.benchmarks.arg_types import positive_ints
from splitserve.benchmarks.kernels import Timer
from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.dummy import INIT_STD, UNIFORM_BOUND
from splitserve.engine.model.dummy_presets import dummy_arch

logger = logging.getLogger(__name__)
OPERANDS = ("randn", "normal", "uniform")
BLAS = ("default", "cublas", "cublaslt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b", help="a dummy:NAME preset")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--rows",
        type=positive_ints,
        default=[48, 64, 96, 512, 576, 1024, 1072, 1152, 2048],
        help="the GEMMs' row counts (M), comma-separated",
    )
    parser.add_argument(
        "--operands", default="randn", help=f"how operands are drawn, one or more of {OPERANDS}"
    )
    parser.add_argument(
        "--blas",
        default="default",
        help=f"the GEMM library torch takes, one or more of {BLAS}, each timed in turn",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="times each row count runs every --operands kind"
    )
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


def draw_operands(
    kind: str, rows: int, features: tuple[int, int], device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input [rows, in], weight [out, in]) drawn as `kind` says (the module's docstring)."""
    in_f, out_f = features
    x = torch.randn(rows, in_f, device=device, dtype=dtype)
    w = torch.empty(out_f, in_f, device=device, dtype=dtype)
    if kind == "randn":
        w.normal_()
    elif kind == "normal":
        w.normal_(0.0, INIT_STD)
    else:
        w.uniform_(-UNIFORM_BOUND, UNIFORM_BOUND)
        scale = torch.empty(in_f, device=device, dtype=dtype).uniform_(
            -UNIFORM_BOUND, UNIFORM_BOUND
        )
        x.mul_(scale)
    return x, w


@contextlib.contextmanager
def blas_library(blas: str) -> Iterator[None]:
    """torch's GEMMs go to `blas` inside, to what they went to before after."""
    if blas == "default":
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(blas)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def time_rows(
    shapes: dict[str, tuple[int, int]],
    rows: int,
    device: str,
    dtype: torch.dtype,
    timer: Timer,
    kind: str,
    blas: str = "default",
) -> dict[str, Any]:
    drawn = {n: draw_operands(kind, rows, shape, device, dtype) for n, shape in shapes.items()}
    inputs = {n: x for n, (x, _) in drawn.items()}
    weights = {n: w for n, (_, w) in drawn.items()}

    def layer() -> None:
        for name in shapes:
            torch.nn.functional.linear(inputs[name], weights[name])

    with blas_library(blas):
        per_gemm = {
            name: timer(functools.partial(torch.nn.functional.linear, inputs[name], weights[name]))
            for name in shapes
        }
        layer_ms = timer(layer)
    flops = 2 * rows * sum(i * o for i, o in shapes.values())
    return {
        "rows": rows,
        "operands": kind,
        "blas": blas,
        "layer_us": round(layer_ms * 1e3, 1),
        "layer_tflop_s": round(flops / (layer_ms * 1e-3) / 1e12, 1),
        "per_gemm_us": {name: round(ms * 1e3, 1) for name, ms in per_gemm.items()},
    }


def run(
    args: argparse.Namespace, rows: list[int], kinds: list[str], libraries: list[str]
) -> dict[str, Any]:
    arch = dummy_arch(args.model)
    dtype = getattr(torch, args.dtype)
    shapes = layer_shapes(arch)
    timer = Timer(args.smoke)
    table = [
        time_rows(shapes, m, args.device, dtype, timer, kind, blas)
        for m in rows
        for _ in range(args.repeat)
        for kind in kinds
        for blas in libraries
    ]
    return {
        **provenance(args.device),
        "model": args.model,
        "dtype": args.dtype,
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "rows": table,
        "layer_us_median": medians(table),
    }


def medians(table: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{rows: {operands (", blas" unless default): median layer_us over the repeats}}."""
    times: dict[str, dict[str, list[float]]] = {}
    for row in table:
        key = row["operands"] if row["blas"] == "default" else f"{row['operands']}, {row['blas']}"
        times.setdefault(str(row["rows"]), {}).setdefault(key, []).append(row["layer_us"])
    return {
        rows: {kind: round(statistics.median(us), 1) for kind, us in kinds.items()}
        for rows, kinds in times.items()
    }


def _listed(flag: str, text: str, allowed: tuple[str, ...]) -> list[str] | None:
    """`text`'s comma-separated names, or None (and the error printed) for one not allowed."""
    names = text.split(",")
    if set(names) <= set(allowed):
        return names
    print(f"{flag} takes one or more of {allowed}, got {text!r}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    rows: list[int] = args.rows
    kinds = _listed("--operands", args.operands, OPERANDS)
    libraries = _listed("--blas", args.blas, BLAS)
    if kinds is None or libraries is None:
        return 2
    if args.repeat < 1:
        print(f"--repeat must be at least 1, got {args.repeat}", file=sys.stderr)
        return 2
    if args.device != "cuda" and libraries != ["default"]:
        print(f"--blas {args.blas} picks CUDA's GEMM libraries: add --device cuda", file=sys.stderr)
        return 2
    try:
        result = run(args, rows, kinds, libraries)
    except ValueError as exc:  # an unknown preset
        print(f"{exc}", file=sys.stderr)
        return 2
    for row in result["rows"]:
        logger.info(
            "%6d rows  %-7s  %-8s  layer %8.1f us  %6.1f TFLOP/s  %s",
            row["rows"],
            row["operands"],
            row["blas"],
            row["layer_us"],
            row["layer_tflop_s"],
            row["per_gemm_us"],
        )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
