"""Launch probes over a stretch of a serving node's steps (`--launch-lag-s`, CUDA only).

The engine alone under a load (`benchmarks/engine_load.py --launch-lag-s`) says where a
forward pass leaves the device waiting for the host; this says it of the node as it
serves, with its event loop and gRPC server in the engine's process. `--launch-lag-after-s`
seconds after the node started serving, the probes (engine/launch_probes.py) record
`--launch-lag-s` seconds of steps; their summary (`LagWindow.summary`: per kind of forward
pass, how many found the device drained at their start, medians and means of host launch
time, device time and the host's lead, each interval's mean device ms) is logged and, with
`--launch-lag-out PATH`, written there as JSON. Starting and stopping the probes
synchronise the device once each; in between each probe costs an event and a clock read.

Who calls what, all on the engine thread: the node runtime runs `install(core)` once it
serves (engine.run), then `tick(core)` before every step (a step hook); the tick that
finds the window done writes the summary. `finish(core)` at the node's stop writes what a
window cut short holds.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitserve.engine.launch_probes import LagWindow, LaunchProbes

if TYPE_CHECKING:
    from splitserve.engine.core import EngineCore

logger = logging.getLogger(__name__)


class NodeLaunchLag:
    def __init__(self, after_s: float, length_s: float, out_path: str = "") -> None:
        """`after_s` and `length_s` as NodeConfig checked them (the runtime builds one only
        for a window: `length_s` > 0)."""
        if length_s <= 0:
            raise ValueError(f"--launch-lag-s must be > 0 for a window, got {length_s}")
        self.after_s, self.length_s, self.out_path = after_s, length_s, out_path
        self._window: LagWindow | None = None
        self._started = 0.0
        self._written = False

    def install(self, core: EngineCore) -> None:
        """Probe the engine's runner and layers (engine thread; CUDA only)."""
        if core.device.type != "cuda":
            raise ValueError(
                "--launch-lag-s records CUDA events: it needs a node on a CUDA device "
                "(leave it out on the CPU)"
            )
        probes = LaunchProbes()
        probes.install(core.runner, list(core.model.model.layers))
        self.watch(LagWindow(probes, self.after_s, self.length_s))

    def watch(self, window: LagWindow) -> None:
        """Tick `window` from now on (`install` gives it the node's probes)."""
        self._window = window
        self._started = time.monotonic()

    def tick(self, core: EngineCore) -> bool:
        """Step hook: move the window on; write its summary once it is done."""
        window = self._window
        if window is None or self._written:
            return False
        window.tick(time.monotonic() - self._started)
        if window.is_done:
            self._write(window.summary())
        return False

    def finish(self, core: EngineCore) -> None:
        """At stop: write what a window that began holds, if not written yet."""
        if self._window is not None and not self._written:
            summary = self._window.summary()
            if summary is not None:
                self._write(summary)

    def _write(self, summary: dict[str, Any] | None) -> None:
        self._written = True
        logger.info("launch lag over %.0f s of steps: %s", self.length_s, summary)
        if self.out_path:
            path = Path(self.out_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2) + "\n")
