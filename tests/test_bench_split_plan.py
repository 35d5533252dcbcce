"""benchmarks/split_plan.py on the CPU (--smoke): every split count and the plan's own run
through the real decode kernel (Triton's interpreter), and the result records them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def split_plan(triton_interpreter):
    from splitserve.benchmarks import split_plan

    return split_plan


def test_smoke_runs_every_count_and_the_plan(split_plan, tmp_path: Path) -> None:
    out = tmp_path / "split_plan.json"
    argv = ["--device", "cpu", "--smoke", "--ctx", "40", "--batches", "2", "--splits", "2,3"]
    split_plan.main([*argv, "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["ctx"], row["batch"]) == (40, 2)
    assert row["ran"] == sorted({2, 3, row["plan"]})
    assert row["fused_merge"] is True  # split plans merge inside the split kernel, as served
    split_plan.main([*argv, "--separate-merge", "--out", str(out)])
    assert json.loads(out.read_text())["rows"][0]["fused_merge"] is False


def test_timing_needs_a_gpu_unless_smoke(split_plan) -> None:
    with pytest.raises(SystemExit, match="--smoke"):
        split_plan.main(["--device", "cpu"])


def test_bad_lists_are_refused(split_plan) -> None:
    with pytest.raises(SystemExit):
        split_plan.main(["--device", "cpu", "--smoke", "--batches", "0,4"])
