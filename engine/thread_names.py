"""Names of OS threads (Linux `comm`: /proc/PID/task/TID/comm, `top -H`,
benchmarks/thread_cpu.py), so that per-thread CPU can be told apart: Python 3.11 names
only its own Thread objects, and a thread that native code starts takes the name of the
thread that started it.

`name_native_thread(name)` names the calling thread; `native_thread_name(name)` names it
for a `with` block (threads started meanwhile, such as a library's progress thread, keep
the name) and then restores the old one. Elsewhere than Linux both do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)
_PR_SET_NAME = 15
_MAX_NAME_BYTES = 15


def name_native_thread(name: str) -> None:
    """Name the calling thread in the OS (at most 15 bytes are kept)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NAME, name.encode()[:_MAX_NAME_BYTES], 0, 0, 0) != 0:
        logger.warning("could not name thread %r in the OS: errno %d", name, ctypes.get_errno())


def native_thread_name_of_caller() -> str:
    """The calling thread's OS name ("" elsewhere than Linux)."""
    if not sys.platform.startswith("linux"):
        return ""
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().rstrip("\n")


@contextlib.contextmanager
def native_thread_name(name: str) -> Iterator[None]:
    """The calling thread is `name` inside the block, its old name after it."""
    old = native_thread_name_of_caller()
    name_native_thread(name)
    try:
        yield
    finally:
        if old:
            name_native_thread(old)
