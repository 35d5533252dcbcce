"""`benchmarks/sampler_draw.py` on the CPU (the fused draw in Triton's interpreter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module", autouse=True)
def _interpreted(triton_interpreter) -> None:
    """The benchmark imports the kernels lazily, under the interpreter (see conftest)."""


def test_smoke_run_times_both_draws_per_row_count(tmp_path: Path) -> None:
    from splitserve.benchmarks.sampler_draw import main

    out = tmp_path / "draw.json"
    assert main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [case["rows"] for case in result["cases"]] == [1, 3]
    keys = {"torch_device_ms", "fused_device_ms", "torch_wall_ms", "fused_wall_ms"}
    assert all(keys <= set(case) and all(case[k] > 0 for k in keys) for case in result["cases"])
    assert {"command", "git_commit", "device", "date"} <= set(result)


def test_bad_arguments_are_errors(capsys) -> None:
    from splitserve.benchmarks.sampler_draw import main

    for rows in ("4,x", "0"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--device", "cpu", "--rows", rows])
        assert exit_info.value.code == 2
        assert "comma-separated list of positive integers" in capsys.readouterr().err
    assert main(["--device", "cpu", "--vocab", "0"]) == 2
    assert "--vocab must be at least 1" in capsys.readouterr().err
