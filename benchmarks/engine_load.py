"""The engine alone under an open-loop load: Poisson arrivals, no server, no threads.

    python -m splitserve.benchmarks.engine_load --model dummy:llama-3.1-8b --device cuda \
        --dtype bfloat16 --kv-cache-memory-gib 100 --max-num-batched-tokens 8192 \
        --no-prefix-caching --rates 16,24 --num-requests 1000 --input-len 1024 --output-len 256 \
        [--out result.json]

One process drives `EngineCore` directly: before each step it adds the requests whose
arrival time has passed, then steps; when nothing is runnable it sleeps until the next
arrival. The rates run one after another on the same engine, each with its own prompts:
fresh random token ids, `ignore_eos`, sampled at `--temperature` (1.0 by default, the
OpenAI default that the serving benchmark's requests get).

It reports what a client of `splitserve bench` would see if the server added nothing:
TTFT (arrival to first token) and TPOT ((last token - first token) / (tokens - 1)) p50, p90
and p99, and every step's duration split by kind: steps that completed a prompt (a
prefill, alone or mixed with decode rows) and decode-only steps, with their mean number of
sequences. Beside a serving run at the same rate (`benchmarks/serving.py`), the difference
is what the server costs on top of the engine (docs/performance.md).

With `--profile-out FILE --profile-steps N`, torch.profiler records N steps of the first
rate from the arrival of its middle request (the steady state) and FILE gets the window's
wall time, its steps' kinds and the operators by self CUDA and self CPU time.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitserve.benchmarks.arrivals import ArrivalConfig, arrival_times
from splitserve.benchmarks.engine_offline import random_prompts
from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args

if TYPE_CHECKING:
    from splitserve.engine.core import EngineCore, StepOutput

_PERCENTILES = (50, 90, 99)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_arguments(parser)
    parser.add_argument(
        "--rates", required=True, help="Poisson arrivals per second, comma-separated"
    )
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--num-warmup", type=int, default=4, help="uncounted requests first")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", default=None, help="write the result JSON here")
    parser.add_argument("--profile-out", default=None, help="profile steps of the first rate")
    parser.add_argument("--profile-steps", type=int, default=40)
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates {args.rates!r}: give numbers separated by commas, e.g. 16,24")
    if min(args.rates) <= 0 or args.num_requests < 1:
        parser.error("every rate must be > 0 and --num-requests >= 1")
    return args


@dataclass
class _Timeline:
    """When each request arrived and got its tokens; every step's duration and kind."""

    arrived: dict[str, float] = field(default_factory=dict)
    token_times: dict[str, list[float]] = field(default_factory=dict)
    # (duration s, sequences that got a token, whether a prompt completed in it)
    steps: list[tuple[float, int, bool]] = field(default_factory=list)

    def record(self, started: float, ended: float, outputs: list[StepOutput]) -> None:
        completed_prompt = False
        for out in outputs:
            times = self.token_times.setdefault(out.request_id, [])
            completed_prompt |= not times
            times.extend([ended] * len(out.new_token_ids))
        self.steps.append((ended - started, len(outputs), completed_prompt))


class _StepProfile:
    """torch.profiler over `num_steps` steps from the arrival of request `start_at`."""

    def __init__(self, start_at: int, num_steps: int, path: str) -> None:
        self.start_at, self.num_steps, self.path = start_at, num_steps, path
        self._prof: Any = None
        self._first_step = 0
        self._started = 0.0

    def before_step(self, num_arrived: int, timeline: _Timeline) -> None:
        if self._prof is None and self.path and num_arrived >= self.start_at:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
            self._prof = profile(activities=activities)
            self._prof.__enter__()
            self._first_step, self._started = len(timeline.steps), time.perf_counter()

    def after_step(self, timeline: _Timeline) -> None:
        if self._prof is None or len(timeline.steps) - self._first_step < self.num_steps:
            return
        prof, self._prof, path = self._prof, None, self.path
        prof.__exit__(None, None, None)
        self.path = ""  # once
        steps = timeline.steps[self._first_step :]
        kinds = ", ".join(
            f"{'prefill' if p else 'decode'} {d * 1e3:.2f} ms x{n}" for d, n, p in steps
        )
        wall = (time.perf_counter() - self._started) * 1e3
        tables = [
            prof.key_averages().table(sort_by=key, row_limit=30)
            for key in ("self_cuda_time_total", "self_cpu_time_total")
        ]
        header = f"{len(steps)} steps in {wall:.1f} ms (profiled): {kinds}"
        Path(path).write_text("\n\n".join([header, *tables]) + "\n")


