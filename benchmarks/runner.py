"""Drives a workload against a target on a schedule and records every request.

Order of events: `run_benchmark` opens one aiohttp session, sends the warm-up requests (not
recorded), starts the clock, then either (open loop) starts each session at its arrival
time, waiting for one of `max_concurrency` slots when a cap is set, or (closed loop) keeps
`max_concurrency` workers that each start the next session as soon as their previous one
ends. Within a session, turn k+1 is meant to be sent `think_time_s` after turn k's answer.

Each record keeps when the request was meant to be sent (`intended_send_s`) and when it was
sent (`send_s`); the difference is the client's lag (time waiting for a slot plus event-loop
lateness). `load_summary` reports it and warns when the offered load was not the claimed one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import numpy as np

from splitserve.benchmarks.arrivals import ArrivalConfig, arrival_times, closed_loop_start_delays
from splitserve.benchmarks.client import RequestRecord, TargetConfig, build_body, send_request
from splitserve.benchmarks.workloads import Session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    arrival: ArrivalConfig
    max_concurrency: int | None = None  # in-flight cap (required for the closed loop)
    num_warmup: int = 0  # requests sent before the clock starts, not recorded
    show_progress: bool = True
    request_id_prefix: str = "bench"

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.arrival.kind == "closed" and self.max_concurrency is None:
            raise ValueError("--arrival closed needs --max-concurrency N (the number of users)")
        if self.num_warmup < 0:
            raise ValueError(f"--num-warmup must be >= 0, got {self.num_warmup}")


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # clock start to the end of the last response
    started_at: str  # wall-clock ISO time of the clock start


@dataclass
class _Ctx:
    http: aiohttp.ClientSession
    target: TargetConfig
    cfg: RunConfig
    clock: Callable[[], float]
    slots: asyncio.Semaphore | None
    on_done: Callable[[], None]


def _new_record(ctx: _Ctx, session: Session, k: int, intended_s: float) -> RequestRecord:
    turn = session.turns[k]
    return RequestRecord(
        request_id=f"{ctx.cfg.request_id_prefix}-{session.session_id}-{k}",
        session_id=session.session_id,
        turn_index=k,
        max_tokens=turn.max_tokens,
        num_expected_prompt_tokens=turn.num_prompt_tokens,
        intended_send_s=intended_s,
    )


async def _send_turn(ctx: _Ctx, rec: RequestRecord, body: dict[str, object]) -> None:
    if ctx.slots is None:
        await send_request(ctx.http, ctx.target, body, rec, ctx.clock)
        return
    waited_from = ctx.clock()
    async with ctx.slots:
        rec.queue_wait_s = ctx.clock() - waited_from
        await send_request(ctx.http, ctx.target, body, rec, ctx.clock)


async def _run_session(ctx: _Ctx, session: Session, start_s: float) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    history: list[tuple[str, str]] = []
    intended = start_s
    for k, turn in enumerate(session.turns):
        if k:
            intended = ctx.clock() + turn.think_time_s
        rec = _new_record(ctx, session, k, intended)
        records.append(rec)
        if k and records[k - 1].error is not None:
            rec.error = "skipped: an earlier turn of this session failed"
            ctx.on_done()
            continue
        delay = intended - ctx.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await _send_turn(ctx, rec, build_body(ctx.target, session, k, history))
        history.append((turn.text or "", rec.generated_text))
        ctx.on_done()
    return records


async def _closed_worker(
    ctx: _Ctx, queue: list[Session], start_delay_s: float
) -> list[RequestRecord]:
    await asyncio.sleep(start_delay_s)
    records: list[RequestRecord] = []
    while queue:
        session = queue.pop(0)
        records += await _run_session(ctx, session, ctx.clock())
    return records


async def _warmup(ctx: _Ctx, sessions: list[Session]) -> None:
    warm = [
        Session(f"warmup{i}", s.turns[:1], s.system, s.system_ids) for i, s in enumerate(sessions)
    ]
    limit = asyncio.Semaphore(ctx.cfg.max_concurrency or len(warm) or 1)

    async def one(s: Session) -> RequestRecord:
        async with limit:
            rec = _new_record(ctx, s, 0, ctx.clock())
            await send_request(
                ctx.http, ctx.target, build_body(ctx.target, s, 0, []), rec, ctx.clock
            )
            return rec

    done = await asyncio.gather(*(one(s) for s in warm))
    failed = [r.error for r in done if r.error]
    if failed:
        logger.warning(
            "%d of %d warm-up requests failed, e.g. %s", len(failed), len(done), failed[0]
        )


async def _run(target: TargetConfig, cfg: RunConfig, sessions: list[Session]) -> RunResult:
    trace = (
        np.array([s.arrival_s or 0.0 for s in sessions]) if cfg.arrival.kind == "trace" else None
    )
    starts = arrival_times(cfg.arrival, len(sessions), trace)
    total = sum(len(s.turns) for s in sessions)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0)
    async with aiohttp.ClientSession(connector=connector) as http:
        progress = _Progress(total, cfg.show_progress)
        ctx = _Ctx(http, target, cfg, time.perf_counter, None, progress.advance)
        if cfg.num_warmup:
            await _warmup(ctx, sessions[: cfg.num_warmup])
        t0 = time.perf_counter()
        ctx.clock = lambda: time.perf_counter() - t0
        started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with progress:
            if cfg.arrival.kind == "closed":
                queue = list(sessions)
                delays = closed_loop_start_delays(cfg.max_concurrency or 1, cfg.arrival.ramp_up_s)
                groups = await asyncio.gather(*(_closed_worker(ctx, queue, d) for d in delays))
            else:
                if cfg.max_concurrency:
                    ctx.slots = asyncio.Semaphore(cfg.max_concurrency)
                groups = await asyncio.gather(
                    *(_run_session(ctx, s, float(t)) for s, t in zip(sessions, starts, strict=True))
                )
        records = [r for g in groups for r in g]
        ends = [r.response_end_s for r in records if r.response_end_s is not None]
        return RunResult(records, max(ends, default=ctx.clock()), started_at)


class _Progress:
    """A rich progress bar over requests (or nothing when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=True,
            )
            self._task = self._bar.add_task("requests", total=total)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def run_benchmark(target: TargetConfig, cfg: RunConfig, sessions: list[Session]) -> RunResult:
    """Run the sessions against the target (blocking) and return every request's record."""
    if not sessions:
        raise ValueError("the workload is empty; raise --num-requests")
    return asyncio.run(_run(target, cfg, sessions))
