"""`--gil-switch-interval-ms`: parsed into NodeConfig, checked, and applied to the process."""

from __future__ import annotations

import argparse
import sys

import pytest

from splitserve.launch.node_cmd import (
    add_node_arguments,
    node_config_from_args,
    set_gil_switch_interval,
)
from splitserve.node.runtime import NodeConfig


def _config(*argv: str) -> NodeConfig:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    args = parser.parse_args(["--model", "dummy:tiny", *argv])
    return node_config_from_args(args, "decode")


def test_default_leaves_pythons_interval() -> None:
    before = sys.getswitchinterval()
    config = _config()
    assert config.gil_switch_interval_ms is None
    set_gil_switch_interval(config)
    assert sys.getswitchinterval() == before


def test_flag_sets_the_interval_of_the_process() -> None:
    before = sys.getswitchinterval()
    try:
        set_gil_switch_interval(_config("--gil-switch-interval-ms", "0.25"))
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    finally:
        sys.setswitchinterval(before)


def test_non_positive_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="--gil-switch-interval-ms must be > 0"):
        NodeConfig(role="decode", gil_switch_interval_ms=0)
