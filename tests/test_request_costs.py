"""The decode-step and per-prompt costs fitted to a serving run's request records
(benchmarks/request_costs.py), on records built from known costs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from splitserve.benchmarks import request_costs, serving_report

DECODE_MS, PROMPT_MS = 500.0 / 255, 1000.0


def _records(num: int = 40) -> list[dict]:
    """First tokens one second apart; request i decodes across `i % 4` other first tokens,
    for 255 decode steps of DECODE_MS and PROMPT_MS for each of them."""
    records = []
    for i in range(num):
        seen = i % 4 if i < num - 4 else 0
        decode_s = (255 * DECODE_MS + seen * PROMPT_MS) / 1000.0
        records.append(
            {"first_event_s": float(i), "last_event_s": i + decode_s, "num_output_tokens": 256}
        )
    return records


def test_the_fit_finds_the_costs_the_records_were_built_from() -> None:
    costs = request_costs.fit_costs(_records())
    assert costs is not None
    assert costs.decode_ms == pytest.approx(DECODE_MS) and costs.prompt_ms == pytest.approx(1000)
    assert costs.r2 == pytest.approx(1.0) and costs.num_requests == 40
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


def test_costs_command_reads_every_run_with_records(tmp_path: Path, capsys) -> None:
    rows = [
        {"system": "splitserve", "workload": "4096x256", "rate": 4.0},
        {"system": "vllm", "workload": "4096x256", "rate": 4.0},  # no records: left out
    ]
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    run = tmp_path / "runs" / "splitserve_4096x256_rate4"
    run.mkdir(parents=True)
    with gzip.open(run / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in _records())
    assert serving_report.main(["costs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| 4096x256 | 4 | splitserve | 1.96 | 1000.0 | 1.00 | 1.4 |"
    assert len(lines) == 3
    with pytest.raises(SystemExit):
        serving_report.main(["costs", str(tmp_path / "missing")])
