"""The router-overhead benchmark on the CPU: a real redis-server, decode node and router,
each its own process; every stream's tokens arrive and the router's CPU time is read."""

from __future__ import annotations

import json
import os
from pathlib import Path

from splitserve.benchmarks.router_overhead import cpu_seconds, main


def test_cpu_seconds_reads_a_process_cpu_time() -> None:
    before = cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))
    assert cpu_seconds(os.getpid()) > before


def test_every_frame_is_counted_and_costed(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "router.json"
    argv = ["--model", str(tiny_llama), "--streams", "4", "--tokens", "8", "--runs", "2"]
    result = main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["runs"] == result["runs"]
    assert [r["tokens"] for r in result["runs"]] == [4 * 8, 4 * 8]
    assert all(4 <= r["frames"] <= 4 * 8 for r in result["runs"])  # coalesced when behind
    assert all(r["router_cpu_s"] >= 0 for r in result["runs"])
    assert result["router_cpu_us_per_token_median"] >= 0 and result["git_commit"]
