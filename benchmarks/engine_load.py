"""The engine alone under an open-loop load: Poisson arrivals, no server, no threads.

    python -m splitserve.benchmarks.engine_load --model dummy:llama-3.1-8b --device cuda \
        --dtype bfloat16 --kv-cache-memory-gib 100 --max-num-batched-tokens 8192 \
        --no-prefix-caching --rates 16,24 --num-requests 1000 --input-len 1024 --output-len 256 \
        [--out result.json]

One process drives `EngineCore` directly: before each step it adds the requests whose
arrival time has passed, then steps; when nothing is runnable it sleeps until the next
arrival. With `--async-engine` the engine steps on its own thread instead, as in a node
(`AsyncEngine`): an event loop adds each request at its arrival time and takes its outputs
through `AsyncEngine.add`'s callback, with no server or network around it, so that the
same load through both ways tells what the thread and its event loop cost the engine
before gRPC and the router come in (no `steps` section then: the steps are the thread's).
The rates run one after another on the same engine, each with its own prompts:
fresh random token ids, `ignore_eos`, sampled at `--temperature` (1.0 by default, the
OpenAI default that the serving benchmark's requests get).

It reports what a client of `splitserve bench` would see if the server added nothing:
TTFT (arrival to first token) and TPOT ((last token - first token) / (tokens - 1)) p50, p90
and p99, and every step's duration split by kind: steps that completed a prompt (a
prefill, alone or mixed with decode rows) and decode-only steps, with their mean number of
sequences; and `request_costs`, the requests' decode times fitted to a decode step and a
cost per prompt prefilled meanwhile (benchmarks/request_costs.py), the split a served
run's records give with `serving_report costs`. Beside a serving run at the same rate
(`benchmarks/serving.py`), the difference is what the server costs on top of the engine
(docs/performance.md).

Garbage collection pauses are timed through `gc.callbacks` (count, total and longest
pause per generation), after the start-up heap is frozen as a node freezes it
(launch/gc_heap.py).

With `--profile-s S` (CUDA), torch.profiler records S seconds of steps from
`--profile-after-s` seconds into each rate's run, and the point gets `device_timeline`
(benchmarks/device_timeline.py: device busy and idle time, idle gaps by the host phase
they began in, kernel time by kind; with `--profile-stack` the longest gaps carry the
Python frames of the host op open when they began). Stopping the profiler stalls the
loop for a while, so a profiled run's latencies are not the engine's: time those in a run
without it.

With `--launch-lag-s S` (CUDA) launch probes (engine/launch_probes.py, no profiler) run
over S seconds of steps from `--profile-after-s` seconds into each rate's run, and the
point gets `launch_lag`: per kind of forward pass (with prompt tokens, decode only) how
many found the device drained at their start (the steps before did not hide their
launch), and the medians of their host launch time, device time and how far the device
was behind the host at their start and end. Its start and stop synchronise the device
once each.

On CUDA each point also gets the forward passes' device time, from the model runner's own
CUDA events (engine/forward_times.py, the times a node reports through its Stats and the
router exports per node): for one-token (decode) batches and for batches with prompt
tokens, the passes, their mean device ms and rows, and `device_busy`, the share of the
run the device spent in them. A decode forward's device time below its step's wall time
is time the device waited for the host.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from splitserve.benchmarks.arrivals import ArrivalConfig, arrival_times
from splitserve.benchmarks.engine_offline import random_prompts
from splitserve.benchmarks.request_costs import fit_costs
from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.engine.forward_times import KINDS
from splitserve.engine.launch_probes import LagWindow, LaunchProbes
from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args
from splitserve.launch.gc_heap import freeze_startup_heap
from splitserve.node.gc_pauses import GENERATIONS, GcPauses

if TYPE_CHECKING:
    from splitserve.engine.async_engine import AsyncEngine
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
    parser.add_argument(
        "--profile-s", type=float, default=0.0, help="CUDA: seconds of steps to profile per rate"
    )
    parser.add_argument(
        "--profile-after-s", type=float, default=20.0, help="... starting this far into the rate"
    )
    parser.add_argument(
        "--profile-stack",
        action="store_true",
        help="... recording Python stacks too: the longest gaps name the code that left them",
    )
    parser.add_argument(
        "--launch-lag-s",
        type=float,
        default=0.0,
        help="CUDA: seconds of steps to probe per rate, from --profile-after-s (no profiler)",
    )
    parser.add_argument(
        "--async-engine",
        action="store_true",
        help="run the engine on its own thread behind an event loop, as a node does "
        "(AsyncEngine), instead of stepping it from this one",
    )
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates {args.rates!r}: give numbers separated by commas, e.g. 16,24")
    if min(args.rates) <= 0 or args.num_requests < 1:
        parser.error("every rate must be > 0 and --num-requests >= 1")
    if args.profile_s < 0 or args.profile_after_s < 0:
        parser.error("--profile-s and --profile-after-s must be >= 0")
    if args.profile_s and args.device.split(":")[0] != "cuda":
        parser.error("--profile-s records device kernels: it needs --device cuda")
    if args.launch_lag_s < 0 or (args.launch_lag_s and args.profile_s):
        parser.error("--launch-lag-s must be >= 0, and not given with --profile-s")
    if args.launch_lag_s and args.device.split(":")[0] != "cuda":
        parser.error("--launch-lag-s records CUDA events: it needs --device cuda")
    if args.async_engine and args.profile_s:
        parser.error(
            "--async-engine steps the engine on its own thread: no --profile-s with it "
            "(the profiler records this one); --launch-lag-s probes that thread"
        )
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


class _Forwards:
    """The model runner's forward passes (engine/forward_times.py) since the last summary:
    the same device times a node reports through its Stats (router/metrics.py)."""

    def __init__(self, runner: Any) -> None:
        import torch

        self._cuda = torch.cuda
        self._times = runner.forward_times
        self._cuda.synchronize()
        self._last = self._times.totals()

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        """Per kind, the passes, their mean device ms and rows since the last summary, and
        the share of `elapsed_s` the device spent in them (`device_busy`)."""
        self._cuda.synchronize()
        now = self._times.totals()
        out: dict[str, Any] = {}
        busy_s = 0.0
        for kind in KINDS:
            num = now[kind].num - self._last[kind].num
            seconds = now[kind].device_s - self._last[kind].device_s
            rows = now[kind].rows - self._last[kind].rows
            busy_s += seconds
            out[f"{kind}_forwards"] = {
                "num": num,
                "mean_gpu_ms": seconds / num * 1e3 if num else None,
                "mean_rows": rows / num if num else None,
            }
        out["device_busy"] = busy_s / elapsed_s if elapsed_s > 0 else None
        self._last = now
        return out


class _GcPauses(GcPauses):
    """Every garbage collection's pause (node/gc_pauses.py, as a node times them)."""

    def __init__(self) -> None:
        super().__init__(keep_each=True)

    def summary(self) -> dict[str, Any]:
        """Per generation: pauses, total and longest ms since the last summary."""
        out = {}
        for generation in GENERATIONS:
            mine = [p for g, p in self.pauses if g == generation]
            out[f"gen{generation}"] = {
                "num": len(mine),
                "total_ms": sum(mine) * 1e3,
                "max_ms": max(mine, default=0.0) * 1e3,
            }
        self.pauses.clear()
        return out


