"""Where a mixed step's time goes: decode rows plus one fresh prompt in the same step.

    python -m splitserve.benchmarks.profile_mixed --model dummy:llama-3.1-8b --device cuda \
        --dtype bfloat16 --kv-cache-memory-gib 40 [--batch 48] [--context 1150] \
        [--prompt 1024] [--repeats 8] [--piecewise-graph-max-tokens 0]

Prefills `--batch` requests of `--context` tokens and lets them decode (temperature 1,
no end), then `--repeats` times runs three decode steps and adds one fresh prompt of
`--prompt` tokens (max_tokens 2), whose step then carries it beside the decode rows. Each
step is timed on the wall from a synchronised stream to a synchronised stream (the launch
of the next step ahead of reading this one is inside that window). Then one more mixed
step runs under torch.profiler: its device span, the sum of its kernels' times, the idle
gaps between kernels over 20 µs, and the operators by device and by host time.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from splitserve.benchmarks.device_timeline import device_kernels
from splitserve.benchmarks.profile_decode import start_decoding
from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args

logger = logging.getLogger(__name__)
GAP_US = 20.0


def _timed_step(core: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    core.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _add_prompt(core: Any, index: int, length: int) -> None:
    from splitserve.engine.sampling_params import SamplingParams

    vocab = core.arch.vocab_size
    prompt = [1 + (index * 104729 + t * 31) % (vocab - 1) for t in range(length)]
    params = SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True)
    core.add_request(f"m{index}", prompt, params)


def _log_device_span(prof: Any) -> None:
    kernels = sorted(device_kernels(prof), key=lambda e: e.time_range.start)
    if not kernels:
        return
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    busy = sum(e.time_range.end - e.time_range.start for e in kernels)
    gaps = sorted(
        (
            (b.time_range.start - a.time_range.end, a.name[:40], b.name[:40])
            for a, b in itertools.pairwise(kernels)
            if b.time_range.start - a.time_range.end > GAP_US
        ),
        reverse=True,
    )
    logger.info(
        "profiled mixed step: device span %.2f ms, kernel sum %.2f ms, %d kernels; "
        "%d gaps over %.0f us, %.2f ms in all; largest: %s",
        span / 1e3, busy / 1e3, len(kernels), len(gaps), GAP_US,
        sum(g[0] for g in gaps) / 1e3, [(round(g[0]), g[1], g[2]) for g in gaps[:8]],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument("--batch", type=int, default=48, help="decoding requests")
    parser.add_argument("--context", type=int, default=1150, help="their prompt length")
    parser.add_argument("--prompt", type=int, default=1024, help="the fresh prompt's length")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (mixed-step timing reads the device)")
    from splitserve.engine.core import EngineCore
    from splitserve.engine.sampling_params import SamplingParams

    core = EngineCore(engine_config_from_args(args))
    decoding = SamplingParams(temperature=1.0, max_tokens=1_000_000, ignore_eos=True)
    start_decoding(core, args.batch, args.context, decoding)
    mixed: list[float] = []
    decode: list[float] = []
    for index in range(args.repeats):
        decode.extend(_timed_step(core) for _ in range(3))
        _add_prompt(core, index, args.prompt)
        mixed.append(_timed_step(core))
    logger.info(
        "mixed step wall ms: median %.2f, all %s; decode step wall ms: median %.2f",
        statistics.median(mixed), [round(m, 2) for m in mixed], statistics.median(decode),
    )  # fmt: skip
    for _ in range(3):
        core.step()
    _add_prompt(core, args.repeats, args.prompt)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        core.step()
        torch.cuda.synchronize()
    _log_device_span(prof)
    averages = prof.key_averages()
    logger.info("by device:\n%s", averages.table(sort_by="self_device_time_total", row_limit=28))
    logger.info("by self CPU:\n%s", averages.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
