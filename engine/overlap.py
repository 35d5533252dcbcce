"""Overlapped steps: the next step is scheduled and launched before this step's tokens
reach the host, so the device never waits for the host between two steps.

With overlap on, one `EngineCore.step()` call, for the step k launched by the call before:

    consume k (`trim`)       drop the chunks of requests that finished since its launch
    sample k                 queued on the device, not read back
    launch_ahead             every request that sampled in k gets a pending token (it counts
                             in `num_tokens`, its id is unknown); k+1 is scheduled and its
                             forward pass launched, with the pending ids read on the device
                             from k's draws (`PendingTokens`)
    collect k                wait for k's tokens, append them in place of the pending ones
    outputs                  detokenize, check stops, finish requests; retire k

A request whose step-k token reaches its length gets no pending token and no row in k+1.
One that ends on its step-k token otherwise (eos, a stop id or string, a grammar) has one
more row computed in k+1, which `trim` drops. A request that finishes while a launched
step still holds its chunk does not wait for the device: its blocks are kept
(`Scheduler.finish(hold=True)`) and freed when that step retires (`retire`: its tokens were
read, or the device reached its event). Only a KV connector's own hold (a transfer may
touch the blocks) waits for the device first, as it did without overlap.

EngineCore holds at most one `LaunchedStep` in flight. A request preempted while k+1 is
scheduled keeps its pending token until k's tokens arrive; it is never scheduled before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from splitserve.engine.model_runner import ModelRunner, PendingTokens
from splitserve.engine.request import Request, RequestId, RequestStatus
from splitserve.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from splitserve.kernels.device_copy import to_device


@dataclass(eq=False)
class LaunchedStep:
    """A step whose forward pass was launched and not yet retired."""

    sched: SchedulerOutput
    logits: torch.Tensor
    # Requests in it that are still unfinished.
    request_ids: set[RequestId]
    done: torch.cuda.Event | None
    # Finished requests whose blocks wait for this step to retire.
    deferred: list[RequestId] = field(default_factory=list)

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None

    def holds(self, request_id: RequestId) -> bool:
        return request_id in self.request_ids

    def release(self, request_id: RequestId, wait: bool) -> None:
        """`request_id` finishes: its chunk is dropped. With `wait` the device finishes
        this step first, else its blocks are freed when the step retires."""
        if wait:
            self.wait()
        else:
            self.deferred.append(request_id)
        self.request_ids.discard(request_id)

    @property
    def is_empty(self) -> bool:
        return not self.request_ids


def launch(
    scheduler: Scheduler,
    runner: ModelRunner,
    device: torch.device,
    pending: PendingTokens | None = None,
    skip: frozenset[RequestId] = frozenset(),
) -> LaunchedStep | None:
    """Schedule the next step (without the requests in `skip`) and launch its forward
    pass; None when nothing is runnable."""
    with record_function("step.schedule"):
        sched = scheduler.schedule(skip)
    if sched.is_empty:
        return None
    with record_function("step.model"):
        logits = runner.execute(sched.chunks, pending)
    done = None
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
    ids = {c.request.request_id for c in sched.chunks}
    return LaunchedStep(sched, logits, ids, done)


def launch_ahead(
    scheduler: Scheduler,
    runner: ModelRunner,
    device: torch.device,
    sampling: list[ScheduledChunk],
    token_ids: torch.Tensor | None,
) -> LaunchedStep | None:
    """Launch the next step before `token_ids` (one per sampling chunk, on the device;
    None when nothing sampled) are read: each sampling request gets a pending token that
    the next step reads there, but for those that reach their length with it (they end
    on it whatever it is, and are left out of the next step)."""
    if token_ids is None:
        return launch(scheduler, runner, device)
    rows: dict[RequestId, int] = {}
    ending: set[RequestId] = set()
    for row, chunk in enumerate(sampling):
        request = chunk.request
        if request.num_output_tokens + 1 >= request.max_new_tokens:
            ending.add(request.request_id)
        else:
            request.num_pending_tokens += 1
            rows[request.request_id] = row
    pending = PendingTokens(token_ids, rows)
    return launch(scheduler, runner, device, pending, frozenset(ending))


def trim(launched: LaunchedStep) -> tuple[SchedulerOutput, torch.Tensor]:
    """The launched step, less the chunks of requests that finished since its launch."""
    sched, logits = launched.sched, launched.logits
    if all(not c.request.is_finished for c in sched.chunks):
        return sched, logits
    keep = [c for c in sched.chunks if not c.request.is_finished]
    sampling = [c for c in sched.chunks if c.samples]
    rows = [i for i, c in enumerate(sampling) if not c.request.is_finished]
    index = to_device(rows, torch.int64, logits.device)
    return SchedulerOutput(keep, sched.preempted), logits[index]


def retire(launched: LaunchedStep | None, scheduler: Scheduler) -> None:
    """The step is done with (its outputs read): free the blocks that waited for it."""
    if launched is None or not launched.deferred:
        return
    launched.wait()
    for request_id in launched.deferred:
        scheduler.release_held(request_id)
    launched.deferred.clear()


def finish_request(
    scheduler: Scheduler,
    launched: LaunchedStep | None,
    request: Request,
    status: RequestStatus,
    hold: bool,
) -> LaunchedStep | None:
    """`Scheduler.finish` for a request that may have a chunk in the launched step (whose
    forward pass may still write its blocks): its blocks are held until that step
    retires, or, when the connector `hold`s them anyway, the device finishes the step
    first. Returns what is left of the launched step (None when nothing is)."""
    in_flight = launched is not None and launched.holds(request.request_id)
    scheduler.finish(request, status, hold=hold or in_flight)
    if launched is None or not in_flight:
        return launched
    launched.release(request.request_id, wait=hold)
    if not launched.is_empty:
        return launched
    retire(launched, scheduler)
    return None
