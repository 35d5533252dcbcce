"""Few-row GEMMs: cuBLAS against the skinny kernel's launch configurations, per shape and rows.

    python -m splitserve.benchmarks.skinny_gemm_tune --model dummy:llama-3.1-8b \
        --rows 1,8,16,32,48,64,96,128 --workers 14 --out skinny_gemm_tune.json

For one decoder layer's four projections (the engine's fused shapes) and each row count M,
times torch's GEMM (cuBLAS, then cuBLASLt) and every configuration of
`kernels/skinny_gemm.py` that fits (column tile, K step, K splits, warps, stages). Each
timing is a CUDA graph of calls that cycle over enough copies of the weight to overflow
L2 four times, so every call reads its weight from memory as a decode step does. The
kernels are compiled first by `--workers` processes in parallel (Triton's on-disk cache),
then timed one at a time. Writes JSON with provenance: per shape and M the cuBLAS times,
the best configurations and their times, and the weight bytes per microsecond.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import logging
import multiprocessing
import sys
from typing import Any

import torch

from splitserve.benchmarks.gemm_rows import layer_shapes
from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.engine.model.dummy_presets import dummy_arch

logger = logging.getLogger(__name__)
L2_OVERFLOW_BYTES = 4 * 60 * 2**20
CALLS_PER_GRAPH = 12
TOP = 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b", help="a dummy:NAME preset")
    parser.add_argument("--rows", default="1,8,16,32,48,64,96,128", help="M,...")
    parser.add_argument("--workers", type=int, default=8, help="processes that compile")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    return parser


def candidate_configs() -> list[Any]:
    """Every compiled variant; K splits are chosen per shape (`_splits`)."""
    from splitserve.kernels.skinny_gemm import SkinnyConfig

    return [
        SkinnyConfig(block_n=bn, block_k=bk, splits=1, num_warps=w, num_stages=s)
        for bn, bk, w, s in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8), (3, 4, 5))
    ]


def _splits(config: Any, n: int, k: int, num_sms: int) -> list[Any]:
    """The config at each K split count that fits and gives between half a block and
    eight blocks per multiprocessor."""
    from dataclasses import replace

    tiles = -(-n // config.block_n)
    out = []
    for splits in (1, 2, 3, 4, 6, 8):
        candidate = replace(config, splits=splits)
        if candidate.fits(n, k) and num_sms // 2 <= tiles * splits <= 8 * num_sms:
            out.append(candidate)
    return out


def _tasks(shapes: dict[str, tuple[int, int]], rows: list[int], num_sms: int) -> list[tuple]:
    return [
        (name, k, n, m, cfg)
        for name, (k, n) in shapes.items()
        for m in rows
        for base in candidate_configs()
        for cfg in _splits(base, n, k, num_sms)
    ]


def _compile_share(tasks: list[tuple]) -> int:
    """Run each task's kernel once (compiling it into Triton's cache); failures skipped."""
    from splitserve.kernels.skinny_gemm import skinny_gemm

    done = 0
    tensors: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for _, k, n, m, cfg in tasks:
        key = (k, n, m)
        if key not in tensors:
            tensors[key] = (
                torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                torch.randn(n, k, device="cuda", dtype=torch.bfloat16),
            )
        x, w = tensors[key]
        try:
            skinny_gemm(x, w, cfg)
            done += 1
        except Exception as exc:  # out of shared memory: the config is skipped when timed
            logger.debug("compile of %s failed: %s", cfg, exc)
    torch.cuda.synchronize()
    return done


def compile_all(tasks: list[tuple], workers: int) -> None:
    """Compile every distinct (rows, config) variant in `workers` processes."""
    variants: dict[tuple, tuple] = {}
    for task in tasks:
        m, cfg = task[3], task[4]
        variants.setdefault((m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages), task)
    shares = [list(variants.values())[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        compiled = sum(pool.map(_compile_share, shares))
    logger.info("compiled %d of %d kernel variants", compiled, len(variants))


def time_us(call: Any, copies: list[tuple[torch.Tensor, ...]]) -> float:
    """Microseconds a call, from a CUDA graph of calls cycling over `copies`."""
    for args in copies:
        call(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            call(*copies[i % len(copies)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * CALLS_PER_GRAPH)


def _copies(m: int, k: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    count = max(2, -(-L2_OVERFLOW_BYTES // (n * k * 2)))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return [
        (
            x,
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16),
            torch.empty(m, n, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(count)
    ]


def _torch_us(copies: list[tuple], library: str) -> float:
    torch.backends.cuda.preferred_blas_library(library)
    try:
        return time_us(lambda x, w, o: torch.mm(x, w.t(), out=o), copies)
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")


def time_shape(k: int, n: int, m: int, configs: list[Any]) -> dict[str, Any]:
    """cuBLAS, cuBLASLt and each config at one shape and row count."""
    from splitserve.kernels.skinny_gemm import _Scratch, block_m, skinny_gemm

    copies = _copies(m, k, n)
    weight_mb = n * k * 2 / 1e6
    result: dict[str, Any] = {"rows": m, "k": k, "n": n, "weight_mb": round(weight_mb, 1)}
    result["cublas_us"] = round(_torch_us(copies, "cublas"), 2)
    result["cublaslt_us"] = round(_torch_us(copies, "cublaslt"), 2)
    timed = []
    for cfg in configs:
        scratch = _Scratch(torch.device("cuda"), n, block_m(m), cfg)
        try:
            us = time_us(
                lambda x, w, o, c=cfg, s=scratch: skinny_gemm(x, w, c, out=o, scratch=s), copies
            )
        except Exception as exc:  # a config the device cannot launch (shared memory)
            logger.debug("%s: %s", cfg, exc)
            continue
        timed.append((us, cfg))
    timed.sort(key=lambda t: t[0])
    result["top"] = [{"us": round(us, 2), "config": vars(cfg)} for us, cfg in timed[:TOP]]
    if timed:
        result["best_gb_s"] = round(weight_mb * 1e6 / (timed[0][0] * 1e-6) / 1e9, 0)
        result["best_vs_cublas"] = round(timed[0][0] / result["cublas_us"], 3)
    return result


def run(args: argparse.Namespace, rows: list[int]) -> dict[str, Any]:
    arch = dummy_arch(args.model)
    shapes = layer_shapes(arch)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    tasks = _tasks(shapes, rows, num_sms)
    compile_all(tasks, args.workers)
    table = []
    for name, (k, n) in shapes.items():
        for m in rows:
            configs = [t[4] for t in tasks if t[0] == name and t[3] == m]
            entry = {"name": name, **time_shape(k, n, m, configs)}
            best = entry["top"][0] if entry["top"] else None
            logger.info(
                "%-8s M=%-4d cublas %7.2f  lt %7.2f  best %s",
                name, m, entry["cublas_us"], entry["cublaslt_us"], best,
            )  # fmt: skip
            table.append(entry)
    return {**provenance("cuda"), "model": args.model, "num_sms": num_sms, "table": table}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        rows = [int(m) for m in args.rows.split(",")]
    except ValueError:
        print(f"--rows takes comma-separated integers, got {args.rows!r}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("skinny_gemm_tune times CUDA kernels: run it on a GPU machine", file=sys.stderr)
        return 2
    write_result(args.out, run(args, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