class _ProfileWindow:
    """torch.profiler over `length_s` seconds of whole steps from `after_s` into a run."""

    def __init__(self, after_s: float, length_s: float, with_stack: bool = False) -> None:
        self.after_s, self.length_s = after_s, length_s
        self.with_stack = with_stack
        self._prof: Any = None
        self._started = 0.0
        self._stopped = False

    @staticmethod
    def _profiler(with_stack: bool = False) -> Any:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        return torch.profiler.profile(activities=activities, with_stack=with_stack)

    @classmethod
    def warm_up(cls) -> None:
        """Start and stop one profiler before the rates, so that the first rate's window is
        not the process's first profiler start (which sets up CUPTI): on an H200 that window
        kept 372 kernels of 1.5 s at 16 req/s, where the next rate's window had 13,201."""
        import torch

        with cls._profiler():
            torch.ones(8, device="cuda").add_(1)
            torch.cuda.synchronize()

    def tick(self, now: float) -> None:
        """Called before each step with the seconds since the run started."""
        if self._stopped:
            return
        if self._prof is None and now >= self.after_s:
            self._prof = self._profiler(self.with_stack)
            self._prof.start()
            self._started = now
        elif self._prof is not None and now >= self._started + self.length_s:
            self._stop()

    def _stop(self) -> None:
        import torch

        torch.cuda.synchronize()
        self._prof.stop()
        self._stopped = True

    def summary(self) -> dict[str, Any] | None:
        """The device timeline of the profiled stretch (None if the run ended before it)."""
        if self._prof is None:
            return None
        if not self._stopped:
            self._stop()
        from splitserve.benchmarks.device_timeline import timeline_summary

        return {"after_s": self.after_s, "length_s": self.length_s, **timeline_summary(self._prof)}


