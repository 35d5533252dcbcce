"""A serving node's launch-probe window (node/launch_lag.py, --launch-lag-s): its flags,
the CPU refusal, and the summary written once the window is done or the node stops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from splitserve.node.launch_lag import NodeLaunchLag
from splitserve.node.runtime import NodeConfig


class FakeWindow:
    """A LagWindow whose ticks the test sees, done after `done_at` seconds."""

    def __init__(self, done_at: float) -> None:
        self.done_at = done_at
        self.ticks: list[float] = []

    def tick(self, now: float) -> None:
        self.ticks.append(now)

    @property
    def is_done(self) -> bool:
        return bool(self.ticks) and self.ticks[-1] >= self.done_at

    def summary(self) -> dict[str, Any] | None:
        return {"prompt_forwards": {"num": len(self.ticks)}} if self.ticks else None


def test_the_summary_is_written_once_when_the_window_is_done(tmp_path: Path) -> None:
    out = tmp_path / "lag" / "node.json"
    lag = NodeLaunchLag(after_s=0.0, length_s=1.0, out_path=str(out))
    assert lag.tick(None) is False  # nothing installed: a no-op hook
    window = FakeWindow(done_at=0.0)
    lag.watch(window)  # type: ignore[arg-type]
    assert lag.tick(None) is False
    assert json.loads(out.read_text()) == {"prompt_forwards": {"num": 1}}
    lag.tick(None)
    lag.finish(None)
    assert len(window.ticks) == 1  # written: no more ticks, nothing written again


def test_a_window_cut_short_is_written_at_stop_and_one_never_begun_is_not(
    tmp_path: Path,
) -> None:
    out = tmp_path / "node.json"
    lag = NodeLaunchLag(after_s=0.0, length_s=60.0, out_path=str(out))
    lag.watch(FakeWindow(done_at=1e9))  # type: ignore[arg-type]
    lag.tick(None)
    assert not out.exists()
    lag.finish(None)
    assert json.loads(out.read_text()) == {"prompt_forwards": {"num": 1}}
    never = NodeLaunchLag(after_s=0.0, length_s=60.0, out_path=str(tmp_path / "never.json"))
    never.watch(FakeWindow(done_at=1e9))  # type: ignore[arg-type]
    never.finish(None)
    assert not (tmp_path / "never.json").exists()


def test_flags_are_checked_and_a_cpu_node_is_refused(tiny_llama: Path) -> None:
    from splitserve.engine.config import CacheConfig, EngineConfig, ModelConfig
    from splitserve.engine.core import EngineCore

    with pytest.raises(ValueError, match="--launch-lag-s must be > 0"):
        NodeLaunchLag(after_s=1.0, length_s=0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        NodeConfig(role="decode", launch_lag_s=-1.0)
    core = EngineCore(
        EngineConfig(ModelConfig(str(tiny_llama), device="cpu"), CacheConfig(num_blocks=8))
    )
    with pytest.raises(ValueError, match="needs a node on a CUDA device"):
        NodeLaunchLag(after_s=0.0, length_s=1.0).install(core)


def test_the_node_flags_reach_its_config() -> None:
    import argparse

    from splitserve.launch.node_cmd import add_node_arguments, node_config_from_args

    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    model = ["--model", "dummy:tiny"]
    args = parser.parse_args([*model, "--launch-lag-s", "30", "--launch-lag-out", "/tmp/l.json"])
    config = node_config_from_args(args, "decode")
    assert (config.launch_lag_s, config.launch_lag_after_s) == (30.0, 60.0)
    assert config.launch_lag_out == "/tmp/l.json"
    default = node_config_from_args(parser.parse_args(model), "decode")
    assert default.launch_lag_s == 0.0
