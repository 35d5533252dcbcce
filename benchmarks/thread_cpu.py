"""CPU time per thread of running splitserve processes, sampled while a load runs.

    python -m splitserve.benchmarks.thread_cpu --match router --match decode \
        [--interval-s 5] [--duration-s 600] [--out threads.jsonl]

Every `--interval-s` it finds the processes whose command line mentions `--program`
(`splitserve` by default) and holds one `--match` word as an argument (the `up` command's
children: `python -m splitserve router ...`, `python -m splitserve decode ...`), and
their children (`vllm serve`'s engine process), reads each thread's user + system time from
/proc/PID/task/TID/stat, and writes one JSON line per process and interval: the
process's CPU (cores busy: 1.0 is one core the whole interval) and its busiest threads,
named by /proc's `comm` (the engine thread is "engine-loop", the NIXL agent's threads
"kv-transfer", engine/thread_names.py; gRPC's threads name themselves; the main thread,
whose TID is the PID, runs the event loop). A process's Python threads share one GIL,
but a thread waiting for the device in CUDA's spin-wait counts as busy without holding it:
read a sum near 1.0 over the Python threads as a hint, not as proof, that the interpreter
bounds the process. Linux only; stops after `--duration-s` or on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)
_TOP_THREADS = 6


def _fields_after_comm(stat: str) -> list[str]:
    """A /proc stat line's fields after `(comm)` (which may hold spaces): state, ppid, ..."""
    return stat.rsplit(")", 1)[1].split()


def read_cpu_stat(path: str) -> tuple[str, float]:
    """(comm, user + system CPU seconds) from a /proc stat file: a process's
    (/proc/PID/stat) or one thread's (/proc/PID/task/TID/stat)."""
    stat = Path(path).read_text()
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = _fields_after_comm(stat)
    return comm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[int, tuple[str, float]]:
    """TID -> (comm, user + system CPU seconds) of every thread of `pid`; {} once it exited."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return {}
    for name in tids:
        try:
            out[int(name)] = read_cpu_stat(f"/proc/{pid}/task/{name}/stat")
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between the listing and the read
    return out


def find_processes(words: list[str], program: str = "splitserve") -> dict[int, str]:
    """PID -> role of the processes whose argv mentions `program` and holds one of `words`
    as an argument (role: that word), and of their children (role: "<word>/child", e.g.
    an engine process started by multiprocessing)."""
    found: dict[int, str] = {}
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        parents[int(entry)] = int(_fields_after_comm(stat)[1])
        args = [a.decode(errors="replace") for a in argv if a]
        word = next((w for w in words if w in args), None)
        if word is not None and any(program in a for a in args):
            found[int(entry)] = word
    for pid, parent in parents.items():
        if pid not in found and parent in found and "/" not in found[parent]:
            found[pid] = found[parent] + "/child"
    return found


def interval_record(
    pid: int, role: str, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
    seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """One process's CPU over an interval: in all, and its busiest threads."""
    busy: list[dict[str, Any]] = []
    for tid, (comm, cpu) in after.items():
        used = cpu - before[tid][1] if tid in before else 0.0  # a new thread: next time
        busy.append({"tid": tid, "comm": comm, "main": tid == pid, "cores": used / seconds})
    busy.sort(key=lambda t: -float(t["cores"]))
    return {
        "time": time.time(),
        "pid": pid,
        "role": role,
        "interval_s": seconds,
        "cores": sum(t["cores"] for t in busy),
        "threads": busy[:_TOP_THREADS],
    }


def sample(
    words: list[str], interval_s: float, duration_s: float, out: TextIO, program: str = "splitserve"
) -> int:
    """Write interval records until `duration_s` passed; returns how many were written."""
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    deadline = time.monotonic() + duration_s
    previous: dict[int, tuple[str, dict[int, tuple[str, float]], float]] = {}
    written = 0
    while not stopping and time.monotonic() < deadline:
        now = time.monotonic()
        current = {}
        for pid, role in find_processes(words, program).items():
            times = thread_times(pid)
            if not times:
                continue
            current[pid] = (role, times, now)
            if pid in previous:
                _, before, then = previous[pid]
                record = interval_record(pid, role, before, times, now - then)
                out.write(json.dumps(record) + "\n")
                written += 1
        out.flush()
        previous = current
        time.sleep(max(0.0, min(interval_s, deadline - time.monotonic())))
    return written


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", action="append", required=True, help="argv word, e.g. decode")
    parser.add_argument(
        "--program",
        default="splitserve",
        help="word the processes' argv mentions (vllm: its server)",
    )
    parser.add_argument("--interval-s", type=float, default=5.0)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--out", help="JSON lines file (default: stdout)")
    args = parser.parse_args(argv)
    if args.interval_s <= 0 or args.duration_s <= 0:
        parser.error("--interval-s and --duration-s must be > 0")
    if not Path("/proc/self/task").exists():
        parser.error("reads /proc/PID/task: Linux only")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as out:
            written = sample(args.match, args.interval_s, args.duration_s, out, args.program)
    else:
        written = sample(args.match, args.interval_s, args.duration_s, sys.stdout, args.program)
    logger.info("wrote %d interval records", written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
