"""Overlapped output processing: the next step's forward pass is launched before this
step's tokens are detokenized, so the host's output work runs while the GPU computes.

EngineCore holds at most one `LaunchedStep`: `launch` schedules and launches it (after
this step's tokens were appended), the next `step()` consumes it through `trim`, which
drops the chunks of requests that finished since the launch (aborted, or ended by a stop
string: one more token was computed for them and is dropped). A request finished while a
launched step may still write its blocks waits for that step on the device (`wait`) before
its blocks are freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.request import RequestId
from splitserve.engine.scheduler import Scheduler, SchedulerOutput


@dataclass(eq=False)
class LaunchedStep:
    """A step whose forward pass was launched and not yet consumed by `step()`."""

    sched: SchedulerOutput
    logits: torch.Tensor
    # Requests in it that are still unfinished.
    request_ids: set[RequestId]
    done: torch.cuda.Event | None

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None

    def release(self, request_id: RequestId) -> LaunchedStep | None:
        """`request_id` finishes: wait for the device when this step may still write its
        blocks. Returns the step, or None when nothing is left in it to consume."""
        if request_id not in self.request_ids:
            return self
        self.wait()
        self.request_ids.discard(request_id)
        return self if self.request_ids else None


def launch(scheduler: Scheduler, runner: ModelRunner, device: torch.device) -> LaunchedStep | None:
    """Schedule the next step and launch its forward pass; None when nothing is runnable."""
    with record_function("step.schedule"):
        sched = scheduler.schedule()
    if sched.is_empty:
        return None
    with record_function("step.model"):
        logits = runner.execute(sched.chunks)
    done = None
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
    ids = {c.request.request_id for c in sched.chunks}
    return LaunchedStep(sched, logits, ids, done)


def trim(launched: LaunchedStep) -> tuple[SchedulerOutput, torch.Tensor]:
    """The launched step, less the chunks of requests that finished since its launch."""
    sched, logits = launched.sched, launched.logits
    if all(not c.request.is_finished for c in sched.chunks):
        return sched, logits
    keep = [c for c in sched.chunks if not c.request.is_finished]
    sampling = [c for c in sched.chunks if c.samples]
    rows = [i for i, c in enumerate(sampling) if not c.request.is_finished]
    index = torch.tensor(rows, dtype=torch.int64).to(logits.device)
    return SchedulerOutput(keep, sched.preempted), logits[index]
