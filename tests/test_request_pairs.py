"""Two systems' runs side by side and request by request (benchmarks/request_pairs.py,
`serving_report pairs`), on run folders built with known TPOTs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from splitserve.benchmarks import request_pairs, serving_report


def _write_run(run: Path, tpots: dict[str, float | None], p50: list[float] | None) -> None:
    run.mkdir(parents=True)
    with gzip.open(run / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"request_id": i, "tpot_ms": t}) + "\n" for i, t in tpots.items())
    metrics = {}
    if p50 is not None:
        estimate = {"value": p50[0], "ci95": p50[1:], "is_supported": True}
        metrics = {"tpot_ms": {"p50": estimate, "p90": estimate}}
    (run / "summary.json").write_text(json.dumps({"metrics": metrics}))


def test_matched_requests_give_correlation_and_differences() -> None:
    theirs = {str(i): float(i) for i in range(1, 101)}
    ours = {i: t + 0.5 for i, t in theirs.items()}  # 0.5 ms longer everywhere
    ours["91"] += 10.0  # one of the baseline's slowest tenth, 10 ms longer still
    ours["only-ours"] = 3.0  # served by one side only: not matched
    matched = request_pairs.match(ours, theirs)
    assert matched is not None and matched.num == 100
    assert matched.median_difference_ms == pytest.approx(0.5)
    assert matched.slow_tenth_difference_ms == pytest.approx(0.5 + 10.0 / 10)
    assert 0.99 < matched.correlation < 1.0
    assert request_pairs.match({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}) is None


def test_records_without_a_tpot_or_id_are_left_out() -> None:
    records = [
        {"request_id": "a", "tpot_ms": 5.0},
        {"request_id": "b", "tpot_ms": None},  # one token: no TPOT
        {"tpot_ms": 7.0},
    ]
    assert request_pairs.tpot_by_request(records) == {"a": 5.0}


def test_pairs_command_prints_each_rate_with_both_runs(tmp_path: Path, capsys) -> None:
    rows = [
        {"system": s, "workload": "1024x256", "rate": r}
        for s in ("splitserve", "vllm")
        for r in (2.0, 4.0)
    ]
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    runs = tmp_path / "runs"
    tpots = {f"r{i}": 6.0 + i / 100 for i in range(50)}
    _write_run(runs / "splitserve_1024x256_rate2", tpots, [6.25, 6.2, 6.3])
    _write_run(runs / "vllm_1024x256_rate2", {i: t + 0.01 for i, t in tpots.items()}, None)
    _write_run(runs / "splitserve_1024x256_rate4", tpots, [6.25, 6.2, 6.3])  # no vllm run
    assert serving_report.main(["pairs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[2] == (
        "| 1024x256 | 2 | 6.250 (6.20–6.30) |  | 6.250 (6.20–6.30) |  | 50 | 1.000 | "
        "-0.01 | -0.01 |"
    )
    with pytest.raises(SystemExit):
        serving_report.main(["pairs", str(tmp_path / "missing")])
