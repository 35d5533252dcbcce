"""The step-window benchmark on the tiny model (CPU): decode steps timed one by one, and
windows of the step that carries a fresh prompt plus three decode steps, each window's
prompt running to its two tokens while the batch keeps decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitserve.benchmarks import step_windows


def test_windows_hold_the_prompt_step_and_three_decode_steps(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    added: list[tuple[int, int]] = []
    make = step_windows.splitserve_engine

    def spied(args):  # every request the procedure adds: (prompt length, max_tokens)
        engine = make(args)
        add = engine.add
        engine.add = lambda rid, ids, max_tokens: (
            added.append((len(ids), max_tokens)) or add(rid, ids, max_tokens)
        )
        return engine

    monkeypatch.setattr(step_windows, "splitserve_engine", spied)
    out = tmp_path / "windows.json"
    argv = ["--engine", "splitserve", "--model", str(tiny_llama), "--dtype", "float32"]
    argv += ["--batch", "3", "--context", "20", "--prompt", "24", "--windows", "2"]
    result = step_windows.main([*argv, "--prompt-id-limit", "200", "--out", str(out)])
    assert json.loads(out.read_text())["mixed_step_ms_est"] == result["mixed_step_ms_est"]
    assert added == [(20, 1_000_000)] * 3 + [(24, 2)] * 2
    assert len(result["windows_ms"]) == 2 and result["decode_ms_median"] > 0
    assert result["mixed_window_ms_median"] > result["decode_ms_median"]
    assert result["engine"] == "splitserve" and result["git_commit"] and result["command"]

    added.clear()  # --prompts: each window adds that many prompts at once
    step_windows.main([*argv, "--prompts", "3", "--prompt-id-limit", "200"])
    assert added == [(20, 1_000_000)] * 3 + [(24, 2)] * 3 * 2
    with pytest.raises(SystemExit):
        step_windows.parse_args([*argv, "--prompts", "0"])


def test_profile_needs_a_device(tiny_llama: Path) -> None:
    if step_windows.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        step_windows.parse_args(["--engine", "splitserve", "--model", str(tiny_llama), "--profile"])


def _decoding_on_cuda(
    tiny_llama: Path, flag: str, added: list[int]
) -> tuple[step_windows.Engine, step_windows._Prompts]:
    """splitserve on CUDA with `flag`, two requests decoding; every prompt added from here
    on has its length appended to `added`."""
    argv = ["--engine", "splitserve", "--model", str(tiny_llama), "--device", "cuda"]
    argv += ["--kv-cache-memory-gib", "1", "--dtype", "bfloat16", flag]
    engine = step_windows.splitserve_engine(step_windows.parse_args(argv))
    add = engine.add
    engine.add = lambda rid, ids, max_tokens: added.append(len(ids)) or add(rid, ids, max_tokens)
    prompts = step_windows._Prompts(200)
    for _ in range(2):
        prompts.add(engine, 20, 1_000_000)
    return engine, prompts


def test_profiled_windows_summarise_the_device_timeline(tiny_llama: Path) -> None:
    """`--profile` (CUDA): two profiled passes of windows, the second with host ops, each
    window adding one fresh prompt; the timeline accounts for its kernels and gaps."""
    if not step_windows.torch.cuda.is_available():
        pytest.skip("--profile records device kernels: it needs a CUDA device")
    added: list[int] = []
    engine, prompts = _decoding_on_cuda(tiny_llama, "--profile", added)
    profile = step_windows._profiled(engine, prompts, 24)
    assert added == [20, 20] + [24] * 2 * step_windows.PROFILED_WINDOWS
    timeline = profile["windows_timeline"]
    assert timeline["windows"] == step_windows.PROFILED_WINDOWS and timeline["num_kernels"] > 0
    assert timeline["busy_ms"] > 0 and timeline["span_ms"] >= timeline["busy_ms"]
    assert profile["windows"]["kernel_ms_per_step"] > 0


def test_launch_lag_compares_windows_as_they_come_with_held_back_ones(tiny_llama: Path) -> None:
    """`--launch-lag` (CUDA): the prompt's forward passes of both kinds of window are
    probed at every piece and attention call, and the held-back ones measure its work."""
    if not step_windows.torch.cuda.is_available():
        pytest.skip("--launch-lag probes forward passes on a CUDA device")
    engine, prompts = _decoding_on_cuda(tiny_llama, "--launch-lag", [])
    lag = step_windows._launch_lag(engine, prompts, 24)
    half = step_windows.LAG_WINDOWS // 2
    assert (lag["num_as_is"], lag["num_held"]) == (half, half)
    assert lag["work_ms"] > 0 and lag["held"]["lead_at_start_ms"] > step_windows.HOLD_MS / 2
    layers = len(engine.core.model.model.layers)
    assert lag["held"]["points"] == 2 + 2 * layers + 1  # start, pieces, attention, end
