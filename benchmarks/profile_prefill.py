"""Where a short prefill step's time goes: host launch time against device time.

    python -m splitserve.benchmarks.profile_prefill --model dummy:llama-3.1-8b --device cuda \
        --dtype bfloat16 [--lengths 128,1024] [--repeats 10]

For each length, each repeat adds one fresh prompt of that many tokens (max_tokens 1) and
runs its step. Prints, per step (medians): the wall time; the host time of the model
runner's `execute` (which launches the forward pass and returns before the device
finishes); then one step under torch.profiler, with the top operators by self CPU time
and by device time, and (`--python-profile`) one under cProfile, by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args

logger = logging.getLogger(__name__)


def _timed_execute(core: Any, host_ms: list[float]) -> None:
    """Wrap the runner's `execute` to record its host time (no device sync)."""
    execute = core.runner.execute

    def timed(chunks: Any, pending: Any = None) -> torch.Tensor:
        start = time.perf_counter()
        logits = execute(chunks, pending)
        host_ms.append((time.perf_counter() - start) * 1000)
        return logits

    core.runner.execute = timed


def _one_prefill(core: Any, params: Any, length: int, index: int) -> float:
    """Add a fresh prompt and step until it finishes; returns the wall ms."""
    vocab = core.arch.vocab_size
    prompt = [1 + (index * 7919 + t * 31) % (vocab - 1) for t in range(length)]
    core.add_request(f"p{index}", prompt, params)
    if core.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    while core.has_unfinished():
        core.step()
    if core.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--lengths", default="128,1024", help="prompt lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--python-profile", action="store_true", help="also cProfile one step")
    args = parser.parse_args(argv)
    from splitserve.engine.core import EngineCore
    from splitserve.engine.sampling_params import SamplingParams

    core = EngineCore(engine_config_from_args(args))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    _one_prefill(core, params, 16, 0)  # warm-up
    host_ms: list[float] = []
    _timed_execute(core, host_ms)
    for length in (int(n) for n in args.lengths.split(",")):
        host_ms.clear()
        wall = [_one_prefill(core, params, length, i + 1) for i in range(args.repeats)]
        logger.info(
            "prefill of %d tokens: wall %.2f ms a step, runner.execute host %.2f ms (medians)",
            length,
            statistics.median(wall),
            statistics.median(host_ms),
        )
        _profile_one(core, params, length)
        if args.python_profile:
            _python_profile_one(core, params, length)


def _python_profile_one(core: Any, params: Any, length: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    _one_prefill(core, params, length, 20_000 + length)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    logger.info("cProfile, by own time:\n%s", text.getvalue())


def _profile_one(core: Any, params: Any, length: int) -> None:
    activities = [ProfilerActivity.CPU]
    if core.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        _one_prefill(core, params, length, 10_000 + length)
    averages = prof.key_averages()
    logger.info("by self CPU:\n%s", averages.table(sort_by="self_cpu_time_total", row_limit=25))
    if core.device.type == "cuda":
        logger.info(
            "by device:\n%s", averages.table(sort_by="self_device_time_total", row_limit=15)
        )


if __name__ == "__main__":
    main()
