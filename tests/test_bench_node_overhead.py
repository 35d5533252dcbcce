"""benchmarks/node_overhead.py: the node's streaming path against a stand-in engine core."""

from __future__ import annotations

from splitserve.benchmarks.node_overhead import main


def test_served_rows_cost_the_process_cpu_that_the_bare_engine_does_not_spend(tmp_path) -> None:
    out = tmp_path / "node.json"
    result = main(
        ["--rows", "96", "--seconds", "1.0", "--device-ms", "10", "--host-ops", "50",
         "--runs", "1", "--out", str(out)]
    )  # fmt: skip
    assert out.exists() and result["git_commit"]
    alone, served = result["summary"]["alone"], result["summary"]["served"]
    # Building and serialising 96 stream messages a step is real work on top of the engine.
    assert served["cpu_ms_per_step"] > alone["cpu_ms_per_step"]
    assert {r["mode"] for r in result["runs"]} == {"alone", "served"}
    assert all(r["steps"] >= 10 for r in result["runs"])


def test_first_and_last_outputs_wait_for_the_next_launch_only_when_held(tmp_path) -> None:
    """Requests arriving beside running rows: held, a first or last output waits at least
    for the next step's host phase (800 ops); handed over at once, it does not."""
    result = main(
        ["--rows", "32", "--seconds", "2.5", "--device-ms", "10", "--host-ops", "800",
         "--runs", "1", "--modes", "served,served_held", "--arrivals-per-s", "20",
         "--length", "8", "--out", str(tmp_path / "node.json")]
    )  # fmt: skip
    at_once, held = result["summary"]["served"], result["summary"]["served_held"]
    # The hold adds about one host phase; a quarter of one is outside the runs' noise.
    for which in ("first", "last"):
        saved = held[f"{which}_output_ms_p50"] - at_once[f"{which}_output_ms_p50"]
        assert saved > 0.25 * held["host_phase_ms_p50"], (which, at_once, held)
    assert all(r["first_outputs"] >= 10 and r["last_outputs"] >= 10 for r in result["runs"])