class Window(Protocol):
    """A stretch of a rate's run under a profiler or launch probes."""

    def tick(self, now: float) -> None: ...

    def summary(self) -> dict[str, Any] | None: ...


def _window(args: argparse.Namespace, probes: LaunchProbes | None) -> Window | None:
    """The rate's profiler or launch-probe window, if one was asked for."""
    if probes is not None:
        return LagWindow(probes, args.profile_after_s, args.launch_lag_s)
    if args.profile_s:
        return _ProfileWindow(args.profile_after_s, args.profile_s, args.profile_stack)
    return None


def drive(
    core: EngineCore,
    prompts: list[list[int]],
    times: np.ndarray,
    params: Any,
    window: Window | None = None,
) -> _Timeline:
    """Add each prompt at its arrival time and step until every request finished."""
    timeline = _Timeline()
    start = time.perf_counter()
    next_index = 0
    while next_index < len(prompts) or core.has_unfinished():
        now = time.perf_counter() - start
        if window is not None:
            window.tick(now)
        while next_index < len(prompts) and times[next_index] <= now:
            request_id = str(next_index)
            core.add_request(request_id, prompts[next_index], params)
            timeline.arrived[request_id] = start + float(times[next_index])
            next_index += 1
        if not core.has_runnable():
            if next_index < len(prompts):
                time.sleep(max(0.0, float(times[next_index]) - now))
            continue
        started = time.perf_counter()
        outputs = core.step()
        timeline.record(started, time.perf_counter(), outputs)
    return timeline


async def drive_async(
    engine: AsyncEngine, prompts: list[list[int]], times: np.ndarray, params: Any
) -> _Timeline:
    """As `drive`, with the engine stepping on its own thread (`AsyncEngine`, as a node
    runs it): each prompt is added from this event loop at its arrival time, its outputs
    come back through `AsyncEngine.add`'s callback on this loop, each token timed at the
    end of the step that made it (`metrics["step_end_s"]`, time.monotonic). The steps
    are not recorded (the summary has no `steps`)."""
    from splitserve.engine.outputs import num_tokens

    timeline = _Timeline()
    all_finished = asyncio.Event()
    left = len(prompts)

    def recorder(request_id: str) -> Callable[[Any], None]:
        def record(out: Any) -> None:
            nonlocal left
            ended = out.metrics.get("step_end_s", time.monotonic())
            timeline.token_times.setdefault(request_id, []).extend([ended] * num_tokens(out))
            if out.finished:
                left -= 1
                if not left:
                    all_finished.set()

        return record

    start = time.monotonic()
    adds = []
    for index, prompt in enumerate(prompts):
        await asyncio.sleep(max(0.0, start + float(times[index]) - time.monotonic()))
        request_id = str(index)
        timeline.arrived[request_id] = start + float(times[index])
        add = engine.add(request_id, prompt, params, None, recorder(request_id))
        adds.append(asyncio.ensure_future(add))  # admission waits for a step's end
    await asyncio.gather(*adds)
    await all_finished.wait()
    for request_id in timeline.arrived:
        await engine.close(request_id, finished=True)
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
            **_percentiles_ms([s[0] for s in mine]),
        }
    num_tokens = sum(len(t) for t in timeline.token_times.values())
    records = [
        {"first_event_s": t[0], "last_event_s": t[-1], "num_output_tokens": len(t)}
        for t in timeline.token_times.values()
        if t
    ]
    costs = fit_costs(records)
    return {
        "ttft_ms": _percentiles_ms(ttft),
        "tpot_ms": _percentiles_ms(tpot),
        "steps": steps if timeline.steps else None,
        "output_tok_s": num_tokens / elapsed_s,
        "request_costs": None if costs is None else asdict(costs),
    }


