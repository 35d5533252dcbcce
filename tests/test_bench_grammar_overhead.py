"""The grammar-overhead benchmark: which steps it keeps, and one run on the tiny model
(random weights from its directory) that constrains every row and writes the result."""

from __future__ import annotations

import json
from pathlib import Path

from splitserve.benchmarks.grammar_overhead import SCHEMA, StepTracker, main


def test_only_steps_with_the_whole_batch_decoding_are_kept() -> None:
    tracker = StepTracker("free", batch=2)
    tracker.record(0.5, [("a", 1, False)])  # prefill of one row
    tracker.record(0.4, [("a", 1, False), ("b", 1, False)])  # b's first token
    tracker.record(0.1, [("a", 1, False), ("b", 1, False)])  # kept
    tracker.record(0.2, [("a", 1, True), ("b", 1, False)])  # a finished during it
    tracker.record(0.05, [("b", 1, True)])
    phase = tracker.phase()
    assert tracker.done and phase.full_batch_step_s == [0.1] and phase.output_tokens == 8
    assert phase.summary()["median_step_ms"] == 100.0


def test_constrained_rows_stay_in_the_schema_language(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "grammar.json"
    argv = ["--engine", "splitserve", "--model", str(tiny_llama), "--load-format", "dummy"]
    argv += ["--batch", "4", "--input-len", "8", "--output-len", "24", "--prompt-id-limit", "200"]
    result = main([*argv, "--dtype", "float32", "--out", str(out)])
    assert json.loads(out.read_text())["step_overhead"] == result["step_overhead"]
    phases = result["phases"]
    assert phases["free"]["output_tokens"] == 4 * 24  # ignore_eos: every row runs out
    assert phases["json_schema"]["full_batch_steps"] > 0 and result["schema"] == SCHEMA
    assert result["git_commit"] and result["device"] and result["command"]
