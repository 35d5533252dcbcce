"""Where a decode step's time goes: torch.profiler over batch-1 decode steps.

    python -m splitserve.benchmarks.profile_decode --model dummy:llama-3.1-8b --device cuda

Prints the wall time per step and the top operators by self CPU and by CUDA time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args(argv)
    from splitserve.engine.core import EngineCore
    from splitserve.engine.sampling_params import SamplingParams

    core = EngineCore(engine_config_from_args(args))
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    core.add_request("p", list(range(1, args.context + 1)), params)
    for _ in range(5):  # prefill and warm-up decode steps
        core.step()
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            core.step()
    elapsed = time.perf_counter() - start
    print(f"{elapsed * 1e3 / args.steps:.2f} ms per decode step (batch 1, profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if torch.cuda.is_available():
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
