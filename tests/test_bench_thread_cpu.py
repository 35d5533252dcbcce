"""benchmarks/thread_cpu.py: per-thread CPU of splitserve processes, from /proc."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from splitserve.benchmarks.thread_cpu import find_processes, sample
from splitserve.engine.async_engine import ENGINE_THREAD_NAME, AsyncEngine
from splitserve.engine.thread_names import native_thread_name, native_thread_name_of_caller

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux /proc")

# A stand-in "decode node": a thread named like the engine's burns CPU, the main thread idles.
_BUSY_CHILD = textwrap.dedent(
    """
    import subprocess, sys, threading, time
    from splitserve.engine.thread_names import name_native_thread
    helper = subprocess.Popen(["sleep", "60"])  # an engine process would be a child too
    def burn():
        name_native_thread("engine-loop")
        while True:
            pass
    threading.Thread(target=burn, daemon=True).start()
    print("ready", helper.pid, flush=True)
    time.sleep(60)
    """
)


def test_the_busiest_thread_of_a_matched_process_is_named_and_measured() -> None:
    helper = b""
    child = subprocess.Popen(
        [sys.executable, "-c", _BUSY_CHILD, "splitserve", "decode"], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        word, helper = child.stdout.readline().split()
        assert word == b"ready"
        found = find_processes(["decode"])
        assert found.get(child.pid) == "decode" and found.get(int(helper)) == "decode/child"
        out = io.StringIO()
        written = sample(["decode", "router"], interval_s=0.5, duration_s=1.8, out=out)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
    finally:
        if helper:
            os.kill(int(helper), signal.SIGKILL)
        child.kill()
        child.wait()
    mine = [r for r in records if r["pid"] == child.pid]
    assert written == len(records) and len(mine) >= 2
    for record in mine:
        busiest = record["threads"][0]
        assert busiest["comm"] == "engine-loop" and not busiest["main"]
        assert busiest["cores"] > 0.1  # the CI machine's two cores are shared with other tests
        assert record["cores"] >= busiest["cores"]


def test_the_engine_thread_carries_its_name_in_the_os() -> None:
    class IdleCore:
        def has_runnable(self) -> bool:
            return False

        def poll_connector(self) -> tuple[list[object], bool]:
            return [], False

    engine = AsyncEngine(None, IdleCore())  # type: ignore[arg-type]
    try:
        time.sleep(0.2)
        comms = {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}
    finally:
        engine.shutdown()
    assert ENGINE_THREAD_NAME in comms


def test_threads_started_inside_a_named_block_keep_its_name() -> None:
    """A library's own thread (NIXL's progress thread) takes the name of the thread that
    started it: the node starts the agent inside `native_thread_name("kv-transfer")`."""
    seen: list[str] = []

    def read_own_name() -> None:
        seen.append(native_thread_name_of_caller())

    before = native_thread_name_of_caller()
    with native_thread_name("kv-transfer"):
        inside = threading.Thread(target=read_own_name)
        inside.start()
        inside.join()
    after = threading.Thread(target=read_own_name)
    after.start()
    after.join()
    assert seen == ["kv-transfer", before]
    assert native_thread_name_of_caller() == before
