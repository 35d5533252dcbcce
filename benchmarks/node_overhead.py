"""What a decode node's streaming costs its engine thread, on the CPU, without a GPU.

    python -m splitserve.benchmarks.node_overhead [--rows 150] [--seconds 4] \
        [--host-ops 400] [--device-ms 20] [--runs 3] [--modes alone,served] \
        [--arrivals-per-s 0 --length 64] [--out node.json]

The engine thread shares the node's process, and so the GIL, with the event loop that
turns each step's outputs into stream messages. This measures that share with the node's
own parts and a stand-in engine core: each step runs a host phase (`--host-ops` small
torch operations on the CPU, each taking and releasing the GIL as the engine's launches
do), then calls `while_waiting` (where `AsyncEngine` hands over the step before's
outputs, as `EngineCore.step` does once it launched the next step), then waits
`--device-ms` with the GIL released (the device), then returns one output per row
(`--rows` requests, one token each) to `AsyncEngine`. Two modes, `--runs` times
each, alternating:

- `alone`: nobody consumes the outputs beyond AsyncEngine's own hand-over;
- `served`: every request is a `StreamedRequest` of a `Multiplexer` (decode/multiplex.py,
  as `Decode.GenerateMany` runs them), whose step batches are serialised as gRPC would.

- `served_held`: `served` with `--no-first-and-last-at-once`: a request's first and last
  outputs wait for the next step's launch like the others.

With `--arrivals-per-s`, the served modes also add requests of `--length` tokens at that
rate beside the `--rows` that never end, and time each one's first and last output from
the end of the step that made it to its stream's callback on the event loop
(`first_output_ms`, `last_output_ms`).

Reported per mode: the host phase's duration (p50, mean, p90: how much the event loop's
work stretches it) and the process's CPU time per step. The difference between the modes
is the node's streaming cost per step at that many rows.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from splitserve.benchmarks.results_io import provenance, write_result
from splitserve.decode.multiplex import Metadata, Multiplexer, Outbox
from splitserve.decode.streamed_request import StreamedRequest
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.output_processor import StepOutput
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampler import WhileWaiting
from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import node_pb2 as pb

logger = logging.getLogger(__name__)
_WARMUP_STEPS = 10
MODES = ("alone", "served", "served_held")


class StandInCore:
    """Steps like EngineCore on a GPU: host work, a device wait, one output per row."""

    def __init__(self, host_ops: int, device_s: float) -> None:
        self.host_ops = host_ops
        self.device_s = device_s
        self.requests: dict[str, int] = {}
        self.lengths: dict[str, int | None] = {}  # each added request's max_tokens
        self.host_phases: list[float] = []
        self._x = torch.ones(16)

    def add_request(self, rid: str, prompt: list[int], params: SamplingParams, kv: object) -> None:
        self.requests[rid] = 0
        self.lengths[rid] = params.max_tokens

    def has_runnable(self) -> bool:
        return bool(self.requests)

    def poll_connector(self) -> tuple[list[StepOutput], bool]:
        return [], False

    def abort(self, rid: str) -> list[StepOutput]:
        self.requests.pop(rid, None)
        return []

    def unfinished_request_ids(self) -> list[str]:
        return list(self.requests)

    def step(self, while_waiting: WhileWaiting | None = None) -> list[StepOutput]:
        started = time.perf_counter()
        y = self._x
        for _ in range(self.host_ops):
            y = y + 1.0
        self.host_phases.append(time.perf_counter() - started)
        if while_waiting is not None:
            while_waiting()
        time.sleep(self.device_s)
        outputs = []
        for rid in list(self.requests):
            count = self.requests[rid] = self.requests[rid] + 1
            finish = "length" if count == self.lengths.get(rid) else None
            if finish is not None:
                del self.requests[rid], self.lengths[rid]
            outputs.append(StepOutput(rid, 0, [7], None, " a", finish, None))
        return outputs


async def _served(
    engine: AsyncEngine, args: argparse.Namespace, delays: dict[str, list[float]]
) -> None:
    """`args.rows` endless requests, and arrivals of `args.length` tokens at
    `args.arrivals_per_s`, whose first and last outputs' delays from their step's end go
    to `delays["first"]` and `delays["last"]` (seconds)."""
    endless = SamplingParams(max_tokens=1 << 30, ignore_eos=True)
    finite = SamplingParams(max_tokens=args.length, ignore_eos=True)

    async def run(request: pb.GenerateRequest, metadata: Metadata, outbox: Outbox) -> None:
        stream = StreamedRequest(request, 1, outbox, lambda: None)
        arrival = request.request_id.startswith("a")

        def on_output(out: RequestOutput) -> None:
            if arrival and (stream.num_generated == 0 or out.finished):
                late = time.monotonic() - out.metrics["step_end_s"]
                delays["last" if out.finished else "first"].append(late)
            stream.on_output(out)

        prompt = list(request.prompt_token_ids)
        params = finite if arrival else endless
        await engine.add(request.request_id, prompt, params, None, on_output)
        stream.send_last(await stream.last, {})

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        for i in range(args.rows):
            generate = pb.GenerateRequest(request_id=f"r{i}", prompt_token_ids=[1] * 16)
            yield pb.StreamRequest(generate=generate)
        async for rid in _arrivals(args.arrivals_per_s, args.seconds):
            generate = pb.GenerateRequest(request_id=rid, prompt_token_ids=[1] * 16)
            yield pb.StreamRequest(generate=generate)
        await asyncio.sleep(args.seconds + 60)

    async def consume() -> None:
        async for batch in Multiplexer(run).serve(requests()):
            batch.SerializeToString()

    task = asyncio.create_task(consume())
    await asyncio.sleep(args.seconds)
    task.cancel()


async def _arrivals(per_s: float, seconds: float) -> AsyncIterator[str]:
    """Request ids a0, a1, ... at `per_s` a second (evenly) for `seconds`; none at 0."""
    if per_s <= 0:
        return
    for i in range(int(per_s * seconds)):
        await asyncio.sleep(1 / per_s)
        yield f"a{i}"


async def _alone(engine: AsyncEngine, core: StandInCore, rows: int, seconds: float) -> None:
    for i in range(rows):
        core.requests[f"r{i}"] = 0
    engine.call(lambda _: None)  # wake the loop: requests are runnable
    await asyncio.sleep(seconds)


def measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    core = StandInCore(args.host_ops, args.device_ms / 1e3)
    scheduler = SchedulerConfig(first_and_last_at_once=mode != "served_held")
    config = EngineConfig(ModelConfig("stand-in core"), scheduler=scheduler)
    delays: dict[str, list[float]] = {"first": [], "last": []}
    cpu = time.process_time()

    async def run() -> None:
        engine = AsyncEngine(config, core)  # type: ignore[arg-type]
        try:
            if mode == "alone":
                await _alone(engine, core, args.rows, args.seconds)
            else:
                await _served(engine, args, delays)
        finally:  # the engine thread stops before its event loop closes
            await asyncio.to_thread(engine.shutdown)

    asyncio.run(run())
    cpu = time.process_time() - cpu
    phases = core.host_phases[_WARMUP_STEPS:]
    if len(phases) < 10:
        raise RuntimeError(f"only {len(phases)} steps measured: raise --seconds")
    return {
        "mode": mode,
        "steps": len(phases),
        "host_phase_ms": _spread_ms(phases),
        "cpu_ms_per_step": cpu * 1e3 / len(core.host_phases),
        **_delay_figures("first", delays["first"]),
        **_delay_figures("last", delays["last"]),
    }


def _delay_figures(which: str, seconds: list[float]) -> dict[str, Any]:
    """The arrivals' `which` (first, last) outputs: how many, and their delays (ms) p50 /
    mean / p90."""
    if not seconds:
        return {}
    return {f"{which}_outputs": len(seconds), f"{which}_output_ms": _spread_ms(seconds)}


def _spread_ms(seconds: list[float]) -> dict[str, float]:
    """p50, mean and p90 of durations given in seconds, in ms."""
    ms = sorted(x * 1e3 for x in seconds)
    return {
        "p50": statistics.median(ms),
        "mean": statistics.fmean(ms),
        "p90": ms[int(0.9 * (len(ms) - 1))],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=150, help="running requests")
    parser.add_argument("--seconds", type=float, default=4.0, help="per run")
    parser.add_argument("--host-ops", type=int, default=400, help="torch ops per host phase")
    parser.add_argument("--device-ms", type=float, default=20.0, help="device wait per step")
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode")
    parser.add_argument(
        "--modes", type=_modes, default="alone,served", help=f"comma-separated, of {MODES}"
    )
    parser.add_argument(
        "--arrivals-per-s", type=float, default=0.0, help="served: requests added a second"
    )
    parser.add_argument("--length", type=int, default=64, help="tokens of an added request")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    if min(args.rows, args.host_ops, args.runs, args.length) < 1:
        parser.error("--rows, --host-ops, --runs and --length must be >= 1")
    if args.seconds <= 0 or args.device_ms < 0 or args.arrivals_per_s < 0:
        parser.error("--seconds must be > 0, --device-ms and --arrivals-per-s >= 0")
    return args


def _modes(text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes are some of {MODES}, got {text!r}")
    return modes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for index in range(args.runs):
        for mode in args.modes:
            runs.append({"run": index + 1, **measure(mode, args)})
            logger.info("%s", runs[-1])
    figures = {
        "host_phase_ms_p50": lambda r: r["host_phase_ms"]["p50"],
        "host_phase_ms_mean": lambda r: r["host_phase_ms"]["mean"],
        "cpu_ms_per_step": lambda r: r["cpu_ms_per_step"],
        "first_output_ms_p50": lambda r: r.get("first_output_ms", {}).get("p50"),
        "last_output_ms_p50": lambda r: r.get("last_output_ms", {}).get("p50"),
    }
    summary = {
        mode: {
            name: statistics.median(v)
            for name, figure in figures.items()
            if (v := [x for r in runs if r["mode"] == mode if (x := figure(r)) is not None])
        }
        for mode in args.modes
    }
    result = {
        **provenance("cpu"),
        "rows": args.rows,
        "host_ops": args.host_ops,
        "device_ms": args.device_ms,
        "seconds": args.seconds,
        "arrivals_per_s": args.arrivals_per_s,
        "length": args.length,
        "runs": runs,
        "summary": summary,
    }
    logger.info("medians over runs: %s", summary)
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
