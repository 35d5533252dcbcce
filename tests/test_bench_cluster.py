"""`splitserve bench` against `splitserve up` (Redis, router, one prefill and one decode node
as processes, the tiny llama on CPU, prefix caching on): a sweep sends fresh prompts at every
load point and in its warm-up, so the server's prefix cache serves almost none of them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.launch.processes import ManagedProcess

pytestmark = pytest.mark.slow  # starts `splitserve up` clusters

MODEL = "tiny"


@pytest.fixture(scope="module")
def up(tiny_llama: Path):
    proc = ManagedProcess.splitserve(
        "up",
        "up",
        "--model",
        str(tiny_llama),
        "--served-model-name",
        MODEL,
        "--port",
        "0",
        "--cpu",
        "--node-arg=--dtype=float32",
        ready_pattern=re.compile(r"OpenAI API: (\S+)/v1"),
    ).start(timeout_s=240)
    yield proc.address
    assert proc.stop(timeout_s=60) == 0


def bench(*argv: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "splitserve.launch.cli", "bench", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400)


def cached_fraction(run_dir: Path) -> float:
    """Prompt tokens the server served from its cache / all prompt tokens, from usage."""
    rows = [json.loads(x) for x in (run_dir / "requests.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["error"] is None]
    assert ok and all(r["num_cached_tokens"] is not None for r in ok)
    return sum(r["num_cached_tokens"] for r in ok) / sum(r["num_prompt_tokens"] for r in ok)


def test_sweep_sends_fresh_prompts_at_every_point(up: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    done = bench(
        "sweep", "--url", up, "--model", MODEL, "--workload", "random",
        "--input-len", "64", "--output-len", "4", "--num-requests", "12",
        "--num-warmup", "4", "--rates", "4,8,16", "--seed", "0",
        "--slo", "ttft=10s", "--output-dir", str(out), "--no-progress", "--no-plots",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for rate in ("4", "8", "16"):
        point = out / f"rate-{rate}"
        fraction = cached_fraction(point)
        assert fraction < 0.05, f"rate {rate}: {fraction:.0%} of prompt tokens came from cache"
        summary = json.loads((point / "summary.json").read_text())
        assert summary["prefix_cache"]["cached_fraction"] == pytest.approx(fraction)
        assert summary["prefix_cache"]["source"] == "usage"
        assert summary["prefix_cache"]["is_above_workload"] is False


def test_reused_prompts_are_served_from_cache_and_warned_about(up: str, tmp_path: Path) -> None:
    out = tmp_path / "reuse"
    done = bench(
        "sweep", "--url", up, "--model", MODEL, "--workload", "random",
        "--input-len", "64", "--output-len", "4", "--num-requests", "8",
        "--rates", "8,16", "--seed", "1", "--reuse-prompts",
        "--output-dir", str(out), "--no-progress", "--no-plots",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert cached_fraction(out / "rate-16") > 0.5  # the second point resent the first's prompts
    summary = json.loads((out / "rate-16" / "summary.json").read_text())
    assert summary["prefix_cache"]["is_above_workload"] is True
    assert any("cache" in w for w in summary["warnings"])
    assert "WARNING" in done.stdout and "from the server's prefix cache" in done.stdout


def test_wrong_model_stops_at_once_with_the_routers_404(up: str, tmp_path: Path) -> None:
    done = bench(
        "run", "--url", up, "--model", "nosuch", "--num-requests", "200", "--rate", "10",
        "--input-len", "16", "--output-len", "4", "--output-dir", str(tmp_path),
        "--no-progress",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the first 10 requests all failed; the first error: HTTP 404" in done.stderr
    assert "nosuch" in done.stderr  # the router's own message names the model
    assert not (tmp_path / "summary.json").exists()  # stopped long before 200 requests
