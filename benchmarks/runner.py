"""Drives a workload against a target on a schedule and records every request.

Order of events: `run_benchmark` opens one aiohttp session, sends the warm-up sessions'
first turns (their own prompts, not recorded), starts the clock, then either (open loop)
starts each session at its arrival time, waiting for one of `max_concurrency` slots when a
cap is set, or (closed loop) keeps `max_concurrency` workers that each start the next
session as soon as their previous one ends. Within a session, turn k+1 is meant to be sent
`think_time_s` after turn k's answer. With `duration_s`, no session starts after that many
seconds (a started one runs to its end).

Fail fast: when the first `abort_after_failures` measured requests to finish, or all the
warm-up requests, failed, the run stops and `BenchAborted` carries the first error (a wrong
model's 404, a server that is not there): a broken setup costs seconds, not a schedule.

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


DEFAULT_ABORT_AFTER_FAILURES = 10
# Idle pooled connections are dropped after this (s): below uvicorn's default keep-alive (5 s),
# after which servers built on it close an idle connection, so the load never reuses one the
# server is closing at that instant, which fails the request with "Server disconnected"
# (aiohttp's own default keeps them 15 s).
CLIENT_KEEPALIVE_S = 4.0


@dataclass(frozen=True)
class RunConfig:
    arrival: ArrivalConfig
    max_concurrency: int | None = None  # in-flight cap (required for the closed loop)
    num_warmup: int = 0  # requests sent before the clock starts, not recorded
    show_progress: bool = True
    request_id_prefix: str = "bench"
    duration_s: float | None = None  # no session starts after this many seconds; None: all
    # Stop when the first this-many finished requests all failed (0: never).
    abort_after_failures: int = DEFAULT_ABORT_AFTER_FAILURES

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.arrival.kind == "closed" and self.max_concurrency is None:
            raise ValueError("--arrival closed needs --max-concurrency N (the number of users)")
        if self.num_warmup < 0:
            raise ValueError(f"--num-warmup must be >= 0, got {self.num_warmup}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"--duration-s must be > 0 seconds, got {self.duration_s}")
        if self.abort_after_failures < 0:
            raise ValueError(
                f"--abort-after-failures must be >= 0 (0: never), got {self.abort_after_failures}"
            )


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # clock start to the end of the last response
    started_at: str  # wall-clock ISO time of the clock start
    num_sessions_not_started: int = 0  # sessions left when --duration-s ran out


class BenchAborted(RuntimeError):
    """The first requests all failed; the message is the first error (the server's own)."""


class _FailFast:
    """Watches the first `limit` finished requests; all failed -> abort with the first error."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.num_seen = 0
        self.num_failed = 0
        self.first_error: str | None = None
        self.tasks: list[asyncio.Future[list[RequestRecord]]] = []

    def saw(self, rec: RequestRecord) -> None:
        if not self.limit or self.num_seen >= self.limit:
            return
        self.num_seen += 1
        if rec.is_success:
            return
        self.num_failed += 1
        self.first_error = self.first_error or rec.error
        if self.num_failed == self.limit:
            for task in self.tasks:
                task.cancel()

    @property
    def has_aborted(self) -> bool:
        return bool(self.limit) and self.num_failed >= self.limit

    def error(self) -> BenchAborted:
        return BenchAborted(
            f"the first {self.limit} requests all failed; the first error: {self.first_error}"
        )


@dataclass
class _Ctx:
    http: aiohttp.ClientSession
    target: TargetConfig
    cfg: RunConfig
    clock: Callable[[], float]
    slots: asyncio.Semaphore | None
    on_done: Callable[[], None]
    fail_fast: _FailFast


def _new_record(ctx: _Ctx, session: Session, k: int, intended_s: float) -> RequestRecord:
    turn = session.turns[k]
    return RequestRecord(
        request_id=f"{ctx.cfg.request_id_prefix}-{session.session_id}-{k}",
        session_id=session.session_id,
        turn_index=k,
        max_tokens=turn.max_tokens,
        num_expected_prompt_tokens=turn.num_prompt_tokens,
        intended_send_s=intended_s,
        num_shared_prefix_tokens=turn.num_shared_prefix_tokens,
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
        if k:  # the history: the previous turn's prompt and answer
            prev = records[k - 1]
            rec.num_shared_prefix_tokens = (prev.num_prompt_tokens or 0) + (
                prev.num_output_tokens or 0
            )
        delay = intended - ctx.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await _send_turn(ctx, rec, build_body(ctx.target, session, k, history))
        history.append((turn.text or "", rec.generated_text))
        ctx.fail_fast.saw(rec)
        ctx.on_done()
    return records


async def _closed_worker(
    ctx: _Ctx, queue: list[Session], start_delay_s: float
) -> list[RequestRecord]:
    await asyncio.sleep(start_delay_s)
    records: list[RequestRecord] = []
    deadline = ctx.cfg.duration_s
    while queue and (deadline is None or ctx.clock() < deadline):
        session = queue.pop(0)
        records += await _run_session(ctx, session, ctx.clock())
    return records


async def _warmup(ctx: _Ctx, sessions: list[Session]) -> None:
    """The first turn of each warm-up session, at most max_concurrency at a time."""
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
    if failed and len(failed) == len(done) and ctx.cfg.abort_after_failures:
        raise BenchAborted(f"all {len(done)} warm-up requests failed; the first error: {failed[0]}")
    if failed:
        logger.warning(
            "%d of %d warm-up requests failed, e.g. %s", len(failed), len(done), failed[0]
        )


def _start_times(cfg: RunConfig, sessions: list[Session]) -> np.ndarray:
    trace = (
        np.array([s.arrival_s or 0.0 for s in sessions]) if cfg.arrival.kind == "trace" else None
    )
    return arrival_times(cfg.arrival, len(sessions), trace)


async def _measured(ctx: _Ctx, sessions: list[Session]) -> list[list[RequestRecord]]:
    """Every session of the measured run, on its schedule or by the closed-loop workers."""
    cfg = ctx.cfg
    if cfg.arrival.kind == "closed":
        queue = list(sessions)
        delays = closed_loop_start_delays(cfg.max_concurrency or 1, cfg.arrival.ramp_up_s)
        coros = [_closed_worker(ctx, queue, d) for d in delays]
    else:
        if cfg.max_concurrency:
            ctx.slots = asyncio.Semaphore(cfg.max_concurrency)
        starts = _start_times(cfg, sessions)
        limit = np.inf if cfg.duration_s is None else cfg.duration_s
        coros = [
            _run_session(ctx, s, float(t))
            for s, t in zip(sessions, starts, strict=True)
            if t < limit
        ]
    ctx.fail_fast.tasks = [asyncio.ensure_future(c) for c in coros]
    groups = await asyncio.gather(*ctx.fail_fast.tasks, return_exceptions=True)
    if ctx.fail_fast.has_aborted:
        raise ctx.fail_fast.error()
    for group in groups:
        if isinstance(group, BaseException):
            raise group
    return [g for g in groups if not isinstance(g, BaseException)]


async def _run(
    target: TargetConfig, cfg: RunConfig, sessions: list[Session], warmup: list[Session]
) -> RunResult:
    total = sum(len(s.turns) for s in sessions)
    connector = aiohttp.TCPConnector(
        limit=cfg.max_concurrency or 0, keepalive_timeout=CLIENT_KEEPALIVE_S
    )
    async with aiohttp.ClientSession(connector=connector) as http:
        progress = _Progress(total, cfg.show_progress)
        fail_fast = _FailFast(cfg.abort_after_failures)
        ctx = _Ctx(http, target, cfg, time.perf_counter, None, progress.advance, fail_fast)
        if warmup:
            await _warmup(ctx, warmup)
        t0 = time.perf_counter()
        ctx.clock = lambda: time.perf_counter() - t0
        started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with progress:
            groups = await _measured(ctx, sessions)
        records = [r for g in groups for r in g]
        ends = [r.response_end_s for r in records if r.response_end_s is not None]
        num_started = len({r.session_id for r in records})
        return RunResult(
            records, max(ends, default=ctx.clock()), started_at, len(sessions) - num_started
        )


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


def run_benchmark(
    target: TargetConfig,
    cfg: RunConfig,
    sessions: list[Session],
    warmup: list[Session] | None = None,
) -> RunResult:
    """Run the warm-up sessions' first turns (unrecorded), then the sessions against the
    target (blocking), and return every request's record. Raises `BenchAborted` (fail fast)."""
    if not sessions:
        raise ValueError("the workload is empty; raise --num-requests")
    return asyncio.run(_run(target, cfg, sessions, warmup or []))
