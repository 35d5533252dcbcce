"""Decode steps and the step that carries a fresh prompt beside them, for splitserve or
for vLLM, with the same procedure in one process each.

    python -m splitserve.benchmarks.step_windows --engine splitserve \
        --model dummy:llama-3.1-8b --device cuda --dtype bfloat16 --kv-cache-memory-gib 40 \
        --max-num-batched-tokens 8192 --no-prefix-caching --profile --out ours.json
    python -m splitserve.benchmarks.step_windows --engine vllm --model DIR --profile \
        --out vllm.json          # DIR: a config and tokenizer (make_llama_dir.py), dummy weights

The procedure (both engines): `--batch` requests of `--context` random token ids decode at
temperature 1 with no end; after 40 warm-up steps, 40 more are timed one by one (wall time
of each `step()` call; the decode step is their median). Then `--windows` times: `--prompts`
fresh prompts (1) of `--prompt` random ids (max_tokens 2) are added at once and the next
four steps are timed together from a synchronised device to a synchronised device (the
window: the step that carries the prompt and three decode steps; the prompt's own second
token rides in the first of them; prompts past the step's token budget are chunked into the
next steps, so `--prompts 3 --prompt 4096` makes a step of two fresh prompts and one of a
chunk over cached context beside a fresh prompt), then three steps settle.
`mixed_step_ms_est` is the median window less three decode steps. With `--profile`,
torch.profiler records the device kernels of eight decode steps and of four more windows:
per-kernel device time per step (per window), top 40, and their sum; then four more windows
with host ops and Python stacks as well (`windows_timeline`, benchmarks/device_timeline.py):
the device's idle time in them, the host op and phase each gap began in, and the largest
gaps with the code around them. With `--launch-lag` (splitserve, CUDA), eight more windows
run with launch probes (engine/launch_probes.py, no profiler), every other one with the
device held back 60 ms so that the host queues the prompt's whole forward pass before the
device starts it: the device's time per piece and attention call as it came less its time
held back is where, and how long, it waited for the host. With `--clocks` (CUDA, nvidia-smi
on PATH), 300 more decode steps and then 16 more windows run while `nvidia-smi` samples the
device every 20 ms (benchmarks/device_clocks.py): each phase's step or window time beside
the SM and memory clocks, power, temperature and clock event reasons it ran at, so that a
kernel slower in one engine than in the other can be told from a device running slower.

splitserve runs `EngineCore.step` (steps launched ahead, as served); vLLM `LLMEngine.step`
in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, its default async scheduling), FlashAttention
backend, prefix caching off, 8,192 batched tokens, as `../shared/vllm`'s runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from splitserve.benchmarks.device_timeline import device_kernels, timeline_summary
from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.engine.launch_probes import ForwardLag, LaunchProbes, host_waits

logger = logging.getLogger(__name__)
WARMUP_STEPS = 40
TIMED_STEPS = 40
WINDOW_STEPS = 4
PROFILED_DECODE_STEPS = 8
PROFILED_WINDOWS = 4
LAG_WINDOWS = 8
# How long --launch-lag holds the device back: longer than the host takes to launch a step.
HOLD_MS = 60.0
CLOCK_DECODE_STEPS = 300
CLOCK_WINDOWS = 16
TOP_KERNELS = 40


class Engine:
    """What the procedure needs of an engine: add a request, step, synchronise."""

    def __init__(
        self,
        add: Callable[[str, list[int], int], None],
        step: Callable[[], Any],
        core: Any = None,
    ) -> None:
        self.add = add
        self.step = step
        # splitserve's EngineCore (for --launch-lag), None for vLLM.
        self.core = core

    def sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def splitserve_engine(args: argparse.Namespace) -> Engine:
    from splitserve.engine.core import EngineCore
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.launch.engine_args import engine_config_from_args

    core = EngineCore(engine_config_from_args(args))

    def add(request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
        core.add_request(request_id, prompt, params)

    return Engine(add, core.step, core)


def vllm_engine(args: argparse.Namespace) -> Engine:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model, load_format="dummy", dtype=args.dtype, seed=0,
        enable_prefix_caching=False, max_num_seqs=256, max_num_batched_tokens=8192,
        attention_config={"backend": "FLASH_ATTN"}, max_model_len=8192,
    )  # fmt: skip
    engine = llm.llm_engine

    def add(request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)

    return Engine(add, engine.step)


class _Prompts:
    def __init__(self, id_limit: int, per_window: int = 1) -> None:
        self._rng = random.Random(0)
        self._id_limit = id_limit
        self._count = 0
        self._per_window = per_window

    def add(self, engine: Engine, length: int, max_tokens: int) -> None:
        self._count += 1
        ids = [self._rng.randrange(self._id_limit) for _ in range(length)]
        engine.add(f"w{self._count}", ids, max_tokens)

    def join(self, engine: Engine, length: int) -> None:
        """A window's fresh prompts, two tokens each."""
        for _ in range(self._per_window):
            self.add(engine, length, 2)


