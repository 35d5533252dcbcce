"""The step-window benchmark on the tiny model (CPU): decode steps timed one by one, and
windows of the step that carries a fresh prompt plus three decode steps, each window's
prompt running to its two tokens while the batch keeps decoding."""

from __future__ import annotations

import json
import os
import subprocess
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


@pytest.mark.parametrize("flag", ["--profile", "--clocks"])
def test_device_flags_need_a_device(tiny_llama: Path, flag: str) -> None:
    if step_windows.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        step_windows.parse_args(["--engine", "splitserve", "--model", str(tiny_llama), flag])


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


def test_step_pairs_script_alternates_and_gives_ours_args_to_splitserve_only(
    tmp_path: Path,
) -> None:
    """scripts/gpu_step_pairs.sh with a stand-in `python3` that records its arguments:
    REPEAT=2 runs each system twice under names of their own, OURS_ARGS reach splitserve's
    command and STEP_ARGS every command."""
    root = Path(step_windows.__file__).resolve().parents[1]
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    stand_in = bin_dir / "python3"
    stand_in.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\necho "ran"\n')
    stand_in.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PKG": str(tmp_path / "pkg"),
        "BG_OUT": str(out),
        "SYSTEMS": "splitserve",
        "SHAPES": "12x4200+2x4096",
        "REPEAT": "2",
        "OURS_ARGS": "--dummy-weights uniform",
        "STEP_ARGS": "--profile",
    }
    done = subprocess.run(
        ["bash", "scripts/gpu_step_pairs.sh"],
        cwd=root, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 2
    for round_, line in zip((1, 2), lines, strict=True):
        assert line.startswith("-m splitserve.benchmarks.step_windows --engine splitserve")
        assert "--dummy-weights uniform" in line and "--profile" in line
        assert "--batch 12 --context 4200 --prompts 2 --prompt 4096" in line
        assert f"--out {out}/sw_splitserve_12x4200_2x4096_r{round_}.json" in line


def test_clocked_phases_carry_their_times_and_the_samples_taken_beside(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--clocks`: decode steps, then windows, each under its own sampler (here a stand-in
    for nvidia-smi printing its lines), each phase's time beside its samples."""
    import sys

    from splitserve.benchmarks import device_clocks

    fake = [sys.executable, "-c", "import time\nwhile True:\n"
            "    print('1980, 2619, 400.0, 45, 0x0', flush=True); time.sleep(0.001)"]  # fmt: skip
    monkeypatch.setattr(device_clocks, "nvidia_smi_command", lambda index: fake)
    monkeypatch.setattr(step_windows, "_smi_index", lambda: 0)
    monkeypatch.setattr(step_windows, "CLOCK_DECODE_STEPS", 30)
    monkeypatch.setattr(step_windows, "CLOCK_WINDOWS", 2)
    argv = ["--engine", "splitserve", "--model", str(tiny_llama), "--dtype", "float32"]
    engine = step_windows.splitserve_engine(step_windows.parse_args(argv))
    prompts = step_windows._Prompts(200)
    for _ in range(2):
        prompts.add(engine, 20, 1_000_000)
    clocks = step_windows._clocked(engine, prompts, 24)
    decode, windows = clocks["decode_steps"], clocks["windows"]
    assert decode["steps"] == 30 and decode["step_ms_median"] > 0
    assert windows["windows"] == 2 and windows["window_ms_median"] > decode["step_ms_median"]
    assert decode["samples"] > 0 and windows["samples"] > 0
    assert decode["sm_mhz"]["median"] == 1980.0 and decode["event_reasons"] == {
        "0x0": decode["samples"]
    }


def test_the_sampled_device_is_nvidia_smis_index_of_torchs_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(step_windows.torch.cuda, "current_device", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert step_windows._smi_index() == 5
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert step_windows._smi_index() == 1
