"""The start-up heap, moved out of the garbage collector's reach.

A node's process allocates most of its long-lived objects while it starts: the model's
modules and parameters, the KV pool, the captured graphs, the tokenizer, gRPC and Redis
clients. Every collection of the oldest generation walks all of them again, a pause of the
engine thread (and of the event loop) that grows with the heap. `freeze_startup_heap`
collects once and then freezes what survives (`gc.freeze`: the permanent generation, never
scanned, never freed by the collector; objects freed by reference counting still are), as
vLLM's engine core does after it starts.

Who calls it: `launch/node_cmd.py` (a node's process), once the node serves;
`benchmarks/engine_load.py --freeze-startup-heap`, to measure it. Not the engine itself: a
process that builds and drops engines (the tests) must keep them collectable.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect, then freeze every object that survives; returns how many were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("start-up heap frozen: %d objects out of the collector's reach", frozen)
    return frozen
