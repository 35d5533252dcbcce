"""benchmarks/comparison.py: one system's serving rows against a baseline's, on rows made
here and on a committed lease's results."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.benchmarks import serving_report
from splitserve.benchmarks.comparison import Targets, compare

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _row(system: str, rate: float, ttft: float, tpot: float, **extra) -> dict:  # type: ignore[type-arg]
    row = {
        "system": system, "workload": "1024x256", "rate": rate, "num_requests": 1000,
        "ttft_p50_ms": ttft, "ttft_p90_ms": 2 * ttft, "ttft_p99_ms": 2.5 * ttft,
        "tpot_p50_ms": tpot, "tpot_p90_ms": 1.2 * tpot, "commit": "abc", "date":
        "2026-12-05T03:50:00Z", "device": "NVIDIA H200",
    }  # fmt: skip
    row.update(extra)
    return row


def _met(checks, target_start: str) -> list[bool]:  # type: ignore[no-untyped-def]
    return [c.met for c in checks if c.target.startswith(target_start)]


def test_a_system_ahead_everywhere_meets_every_check() -> None:
    rows = [_row("vllm", r, 10 * r, t) for r, t in ((2, 6), (8, 7), (16, 12), (24, 60))]
    rows += [_row("splitserve", r, 9 * r, t) for r, t in ((2, 5), (8, 6), (16, 11), (24, 40))]
    rows[4]["is_first_after_start"] = True
    checks = compare(rows, "splitserve", "vllm", Targets())
    assert all(c.met for c in checks), [c for c in checks if not c.met]
    # TPOT is compared up to the baseline's capacity (16 req/s: TPOT p90 72 ms at 24).
    assert len(_met(checks, "TPOT")) == 6 and len(_met(checks, "TTFT")) == 4


def test_each_miss_is_reported_with_its_reason() -> None:
    rows = [_row("vllm", r, 10 * r, t) for r, t in ((4, 6), (8, 7), (16, 12))]
    rows += [
        _row("splitserve", 4, 300, 5),  # TTFT p50 above the baseline's
        _row("splitserve", 8, 70, 8, num_requests=300, commit="def"),  # TPOT above, few
        _row("splitserve", 16, 150, 11, date="2026-12-06T03:50:00Z"),  # a day apart
    ]
    checks = compare(rows, "splitserve", "vllm", Targets())
    assert _met(checks, "TTFT p50") == [False, True, True]
    assert _met(checks, "TPOT p50") == [True, False, True]
    by_target = {c.target.split(" ")[0]: c for c in checks}
    assert not by_target[">="].met and by_target[">="].ours == "short at 8"
    one_code = next(c for c in checks if c.target == "one commit for every row")
    assert not one_code.met and one_code.ours == "abc, def"
    assert not by_target["each"].met and by_target["each"].ours == "apart at 16"
    assert not by_target["rates"].met  # from 4 req/s, and not past the baseline's 16
    fresh = next(c for c in checks if c.target.startswith("fresh"))
    assert not fresh.met and "not measured first" in fresh.ours
    capacity = next(c for c in checks if c.target.startswith("capacity"))
    assert not capacity.met and (capacity.ours, capacity.theirs) == ("16 req/s", "16 req/s")


def test_commits_of_the_same_code_count_as_one_when_the_caller_can_tell() -> None:
    rows = [_row("vllm", r, 10 * r, 6) for r in (2, 8)]
    rows += [_row("splitserve", 2, 9, 5), _row("splitserve", 8, 70, 5, commit="def")]

    def one_code(verdict: bool | None):  # type: ignore[no-untyped-def]
        checks = compare(rows, "splitserve", "vllm", Targets(), lambda commits: verdict)
        return next(c for c in checks if c.target == "one commit for every row")

    assert (one_code(True).met, one_code(True).ours) == (True, "abc, def (the same served code)")
    assert (one_code(False).met, one_code(False).ours) == (False, "abc, def (served code differs)")
    assert (one_code(None).met, one_code(None).ours) == (False, "abc, def")


def test_rows_from_two_kinds_of_device_fail_the_one_device_check() -> None:
    rows = [_row("vllm", r, 10 * r, 6) for r in (2, 8)]
    rows += [_row("splitserve", 2, 9, 5), _row("splitserve", 8, 70, 5)]

    def one_device(rows):  # type: ignore[no-untyped-def]
        checks = compare(rows, "splitserve", "vllm", Targets())
        return next(c for c in checks if c.target == "one device for every row")

    assert (one_device(rows).met, one_device(rows).ours) == (True, "NVIDIA H200")
    rows[3]["device"] = "NVIDIA H100 80GB HBM3"
    mixed = one_device(rows)
    assert not mixed.met and mixed.ours == "NVIDIA H100 80GB HBM3, NVIDIA H200"
    for row in rows:
        del row["device"]
    assert not one_device(rows).met and one_device(rows).ours == "unknown"


def test_the_fc30e0e_lease_reads_as_its_closing_note_says(capsys) -> None:
    """The committed 1024x256 sweep of 2026-12-05: TTFT p50 below vLLM's at every rate,
    TPOT above it at 16 and 24 req/s, capacity 20 against 24, no 2 req/s row."""
    folder = RESULTS / "serving_h200_2026-12-05_fc30e0e"
    assert serving_report.main(["compare", str(folder)]) == 0
    table = capsys.readouterr().out
    assert "| 1024x256 | TPOT p50 <= baseline at 16 req/s | 10.474 ms | 10.371 ms | no |" in table
    capacity = "capacity (TTFT p90 <= 1000 ms, TPOT p90 <= 50 ms) >= 1.1 x baseline's"
    assert f"| 1024x256 | {capacity} | 20 req/s | 24 req/s | no |" in table
    rows = serving_report.read_rows(folder)
    checks = compare(rows, "splitserve", "vllm", Targets())
    assert all(_met(checks, "TTFT p50"))
    assert _met(checks, "TPOT p50") == [True, False, True, False]  # 8, 16, 20, 24 req/s
    assert not any(_met(checks, "rates from"))


def test_a_folder_without_both_systems_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        serving_report.main(["compare", str(tmp_path)])
    (tmp_path / "summary.json").write_text('[{"system": "vllm", "workload": "1024x256"}]')
    with pytest.raises(SystemExit):
        serving_report.main(["compare", str(tmp_path)])
