"""The fit of TPOT against the arrival rate (benchmarks/capacity_fit.py)."""

from __future__ import annotations

import pytest

from splitserve.benchmarks import capacity_fit, serving_report


def _rows(system: str, step_ms: float, request_ms: float, rates: list[float]) -> list[dict]:
    rows = []
    for rate in rates:
        tpot = step_ms / (1.0 - request_ms / 1000.0 * rate)
        tpot = tpot if tpot > 0 else 500.0  # past saturation: steps without bound
        rows.append({
            "system": system, "workload": "1024x256", "rate": rate, "num_requests": 1000,
            "ttft_p50_ms": 50.0, "ttft_p90_ms": 100.0, "ttft_p99_ms": 150.0,
            "tpot_p50_ms": tpot, "tpot_p90_ms": tpot * 1.1, "output_tok_s": rate * 256,
        })  # fmt: skip
    return rows


def test_fit_recovers_step_and_request_cost_from_rows_below_saturation():
    rows = _rows("a", 5.0, 36.0, [2, 8, 16, 20, 24, 28])
    got = capacity_fit.fit(rows, slo_ttft_ms=1000.0, slo_tpot_ms=50.0)
    assert got.rates == (2.0, 8.0, 16.0, 20.0, 24.0)  # 28 req/s missed the SLO: left out
    assert got.step_ms == pytest.approx(5.0)
    assert got.request_ms == pytest.approx(36.0)
    assert got.saturation_rate == pytest.approx(1000.0 / 36.0)
    assert got.slo_rate == pytest.approx(0.9 * 1000.0 / 36.0)


def test_a_cheaper_request_moves_the_slo_rate_by_its_ratio():
    rows = _rows("a", 5.0, 36.0, [8, 16, 20]) + _rows("b", 5.0, 30.0, [8, 16, 20])
    by_system = {f.system: f for f in capacity_fit.fits(rows, 1000.0, 50.0)}
    assert by_system["b"].slo_rate / by_system["a"].slo_rate == pytest.approx(36.0 / 30.0)


def test_too_few_rows_or_flat_tpot_give_a_reason_not_a_fit():
    one = _rows("a", 5.0, 36.0, [8])
    flat = [dict(r, tpot_p50_ms=7.0) for r in _rows("b", 5.0, 36.0, [8, 16])]
    reasons = capacity_fit.fits(one + flat, 1000.0, 50.0)
    assert all(isinstance(r, str) for r in reasons)
    assert "two rates or more" in reasons[0] and "does not grow" in reasons[1]


def test_fit_command_prints_a_table_per_system(tmp_path, capsys):
    rows = _rows("splitserve", 5.0, 36.0, [8, 16, 20]) + _rows("vllm", 5.2, 37.0, [8, 16, 20])
    serving_report.write_summary(tmp_path, rows, 1000.0, 50.0)
    assert serving_report.main(["fit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| splitserve | 1024x256 | 8, 16, 20 | 5.00 | 36.0 |" in out
    assert "| vllm | 1024x256 | 8, 16, 20 | 5.20 | 37.0 |" in out