class _Threaded:
    """The engine on its own thread (`--async-engine`), with the rate's window ticked from
    that thread before each step (a step hook), as `drive` ticks it before each step."""

    def __init__(self, core: EngineCore) -> None:
        from splitserve.engine.async_engine import AsyncEngine

        self.engine = AsyncEngine(None, core=core)
        self._window: Window | None = None
        self._start = 0.0
        self.engine.add_step_hook(self._tick)

    def _tick(self, core: EngineCore) -> bool:
        window = self._window
        if window is not None:
            window.tick(time.perf_counter() - self._start)
        return False

    def drive(
        self, prompts: list[list[int]], times: np.ndarray, params: Any, window: Window | None
    ) -> _Timeline:
        self._window, self._start = window, time.perf_counter()
        try:
            return asyncio.run(drive_async(self.engine, prompts, times, params))
        finally:
            self._window = None


T = TypeVar("T")


def _on_engine_thread(threaded: _Threaded | None, fn: Callable[[], T]) -> T:
    """`fn()` where the engine steps: on its thread with --async-engine (what the runner
    keeps, such as its forward times, is that thread's), else here."""
    if threaded is None:
        return fn()
    return threaded.engine.call(lambda core: fn()).result()


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
    forwards = _Forwards(core.runner) if core.device.type == "cuda" else None
    if args.profile_s:
        _ProfileWindow.warm_up()
    probes = None
    if args.launch_lag_s:
        probes = LaunchProbes()
        probes.install(core.runner, list(core.model.model.layers))
    freeze_startup_heap()  # as a node does once it has started (launch/gc_heap.py)
    pauses = _GcPauses()
    threaded = _Threaded(core) if args.async_engine else None
    points = []
    for index, rate in enumerate(args.rates):
        seed = args.seed + index
        prompts = random_prompts(args.num_requests, args.input_len, vocab, seed)
        times = arrival_times(ArrivalConfig(rate=rate, seed=seed), args.num_requests)
        window = _window(args, probes)
        start = time.perf_counter()
        if threaded is not None:
            timeline = threaded.drive(prompts, times, params, window)
        else:
            timeline = drive(core, prompts, times, params, window)
        elapsed = time.perf_counter() - start
        point = {"rate": rate, "elapsed_s": elapsed, **summarize(timeline, elapsed)}
        if window is not None:
            key = "launch_lag" if args.launch_lag_s else "device_timeline"
            point[key] = _on_engine_thread(threaded, window.summary)  # it may stop probes
        if forwards is not None:
            point.update(_on_engine_thread(threaded, partial(forwards.summary, elapsed)))
        point["gc_pauses"] = pauses.summary()
        logging.getLogger(__name__).warning("%s", point)
        points.append(point)
    if threaded is not None:
        threaded.engine.shutdown()
    return {
        **provenance(args.device),
        "model": args.model,
        "async_engine": args.async_engine,
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
