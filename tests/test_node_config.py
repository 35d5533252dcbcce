"""NodeConfig checks and the process-wide settings a node applies at start."""

from __future__ import annotations

import sys

import pytest

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.node.runtime import NodeConfig, NodeRuntime


@pytest.mark.parametrize("interval", [0.0, -1.0, 2000.0])
def test_gil_switch_interval_out_of_range_is_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="--gil-switch-interval-ms"):
        NodeConfig(role="decode", gil_switch_interval_ms=interval)


def test_gil_switch_interval_is_set_for_the_node_process(tiny_llama) -> None:
    before = sys.getswitchinterval()
    engine = EngineConfig(model=ModelConfig(model=str(tiny_llama), dtype="float32"))
    runtime = NodeRuntime(engine, NodeConfig(role="decode", gil_switch_interval_ms=0.25))
    try:
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    finally:
        runtime.engine.shutdown()
        sys.setswitchinterval(before)
    unchanged = NodeRuntime(engine, NodeConfig(role="decode"))
    unchanged.engine.shutdown()
    assert sys.getswitchinterval() == pytest.approx(before)
