"""Where a decode step's time goes: torch.profiler over decode steps of a fixed batch.

    python -m splitserve.benchmarks.profile_decode --model dummy:llama-3.1-8b --device cuda \
        [--batch 1] [--context 512] [--temperature 0] [--enforce-eager]

Prints the wall time per step unprofiled and profiled, and the top operators by self CPU
and by CUDA time (kernels replayed from a CUDA graph are listed too).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args


def start_decoding(core: Any, batch: int, context: int, params: Any) -> None:
    """Add `batch` requests of `context` prompt tokens, prefill them all, and run five
    warm-up decode steps (also what benchmarks/profile_mixed.py starts from)."""
    for i in range(batch):
        core.add_request(f"p{i}", [1 + (i * 7919 + t) % 1000 for t in range(context)], params)
    while core.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running
    ):
        core.step()  # prefill
    for _ in range(5):  # warm-up decode steps
        core.step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    args = parser.parse_args(argv)
    from splitserve.engine.core import EngineCore
    from splitserve.engine.sampling_params import SamplingParams

    core = EngineCore(engine_config_from_args(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=10_000, ignore_eos=True)
    start_decoding(core, args.batch, args.context, params)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        core.step()
    plain = time.perf_counter() - start
    print(f"{plain * 1e3 / args.steps:.2f} ms per decode step (batch {args.batch}, unprofiled)")
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            core.step()
    elapsed = time.perf_counter() - start
    print(f"{elapsed * 1e3 / args.steps:.2f} ms per decode step (batch {args.batch}, profiled)")
    print(f"graph steps: {core.stats().num_graph_steps} of {core.stats().num_steps}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if torch.cuda.is_available():
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
