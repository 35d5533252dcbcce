"""Run a command that gets SIGTERM when the process that started it dies (Linux).

    python -m splitserve.launch.die_with_parent <parent pid> <command> [args...]

Sets the parent-death signal (prctl PR_SET_PDEATHSIG, which survives exec), exits at once
if the parent is already gone, then execs the command in place (same pid). The launcher
(launch/processes.py) wraps every child in it: setting the signal in the child itself,
rather than in a preexec_fn, runs no Python at-fork hooks in the forked child (gRPC's break
it in a parent that uses gRPC) and works for any command, redis-server included.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """`sig` to this process when its parent dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, sig) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def wrap(command: list[str]) -> list[str]:
    """`command`, run so that it dies with this process."""
    return [sys.executable, "-m", "splitserve.launch.die_with_parent", str(os.getpid()), *command]


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m splitserve.launch.die_with_parent PARENT_PID COMMAND [ARGS...]")
    set_parent_death_signal()
    if os.getppid() != int(sys.argv[1]):
        sys.exit(0)  # the parent died before the signal was set: nothing to serve
    os.execvp(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
