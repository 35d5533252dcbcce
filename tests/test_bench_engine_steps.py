"""benchmarks/engine_steps.py and engine_offline --roofline on dummy:tiny on the CPU: the
result fields, the counted bytes and FLOPs recomputed here from the preset's shapes, the
one-line rejection of cases the engine flags cannot run, and `roofline_seconds` against a
hand calculation."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from splitserve.benchmarks import engine_offline, engine_steps
from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.dummy_presets import DUMMY_PRESETS

TINY = DUMMY_PRESETS["tiny"]
FP32 = 4
STEPS, WARMUP = 4, 2
BASE = ["--model", "dummy:tiny", "--device", "cpu", "--smoke"]


@pytest.fixture(scope="module")
def steps_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("steps") / "steps.json"
    argv = [
        *BASE,
        "--decode-cases", "1x32,2x64", "--prefill-cases", "2x32",
        "--max-num-batched-tokens", "128", "--steps", str(STEPS),
        "--warmup-steps", str(WARMUP), "--prefill-repeats", "2", "--out", str(out),
    ]  # fmt: skip
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert engine_steps.main(argv) == 0
    return json.loads(out.read_text()), buf.getvalue()


def tiny_weight_bytes() -> int:
    a = TINY
    attn = a.hidden_size * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    attn += a.num_heads * a.head_dim * a.hidden_size
    mlp = 3 * a.hidden_size * a.intermediate_size
    layer = attn + mlp + 2 * a.hidden_size
    embeddings = (1 if a.tie_word_embeddings else 2) * a.vocab_size * a.hidden_size
    return FP32 * (a.num_layers * layer + embeddings + a.hidden_size)


def test_result_has_provenance_ceilings_and_engine_flags(steps_result) -> None:
    result, table = steps_result
    assert {"command", "git_commit", "device", "date"} <= set(result["provenance"])
    assert "splitserve.benchmarks.engine_steps" in result["provenance"]["command"]
    assert result["ceilings"]["copy_gbps"] > 0 and result["ceilings"]["matmul_tflops"] > 0
    assert result["engine"]["dtype"] == "auto" and result["engine"]["resolved_dtype"] == "float32"
    assert result["engine"]["enforce_eager"] is False
    assert result["weight_bytes"] == tiny_weight_bytes()
    assert [r["case"] for r in result["rows"]] == ["decode 1x32", "decode 2x64", "prefill 2x32"]
    for case in ("decode 1x32", "decode 2x64", "prefill 2x32"):
        assert case in table


def test_decode_rows_count_weights_plus_kv_of_every_attended_token(steps_result) -> None:
    result, _ = steps_result
    copy = result["ceilings"]["copy_gbps"]
    weights = tiny_weight_bytes()
    kv_per_token = TINY.num_layers * 2 * TINY.num_kv_heads * TINY.head_dim * FP32
    for row in result["rows"][:2]:
        batch, context = row["batch"], row["context"]
        # Timed step i (1..STEPS) follows 1 + WARMUP + i - 1 sampled tokens: the sequence
        # attends to context + WARMUP + i tokens.
        mean_context = context + WARMUP + (STEPS + 1) / 2
        kv = batch * mean_context * kv_per_token
        assert row["mean_context"] == pytest.approx(mean_context)
        assert row["kv_bytes_per_step"] == pytest.approx(kv)
        assert row["ms_per_step"] > 0
        gbps = (weights + kv) / (row["ms_per_step"] * 1e-3) / 1e9
        assert row["achieved_gbps"] == pytest.approx(gbps)
        assert row["fraction_of_copy"] == pytest.approx(gbps / copy)
        floor_ms = weights / (copy * 1e9) * 1e3
        assert row["floor_ms"] == pytest.approx(floor_ms)
        assert row["ratio_to_floor"] == pytest.approx(row["ms_per_step"] / floor_ms)
        assert row["decode_only"] is True
        assert row["timed_step_batch_sizes"] == [batch] * STEPS
    batch1, batch2 = result["rows"][:2]
    assert batch1["target"] == "ratio_to_floor <= 1.2"
    assert batch1["met"] is (batch1["ratio_to_floor"] <= 1.2)
    assert batch2["target"] is None and batch2["met"] is None


def test_prefill_row_counts_2n_per_token_plus_causal_attention(steps_result) -> None:
    result, _ = steps_result
    row = result["rows"][2]
    seqs, length = 2, 32
    params = tiny_weight_bytes() / FP32
    attention = TINY.num_layers * 2 * (2 * TINY.num_heads * TINY.head_dim * length * 33 / 2)
    flops = seqs * (2 * params * length + attention)
    assert row["flops"] == pytest.approx(flops)
    assert len(row["ms_all"]) == 2 and row["ms_per_step"] > 0
    assert row["achieved_tflops"] == pytest.approx(flops / (row["ms_per_step"] * 1e-3) / 1e12)
    assert row["fraction_of_matmul"] == pytest.approx(
        row["achieved_tflops"] / result["ceilings"]["matmul_tflops"]
    )
    assert row["met"] is (row["fraction_of_matmul"] >= 0.6)


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        ("--num-blocks 8 --decode-cases 2x64", "--num-blocks to 12"),
        ("--kv-cache-memory-gib 0.0001 --decode-cases 2x64", "--kv-cache-memory-gib to 0.000183"),
        ("--decode-cases 2x60 --max-model-len 64", "--max-model-len"),
        ("--decode-cases 4x16 --max-num-seqs 2", "--max-num-seqs"),
        ("--decode-cases 256x16", "--max-num-batched-tokens"),
        ("--decode-cases 1x16 --prefill-cases 2x128", "--max-num-batched-tokens"),
    ],
)
def test_a_case_the_flags_cannot_run_is_a_one_line_usage_error(
    extra: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*BASE, "--max-num-batched-tokens", "128", "--prefill-cases", "", *extra.split()]
    with pytest.raises(SystemExit) as exc:
        engine_steps.main(argv)
    assert exc.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in message, message


def test_parse_cases() -> None:
    assert engine_steps.parse_cases("1x512, 64X2048") == [(1, 512), (64, 2048)]
    assert engine_steps.parse_cases("") == []
    with pytest.raises(argparse.ArgumentTypeError):
        engine_steps.parse_cases("64by2048")


def test_roofline_seconds_matches_a_hand_calculation() -> None:
    arch = ModelArchConfig(
        architecture="llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
        rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    # 1000 weight bytes of 2-byte params = 500 params. 3 prompts of 4 tokens, 3 out, waves
    # of at most 2 sequences. Rates: 1e9 bytes/s and 1e9 FLOP/s.
    # Prefill: 12 tokens * 2 * 500 = 12000, attention per prompt 2*2*4*4*5 = 320 -> 12960.
    # KV per token 1 layer * 2 * 1 head * 4 * 2 bytes = 16. Two decode steps a wave:
    #   wave of 2: (1000 + 2*16*5) + (1000 + 2*16*6) = 1160 + 1192
    #   wave of 1: (1000 + 16*5) + (1000 + 16*6) = 1080 + 1096   -> 4528 bytes.
    seconds = engine_steps.roofline_seconds(
        arch, weight_bytes=1000, dtype_bytes=2, num_prompts=3, input_len=4, output_len=3,
        max_num_seqs=2, copy_gbps=1.0, matmul_tflops=1e-3,
    )  # fmt: skip
    assert seconds == pytest.approx((12960 + 4528) * 1e-9)
    one_token = engine_steps.roofline_seconds(
        arch, weight_bytes=1000, dtype_bytes=2, num_prompts=3, input_len=4, output_len=1,
        max_num_seqs=2, copy_gbps=1.0, matmul_tflops=1e-3,
    )  # fmt: skip
    assert one_token == pytest.approx(12960e-9)


def test_engine_offline_roofline_adds_the_fraction(tmp_path: Path, capsys) -> None:
    out = tmp_path / "offline.json"
    engine_offline.main(
        [
            "--model", "dummy:tiny", "--num-prompts", "3", "--input-len", "16",
            "--output-len", "4", "--max-num-seqs", "2", "--warmup-prompts", "0",
            "--roofline", "--out", str(out),
        ]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["ceilings"]["copy_gbps"] > 0
    assert result["weight_bytes"] == tiny_weight_bytes()
    expected = engine_steps.roofline_seconds(
        TINY, tiny_weight_bytes(), FP32, 3, 16, 4, 2,
        result["ceilings"]["copy_gbps"], result["ceilings"]["matmul_tflops"],
    )  # fmt: skip
    assert result["roofline_s"] == pytest.approx(expected)
    assert result["roofline_output_tokens_per_s"] == pytest.approx(12 / expected)
    assert result["fraction_of_roofline"] == pytest.approx(expected / result["elapsed_s"])
    printed = capsys.readouterr().out
    assert "ceilings" in printed and f"{result['fraction_of_roofline']:.1%}" in printed


def test_git_commit_says_dirty_when_the_tree_is_not_its_commit(tmp_path, monkeypatch) -> None:
    """A result names the commit whose tree ran, or says that the tree differs from it."""
    import subprocess

    from splitserve.benchmarks.results_io import git_commit

    monkeypatch.delenv("SPLITSERVE_GIT_COMMIT", raising=False)

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True)
        return run.stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "b.py").write_text("untracked files do not count\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"
    monkeypatch.setenv("SPLITSERVE_GIT_COMMIT", "abc1234")
    assert git_commit(tmp_path) == "abc1234"
