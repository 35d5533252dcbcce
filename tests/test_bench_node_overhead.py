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
