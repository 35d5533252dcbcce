"""The decode-step and per-prompt costs fitted to a serving run's request records
(benchmarks/request_costs.py), on records built from known costs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from splitserve.benchmarks import request_costs, serving_report

DECODE_MS, PROMPT_MS = 500.0 / 255, 1000.0


def _records(
    num: int = 40, decode_ms: float = DECODE_MS, prompt_ms: float = PROMPT_MS, noise_ms: float = 0.0
) -> list[dict]:
    """First tokens one second apart; request i decodes across `i % 4` other first tokens,
    for 255 decode steps of `decode_ms` and `prompt_ms` for each of them (and, with
    `noise_ms`, a seeded normal error of that spread on its decode time)."""
    rng = np.random.default_rng(7)
    records = []
    for i in range(num):
        seen = i % 4 if i < num - 4 else 0
        decode_s = (255 * decode_ms + seen * prompt_ms + rng.normal(0.0, noise_ms)) / 1000.0
        records.append(
            {
                "request_id": f"r{i}",
                "first_event_s": float(i),
                "last_event_s": i + decode_s,
                "num_output_tokens": 256,
            }
        )
    return records


def test_the_fit_finds_the_costs_the_records_were_built_from() -> None:
    costs = request_costs.fit_costs(_records())
    assert costs is not None
    assert costs.decode_ms == pytest.approx(DECODE_MS) and costs.prompt_ms == pytest.approx(1000)
    assert costs.r2 == pytest.approx(1.0) and costs.num_requests == 40
    assert costs.prompt_ci == pytest.approx((PROMPT_MS, PROMPT_MS))  # exact data: no spread
    assert costs.mean_prompts == pytest.approx(sum(i % 4 for i in range(36)) / 40)


def test_failed_and_one_token_requests_are_left_out() -> None:
    records = _records()
    records += [
        {"first_event_s": 3.2, "last_event_s": 99.0, "num_output_tokens": 256, "error": "boom"},
        {"first_event_s": 5.5, "last_event_s": 5.5, "num_output_tokens": 1},
        {"first_event_s": None, "last_event_s": None, "num_output_tokens": 0},
    ]
    costs = request_costs.fit_costs(records)
    assert costs is not None and costs.num_requests == 40
    assert costs.prompt_ms == pytest.approx(PROMPT_MS)
    assert request_costs.fit_costs(records[:2]) is None


def test_intervals_cover_the_costs_and_widen_with_the_noise() -> None:
    quiet = request_costs.fit_costs(_records(400, noise_ms=20.0))
    loud = request_costs.fit_costs(_records(400, noise_ms=80.0))
    assert quiet is not None and loud is not None
    for costs in (quiet, loud):
        low, high = costs.prompt_ci
        assert low < costs.prompt_ms < high and low < PROMPT_MS < high
        assert costs.decode_ci[0] < DECODE_MS < costs.decode_ci[1]
    assert loud.prompt_ci[1] - loud.prompt_ci[0] > 2 * (quiet.prompt_ci[1] - quiet.prompt_ci[0])
    assert request_costs.fit_costs(_records(400, noise_ms=20.0)) == quiet  # seeded


def test_the_difference_is_taken_over_the_requests_both_served() -> None:
    ours = request_costs.design(_records(400, prompt_ms=1003.0, noise_ms=5.0))
    theirs_records = _records(400, decode_ms=DECODE_MS + 0.25, noise_ms=5.0)
    theirs_records[0]["request_id"] = "only-theirs"
    theirs = request_costs.design(theirs_records)
    assert ours is not None and theirs is not None
    diff = request_costs.cost_difference(ours, theirs)
    assert diff is not None and diff.num == 399
    value, low, high = diff.prompt_ms
    assert value == pytest.approx(3.0, abs=0.2) and low < value < high and high - low < 1.0
    value, low, high = diff.decode_ms
    assert value == pytest.approx(-0.25, abs=0.01) and low < value < high
    few = request_costs.design(_records(8))
    assert few is not None and request_costs.cost_difference(few, theirs) is not None
    few.ids[:] = ["r0", "r1", "r2"] + ["not-theirs"] * 5  # two matched: too few
    assert request_costs.cost_difference(few, theirs) is None
    no_prompts = request_costs.design(_records(4))  # nobody decoded across a prompt
    assert no_prompts is not None and request_costs.cost_difference(no_prompts, theirs) is None


def _write_run(root: Path, name: str, records: list[dict]) -> None:
    run = root / "runs" / name
    run.mkdir(parents=True)
    with gzip.open(run / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_costs_command_reads_every_run_with_records(tmp_path: Path, capsys) -> None:
    rows = [
        {"system": "splitserve", "workload": "4096x256", "rate": 4.0},
        {"system": "vllm", "workload": "4096x256", "rate": 4.0},  # no records: left out
    ]
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    _write_run(tmp_path, "splitserve_4096x256_rate4", _records())
    assert serving_report.main(["costs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == (
        "| 4096x256 | 4 | splitserve | 1.96 (1.96, 1.96) | 1000.0 (1000.0, 1000.0) | 1.00 | 1.4 |"
    )
    assert len(lines) == 3  # no baseline's records: no differences
    with pytest.raises(SystemExit):
        serving_report.main(["costs", str(tmp_path / "missing")])


def test_costs_command_prints_system_less_baseline(tmp_path: Path, capsys) -> None:
    rows = [
        {"system": "splitserve", "workload": "4096x256", "rate": 4.0},
        {"system": "vllm", "workload": "4096x256", "rate": 4.0},
    ]
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    _write_run(tmp_path, "splitserve_4096x256_rate4", _records(prompt_ms=PROMPT_MS - 2.0))
    _write_run(tmp_path, "vllm_4096x256_rate4", _records())
    assert serving_report.main(["costs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[5] == "splitserve less vllm, over the requests both served:"
    assert lines[-1] == "| 4096x256 | 4 | 40 | 0.00 (0.00, 0.00) | -2.0 (-2.0, -2.0) |"
    assert serving_report.main(["costs", str(tmp_path), "--baseline", "sglang"]) == 0
    assert "less" not in capsys.readouterr().out
