"""A second CUDA stream for a mixed step's decode rows, so that they are attended beside
the step's prefill rows instead of before them.

A step that carries prompt chunks and decode rows attends them with two kernels per
layer: the split-K decode kernel, bound by reading every decode row's pooled context, and
the prefill kernel (or torch's flash kernel for fresh prompts), bound by its math. On one
stream the second kernel starts only once the first one's last program has finished, and
the device idles through each kernel's tail. On two streams the device schedules the
programs of both as its multiprocessors free up.

Who calls what, per layer of a mixed step (`TritonPagedAttention.forward`, on the engine
thread): the K/V rows are stored on the current stream; `branch()` makes the side stream
wait for everything queued on the current one and makes the side stream current for the
decode kernel; the prefill kernel then runs on the current stream again; `join()` makes
the current stream wait for the side stream before anything after attention (the next
piece of the forward pass) runs.

Memory: the decode kernel's scratch (its partitions) is allocated while the side stream
is current, so torch's caching allocator hands those blocks only to later work of the
same stream. The tensors it reads and writes (q, the pool, the block tables, `out`) belong
to the current stream, which does not run past `join()` until the side stream is done
with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch


class DecodeBranch(Protocol):
    """What the attention backend needs from a side stream (tests pass a recording one)."""

    def branch(self) -> AbstractContextManager[None]: ...

    def join(self) -> None: ...


class SideStream:
    """One extra stream on a CUDA device (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"a side stream needs a CUDA device, got {device}")
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # Recorded again at every branch and join (`wait_stream` would make an event each
        # time): a wait holds the event's state when it was queued, so reuse is safe.
        self._forked = torch.cuda.Event()
        self._joined = torch.cuda.Event()

    @contextmanager
    def branch(self) -> Iterator[None]:
        """Run the body on the side stream, after all work queued so far on the current one."""
        self._forked.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(self._forked)
        with torch.cuda.stream(self.stream):
            yield

    def join(self) -> None:
        """The current stream waits for all work queued so far on the side stream."""
        self._joined.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(self._joined)
