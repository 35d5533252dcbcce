"""Offline engine throughput: N random-token prompts submitted at once, ignore_eos.

    python -m splitserve.benchmarks.engine_offline --model dummy:tiny \
        --num-prompts 64 --input-len 128 --output-len 32 [--out result.json] [--roofline]

Prints and (with --out) writes output tokens/s, total tokens/s, elapsed time, and the
engine's stats (steps, preemptions, prefix-cache hits). With --roofline it then measures the
device's copy and matmul ceilings (`benchmarks.kernels.measure_ceilings`, host-timed on the
CPU) and adds the workload's roofline time (`engine_steps.roofline_seconds`) and
fraction_of_roofline = roofline_s / elapsed_s.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args

if TYPE_CHECKING:
    from splitserve.engine.core import EngineCore


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--warmup-prompts", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the result JSON here")
    parser.add_argument(
        "--roofline", action="store_true", help="also measure the ceilings and the roofline time"
    )
    return parser.parse_args(argv)


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(num)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from splitserve.engine.llm import LLM
    from splitserve.engine.sampling_params import SamplingParams

    llm = LLM.from_config(engine_config_from_args(args))
    vocab = llm.engine.arch.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    if args.warmup_prompts:
        llm.generate(random_prompts(args.warmup_prompts, 16, vocab, seed=-1), params)
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    steps_before = llm.engine.stats().num_steps
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_in = sum(len(p) for p in prompts)
    stats = llm.engine.stats()
    result: dict[str, Any] = {
        **provenance(args.device),
        "model": args.model,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "elapsed_s": elapsed,
        "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_out + num_in) / elapsed,
        "requests_per_s": len(outputs) / elapsed,
        # Wall time per engine step over the timed run (batch 1: the per-token latency).
        "ms_per_step": elapsed * 1e3 / max(1, stats.num_steps - steps_before),
        "engine_stats": stats.as_dict(),
    }
    if args.roofline:
        result.update(roofline(llm.engine, args, elapsed, num_out))
    return result


def roofline(
    engine: EngineCore, args: argparse.Namespace, elapsed_s: float, num_out: int
) -> dict[str, Any]:
    """The device's ceilings, and the workload's roofline time against the measured one."""
    import torch

    from splitserve.benchmarks.engine_steps import roofline_seconds, weight_bytes
    from splitserve.benchmarks.kernels import Timer, measure_ceilings

    device = torch.device(args.device)
    smoke = device.type == "cpu"
    ceilings = measure_ceilings(device, Timer(smoke), smoke)
    wbytes = weight_bytes(engine.model)
    seconds = roofline_seconds(
        engine.arch,
        wbytes,
        engine.dtype.itemsize,
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.max_num_seqs,
        ceilings["copy_gbps"],
        ceilings["matmul_tflops"],
    )
    return {
        "ceilings": ceilings,
        "weight_bytes": wbytes,
        "roofline_s": seconds,
        "roofline_output_tokens_per_s": num_out / seconds,
        "fraction_of_roofline": seconds / elapsed_s,
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    result = run(args)
    print(
        f"{result['num_prompts']} prompts x ({result['input_len']} in, {result['output_len']} out) "
        f"in {result['elapsed_s']:.2f} s: {result['output_tokens_per_s']:.1f} output tok/s, "
        f"{result['total_tokens_per_s']:.1f} total tok/s, {result['ms_per_step']:.2f} ms/step"
    )
    if args.roofline:
        print(format_roofline_table(result))
    write_result(args.out, result)


def format_roofline_table(result: dict[str, Any]) -> str:
    """The run against the roofline built from the ceilings measured after it."""
    ceil = result["ceilings"]
    rows = [
        (
            "ceilings",
            f"copy {ceil['copy_gbps']:.0f} GB/s, matmul {ceil['matmul_tflops']:.1f} TFLOP/s",
        ),
        ("", "this run    roofline    fraction"),
        (
            "seconds",
            f"{result['elapsed_s']:>8.4g}  {result['roofline_s']:>10.4g}"
            f"  {result['fraction_of_roofline']:>9.1%}",
        ),
        (
            "output tok/s",
            f"{result['output_tokens_per_s']:>8.1f}"
            f"  {result['roofline_output_tokens_per_s']:>10.1f}",
        ),
    ]
    return "\n".join(f"{name:<14}{value}" for name, value in rows)


if __name__ == "__main__":
    main()
