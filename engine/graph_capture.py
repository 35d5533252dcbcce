"""Python's cyclic garbage collector around CUDA graph capture.

A capture fails as a whole if any CUDA call that is not allowed while a stream captures
runs in the process meanwhile: destroying an older graph is one. An automatic collection
that finds such a graph in unreachable cycles (an engine built before this one, in the same
process) runs its destructor in the middle of the capture, and the capture ends with
"operation failed due to a previous error during capture". So the capture code collects
first and keeps the collector off until its last graph is captured.

Who calls what: `DecodeGraphs.capture` (engine/cuda_graphs.py) and
`PiecewiseGraphs.capture` (engine/piecewise_graphs.py) wrap their capture loops in
`collector_paused()`.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Collect the garbage there is now, then run the block with automatic collection off;
    the collector is left as it was found (off stays off)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
