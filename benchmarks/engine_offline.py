"""Offline engine throughput: N random-token prompts submitted at once, ignore_eos.

    python -m splitserve.benchmarks.engine_offline --model dummy:tiny \
        --num-prompts 64 --input-len 128 --output-len 32 [--out result.json]

Prints and (with --out) writes output tokens/s, total tokens/s, elapsed time, and the
engine's stats (steps, preemptions, prefix-cache hits).
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from typing import Any

from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--warmup-prompts", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the result JSON here")
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
    return {
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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    result = run(args)
    print(
        f"{result['num_prompts']} prompts x ({result['input_len']} in, {result['output_len']} out) "
        f"in {result['elapsed_s']:.2f} s: {result['output_tokens_per_s']:.1f} output tok/s, "
        f"{result['total_tokens_per_s']:.1f} total tok/s, {result['ms_per_step']:.2f} ms/step"
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
