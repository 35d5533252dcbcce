"""Child processes of a local cluster: start, wait for their ready line, stop.

`splitserve up` and the end-to-end tests start every node and the router as
`python -m splitserve.launch.cli ...` subprocesses and wait for the line each prints when
it serves; output goes on being read (and logged) by a thread, so a child never blocks
on a full pipe, and its last lines are kept for the report when it dies.

Every child runs in its own session and process group (a terminal's SIGHUP or Ctrl-C
reaches the parent only, which stops the children in order) and gets SIGTERM from the
kernel when the thread that started it dies (Linux parent-death signal, set by the
launch/die_with_parent.py wrapper), so a parent killed with SIGKILL orphans nothing. Start
children from a thread that lives as long as they do (the main thread): a child started
from a short-lived worker thread dies with the thread.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

from splitserve.launch import die_with_parent

logger = logging.getLogger(__name__)

# The line every splitserve server prints once it serves; group 1 is its address.
READY_PATTERN = re.compile(r"listening on (?:https?://)?(\S+)")


class ManagedProcess:
    """One child: `start()` returns once it printed `ready_pattern` (its match is kept)."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        ready_pattern: re.Pattern[str] = READY_PATTERN,
        env: dict[str, str] | None = None,
        drop_env: Sequence[str] = (),
    ) -> None:
        """`env` adds to (or replaces in) this process's environment; the variables named
        in `drop_env` are left out of the child's."""
        self.name = name
        self.args = list(args)
        self.ready_pattern = ready_pattern
        self.drop_env = tuple(drop_env)
        merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env = {k: v for k, v in merged.items() if k not in self.drop_env}
        self.match: re.Match[str] | None = None
        self.lines: deque[str] = deque(maxlen=200)
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @classmethod
    def splitserve(cls, name: str, *cli_args: str, **kwargs: object) -> ManagedProcess:
        return cls(name, [sys.executable, "-m", "splitserve.launch.cli", *cli_args], **kwargs)  # type: ignore[arg-type]

    @property
    def address(self) -> str:
        if self.match is None:
            raise RuntimeError(f"{self.name} is not ready")
        return self.match.group(1)

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._proc.pid

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def tail(self, num_lines: int = 20) -> str:
        """Its last output lines, for the report when it dies."""
        return "\n".join(list(self.lines)[-num_lines:])

    def fresh_copy(self) -> ManagedProcess:
        """An unstarted process with the same command (to restart a dead one)."""
        return ManagedProcess(self.name, self.args, self.ready_pattern, self.env, self.drop_env)

    def start(self, timeout_s: float = 120.0) -> ManagedProcess:
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> ManagedProcess:
        """Start the child without waiting (several start together: `wait_ready` each)."""
        self._proc = subprocess.Popen(
            die_with_parent.wrap(self.args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-out", daemon=True)
        self._reader.start()
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> ManagedProcess:
        """Until the ready line; a child that exits or stays silent is stopped and its
        output raised."""
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self.name} was not launched")
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.lines)
                self.stop()
                raise RuntimeError(f"{self.name} did not become ready; its output:\n{tail}")
        return self

    def _read(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        for raw in proc.stdout:
            line = raw.rstrip()
            self.lines.append(line)
            logger.debug("[%s] %s", self.name, line)
            if not self._ready.is_set():
                match = self.ready_pattern.search(line)
                if match:
                    self.match = match
                    self._ready.set()

    def signal(self, sig: int) -> None:
        if self.is_alive() and self._proc is not None:
            self._proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        self.terminate()
        return self.wait_stopped(timeout_s)

    def terminate(self) -> None:
        """SIGTERM without waiting (several stop together: `wait_stopped` each)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float = 15.0) -> int | None:
        """Until the child exits; SIGKILL after `timeout_s`. Returns the exit code."""
        if self._proc is None:
            return None
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored SIGTERM for %.0f s: killing it", self.name, timeout_s)
            self._proc.kill()
            self._proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        return self._proc.returncode