def drive(
    core: EngineCore,
    prompts: list[list[int]],
    times: np.ndarray,
    params: Any,
    profile: _StepProfile | None = None,
) -> _Timeline:
    """Add each prompt at its arrival time and step until every request finished."""
    timeline = _Timeline()
    start = time.perf_counter()
    next_index = 0
    while next_index < len(prompts) or core.has_unfinished():
        now = time.perf_counter() - start
        while next_index < len(prompts) and times[next_index] <= now:
            request_id = str(next_index)
            core.add_request(request_id, prompts[next_index], params)
            timeline.arrived[request_id] = start + float(times[next_index])
            next_index += 1
        if not core.has_runnable():
            if next_index < len(prompts):
                time.sleep(max(0.0, float(times[next_index]) - now))
            continue
        if profile is not None:
            profile.before_step(next_index, timeline)
        started = time.perf_counter()
        outputs = core.step()
        timeline.record(started, time.perf_counter(), outputs)
        if profile is not None:
            profile.after_step(timeline)
    return timeline


def _percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) * 1e3 for q in _PERCENTILES}


def summarize(timeline: _Timeline, elapsed_s: float) -> dict[str, Any]:
    ttft, tpot = [], []
    for request_id, arrived in timeline.arrived.items():
        times = timeline.token_times.get(request_id, [])
        if times:
            ttft.append(times[0] - arrived)
        if len(times) > 1:
            tpot.append((times[-1] - times[0]) / (len(times) - 1))
    kinds = {"prefill_steps": True, "decode_steps": False}
    steps = {}
    for name, completed_prompt in kinds.items():
        mine = [s for s in timeline.steps if s[2] == completed_prompt]
        steps[name] = {
            "num": len(mine),
            "mean_ms": float(np.mean([s[0] for s in mine])) * 1e3 if mine else None,
            "mean_sequences": float(np.mean([s[1] for s in mine])) if mine else None,
        }
    num_tokens = sum(len(t) for t in timeline.token_times.values())
    return {
        "ttft_ms": _percentiles_ms(ttft),
        "tpot_ms": _percentiles_ms(tpot),
        "steps": steps,
        "output_tok_s": num_tokens / elapsed_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from splitserve.engine.core import EngineCore
    from splitserve.engine.sampling_params import SamplingParams

    core = EngineCore(engine_config_from_args(args))
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True
    )
    vocab = core.arch.vocab_size
    if args.num_warmup:
        warm = random_prompts(args.num_warmup, args.input_len, vocab, seed=args.seed - 1)
        drive(core, warm, np.zeros(len(warm)), params)
    points = []
    for index, rate in enumerate(args.rates):
        seed = args.seed + index
        prompts = random_prompts(args.num_requests, args.input_len, vocab, seed)
        times = arrival_times(ArrivalConfig(rate=rate, seed=seed), args.num_requests)
        profile = None
        if index == 0 and args.profile_out:
            profile = _StepProfile(args.num_requests // 2, args.profile_steps, args.profile_out)
        start = time.perf_counter()
        timeline = drive(core, prompts, times, params, profile)
        elapsed = time.perf_counter() - start
        point = {"rate": rate, "elapsed_s": elapsed, **summarize(timeline, elapsed)}
        logging.getLogger(__name__).warning("%s", point)
        points.append(point)
    return {
        **provenance(args.device),
        "model": args.model,
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "temperature": args.temperature,
        "points": points,
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    write_result(args.out, run(args))


if __name__ == "__main__":
    main()
