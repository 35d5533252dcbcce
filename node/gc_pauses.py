"""GcPauses: the process's garbage-collection pauses by generation, since it was made.

A collection stops every thread of the process (the engine thread and the event loop
alike, whichever triggered it), so in a node each pause lands in the steps of every
request in flight. One `GcPauses` per node process (node/runtime.py) times every
collection through `gc.callbacks`; the node's Stats answer carries the totals in its
extra map (node/rpcs.py: `gc_collections_<generation>` and `gc_pause_s_<generation>`,
protocol/messages.py LABELLED_COUNTERS) and the router exports them per node, so that a
serving run says how much of it the node spent collecting. `benchmarks/engine_load.py`
reads the same pauses one by one (`pauses`, with the longest).

The callbacks run on the thread that collects, under the GIL; `totals` may be read from
any thread.
"""

from __future__ import annotations

import gc
import time
from typing import Any

GENERATIONS = (0, 1, 2)


class GcPauses:
    def __init__(self, keep_each: bool = False) -> None:
        """With `keep_each`, every pause is also kept in `pauses` (generation, seconds)."""
        self._started = 0.0
        self._num = [0] * len(GENERATIONS)
        self._seconds = [0.0] * len(GENERATIONS)
        self._keep_each = keep_each
        self.pauses: list[tuple[int, float]] = []
        gc.callbacks.append(self._callback)

    def close(self) -> None:
        """Stop timing collections."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        seconds = time.perf_counter() - self._started
        self._num[generation] += 1
        self._seconds[generation] += seconds
        if self._keep_each:
            self.pauses.append((generation, seconds))

    def totals(self) -> dict[str, float]:
        """`gc_collections_<g>` and `gc_pause_s_<g>` for every generation g, since start:
        the Stats extra map's entries."""
        out: dict[str, float] = {}
        for g in GENERATIONS:
            out[f"gc_collections_{g}"] = float(self._num[g])
            out[f"gc_pause_s_{g}"] = self._seconds[g]
        return out
