"""The split-launch tiles benchmark (benchmarks/split_tiles.py) on the CPU: its smoke run
under the Triton interpreter gives every launch's row, each split launch's output equal to
the unsplit one's, and its arguments are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitserve.benchmarks import split_tiles


def test_a_smoke_run_times_every_launch_against_the_unsplit_one(
    triton_interpreter, tmp_path: Path
) -> None:
    out = tmp_path / "split_tiles.json"
    argv = ["--smoke", "--rests", "3,20", "--context", "70", "--configs", "16x16x4,32x16x4"]
    split_tiles.main([*argv, "--splits", "2,3", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["git_commit"] and result["device"]
    assert [(r["rest"], r["num_splits"]) for r in rows] == [
        (rest, s) for rest in (3, 20) for s in (1, 2, 3, 2, 3)
    ]
    assert all(r["max_abs_diff"] < 1e-4 and r["us"] > 0 for r in rows), rows


@pytest.mark.parametrize(
    "argv",
    [["--splits", "1,2"], ["--rests", "4096"], ["--rests", "0"], ["--configs", "64x64"]],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        split_tiles.parse_args(["--smoke", *argv])
