"""The P:D ratio experiment driver: configuration parsing, the verdicts, and one small run
on the CPU (a 1P1D cluster and one aggregated replica, real Redis, router and nodes, the
bench tool's sweep against the OpenAI API)."""

from __future__ import annotations

import argparse
import json

import pytest

from splitserve.benchmarks.pd_ratio import (
    Config,
    check_requests_served,
    main,
    parse_configs,
    summarize,
)


def test_parse_configs() -> None:
    assert parse_configs("1P3D,2p2d,0P4D") == [Config(1, 3), Config(2, 2), Config(0, 4)]
    assert Config(0, 4).is_aggregated and Config(0, 4).name == "0P4D"
    for bad in ("1P0D", "P3D", "1x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="xPyD"):
            parse_configs(bad)


def test_summarize_picks_best_and_compares_with_aggregated() -> None:
    configs = parse_configs("1P3D,2P2D,0P4D")
    results = {
        "1P3D": {"w": {"goodput_rps": 3.0}},
        "2P2D": {"w": {"goodput_rps": 6.0}},
        "0P4D": {"w": {"goodput_rps": 4.0}},
    }
    verdict = summarize(configs, results, ["w"])["w"]
    assert verdict["best"] == "2P2D" and verdict["best_disaggregated"] == "2P2D"
    assert verdict["disaggregated_over_aggregated"] == pytest.approx(1.5)
    results["2P2D"]["w"]["goodput_rps"] = None  # no rate passed
    verdict = summarize(configs, results, ["w"])["w"]
    assert verdict["best"] == "0P4D" and verdict["disaggregated_over_aggregated"] == 0.75
    results["1P3D"]["w"]["goodput_rps"] = 4.0
    assert summarize(configs, results, ["w"])["w"]["best"] == "1P3D = 0P4D"


def test_rejects_more_gpus_than_the_host_has(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--configs", "64P64D", "--out-dir", "unused"])
    assert "GPUs" in capsys.readouterr().err


def test_small_cpu_run(tiny_llama, tmp_path) -> None:
    out = tmp_path / "pd"
    argv = [
        "--model", str(tiny_llama), "--cpu", "--configs", "1P1D,0P1D",
        "--workloads", "decode-heavy", "--scale", "0.03", "--rates-decode-heavy", "2",
        "--num-requests", "6", "--warmup-requests", "3", "--num-warmup", "0",
        "--slo", "ttft:p90=30s,tpot:p90=5s",
        "--node-arg=--dtype=float32", "--out-dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workloads"]["decode-heavy"] == [15, 31]
    for config in ("1P1D", "0P1D"):
        result = summary["results"][config]["decode-heavy"]
        assert result["points"][0]["attainment"] == 1.0
        assert result["goodput_rps"] == 2.0
        assert (out / f"{config}_decode-heavy" / "sweep.json").exists()
    verdict = summary["verdicts"]["decode-heavy"]
    assert verdict["disaggregated_over_aggregated"] == pytest.approx(1.0)
    assert "| 1P1D | 2.00 [" in (out / "summary.md").read_text()  # with its interval


def test_a_rate_where_every_request_failed_is_an_error(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    summary.write_text(
        json.dumps({"counts": {"num_requests": 5, "num_failed": 5, "errors": {"HTTP 400": 5}}})
    )
    sweep = {"points": [{"load": 2.0, "summary": str(summary)}]}
    with pytest.raises(RuntimeError, match=r"every request failed.*lower --scale"):
        check_requests_served(Config(1, 1), "prompt-heavy", sweep)
    summary.write_text(json.dumps({"counts": {"num_requests": 5, "num_failed": 4, "errors": {}}}))
    check_requests_served(Config(1, 1), "prompt-heavy", sweep)