def _timed_steps(engine: Engine, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def _window(engine: Engine, prompts: _Prompts, length: int) -> float:
    """The window's fresh prompts, then four steps from a synchronised device to a
    synchronised one."""
    prompts.join(engine, length)
    engine.sync()
    started = time.perf_counter()
    for _ in range(WINDOW_STEPS):
        engine.step()
    engine.sync()
    return (time.perf_counter() - started) * 1e3


def kernel_table(prof: Any, steps: int) -> dict[str, Any]:
    """Device time per kernel name, per step, the largest first."""
    rows: dict[str, list[float]] = {}
    for event in device_kernels(prof):
        row = rows.setdefault(event.name[:100], [0.0, 0])
        row[0] += event.time_range.end - event.time_range.start
        row[1] += 1
    top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    return {
        "kernel_ms_per_step": sum(r[0] for r in rows.values()) / steps / 1e3,
        "top": [
            {"name": name, "us_per_step": us / steps, "calls_per_step": calls / steps}
            for name, (us, calls) in top
        ],
    }


def _profiled(engine: Engine, prompts: _Prompts, prompt_len: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    engine.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_DECODE_STEPS):
            engine.step()
        engine.sync()
    decode = kernel_table(prof, PROFILED_DECODE_STEPS)
    _timed_steps(engine, 3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _profiled_windows(engine, prompts, prompt_len)
    windows = kernel_table(prof, PROFILED_WINDOWS)
    _timed_steps(engine, 3)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities, with_stack=True) as prof:
        _profiled_windows(engine, prompts, prompt_len)
    timeline = {"windows": PROFILED_WINDOWS, **timeline_summary(prof)}
    return {"decode_steps": decode, "windows": windows, "windows_timeline": timeline}


def _profiled_windows(engine: Engine, prompts: _Prompts, prompt_len: int) -> None:
    for _ in range(PROFILED_WINDOWS):
        prompts.join(engine, prompt_len)
        for _ in range(WINDOW_STEPS):
            engine.step()
    engine.sync()


def measure(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    prompts = _Prompts(args.prompt_id_limit, args.prompts)
    for _ in range(args.batch):
        prompts.add(engine, args.context, 1_000_000)
    _timed_steps(engine, WARMUP_STEPS)
    decode = statistics.median(_timed_steps(engine, TIMED_STEPS))
    windows = _windows(engine, prompts, args.prompt, args.windows)
    window = statistics.median(windows)
    result: dict[str, Any] = {
        "decode_ms_median": decode,
        "mixed_window_ms_median": window,
        "mixed_step_ms_est": window - (WINDOW_STEPS - 1) * decode,
        "windows_ms": windows,
    }
    if args.launch_lag:
        result["launch_lag"] = _launch_lag(engine, prompts, args.prompt)
    if args.clocks:
        result["clocks"] = _clocked(engine, prompts, args.prompt)
    if args.profile:
        result["profile"] = _profiled(engine, prompts, args.prompt)
    return result


def _windows(engine: Engine, prompts: _Prompts, length: int, count: int) -> list[float]:
    """`count` windows (ms each), three decode steps settling after each."""
    times = []
    for _ in range(count):
        times.append(_window(engine, prompts, length))
        _timed_steps(engine, 3)
    return times


def _smi_index() -> int:
    """nvidia-smi's index of the device torch uses (CUDA_VISIBLE_DEVICES renumbers them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    index = torch.cuda.current_device()
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if entries and all(e.isdigit() for e in entries):
        return int(entries[index])
    return index


def _clocked(engine: Engine, prompts: _Prompts, prompt_len: int) -> dict[str, Any]:
    """Decode steps, then windows, each phase under its own ClockSampler."""
    from splitserve.benchmarks.device_clocks import ClockSampler

    index = _smi_index()
    engine.sync()
    with ClockSampler(index) as decode:
        steps = _timed_steps(engine, CLOCK_DECODE_STEPS)
        engine.sync()
    with ClockSampler(index) as windows:
        times = _windows(engine, prompts, prompt_len, CLOCK_WINDOWS)
        engine.sync()
    return {
        "decode_steps": {
            "steps": CLOCK_DECODE_STEPS,
            "step_ms_median": statistics.median(steps),
            **decode.summary(),
        },
        "windows": {
            "windows": CLOCK_WINDOWS,
            "window_ms_median": statistics.median(times),
            **windows.summary(),
        },
    }


def _launch_lag(engine: Engine, prompts: _Prompts, prompt_len: int) -> dict[str, Any]:
    """`LAG_WINDOWS` windows with launch probes (engine/launch_probes.py), every other one
    with the device held back `HOLD_MS` first: where the prompt's forward pass left the
    device waiting for the host, and for how long."""
    core = engine.core
    probes = LaunchProbes()
    probes.install(core.runner, list(core.model.model.layers))
    runs: dict[bool, list[ForwardLag]] = {False: [], True: []}
    for window in range(LAG_WINDOWS):
        held = window % 2 == 1
        prompts.join(engine, prompt_len)
        probes.start(hold_ms=HOLD_MS if held else 0.0)
        for _ in range(WINDOW_STEPS):
            engine.step()
        runs[held].extend(f for f in probes.stop() if f.carries_prompt)
        _timed_steps(engine, 3)
    return {"windows": LAG_WINDOWS, "hold_ms": HOLD_MS, **host_waits(runs[False], runs[True])}


def _add_procedure_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("splitserve", "vllm"), required=True)
    parser.add_argument("--batch", type=int, default=48, help="decoding requests")
    parser.add_argument("--context", type=int, default=1150, help="their prompt length")
    parser.add_argument("--prompt", type=int, default=1024, help="the fresh prompt's length")
    parser.add_argument(
        "--prompts", type=int, default=1, help="fresh prompts added at once, each window"
    )
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument(
        "--prompt-id-limit", type=int, default=128_000, help="random ids are below this"
    )
    parser.add_argument("--profile", action="store_true", help="device kernels per step")
    parser.add_argument(
        "--launch-lag",
        action="store_true",
        help="splitserve, CUDA: how far the device runs behind the host in each forward",
    )
    parser.add_argument(
        "--clocks",
        action="store_true",
        help="CUDA: the device's clocks and power over more decode steps and windows",
    )
    parser.add_argument("--out", help="write the JSON result here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """splitserve takes the engine flags (launch/engine_args.py); vLLM a model directory."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--engine", choices=("splitserve", "vllm"))
    known, _ = probe.parse_known_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_procedure_arguments(parser)
    if known.engine == "vllm":
        parser.add_argument("--model", required=True, help="model directory (config, tokenizer)")
        parser.add_argument("--dtype", default="bfloat16")
        parser.add_argument("--device", default="cuda")
    else:
        from splitserve.launch.engine_args import add_engine_arguments

        add_engine_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.batch, args.windows, args.prompt, args.prompts, args.context) < 1:
        parser.error("--batch, --windows, --prompt, --prompts and --context must be >= 1")
    if args.profile and not torch.cuda.is_available():
        parser.error("--profile records device kernels: it needs a CUDA device")
    if args.launch_lag and (args.engine != "splitserve" or not torch.cuda.is_available()):
        parser.error("--launch-lag probes splitserve's forward passes on a CUDA device")
    if args.clocks and not torch.cuda.is_available():
        parser.error("--clocks samples a CUDA device with nvidia-smi: run it on the GPU machine")
    if args.clocks:  # nvidia-smi on PATH, and every field known to the driver
        from splitserve.benchmarks.device_clocks import check_query

        try:
            check_query(_smi_index())
        except RuntimeError as exc:
            parser.error(f"--clocks: {exc} (leave --clocks off to run without it)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    engine = vllm_engine(args) if args.engine == "vllm" else splitserve_engine(args)
    result = {**provenance(args.device), "engine": args.engine, **measure(engine, args)}
    if args.engine == "vllm":
        import vllm

        result["vllm"] = vllm.__version__
    logger.info(
        "%s: decode step %.2f ms, window %.2f ms, mixed step about %.2f ms",
        args.engine, result["decode_ms_median"], result["mixed_window_ms_median"],
        result["mixed_step_ms_est"],
    )  # fmt: skip
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
