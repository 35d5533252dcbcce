"""Every flag of the serving commands says what it does in --help."""

from __future__ import annotations

import argparse

import pytest

from splitserve.launch.cli import _build_parser


@pytest.mark.parametrize("command", ["up", "prefill", "decode", "router", "generate"])
def test_every_flag_has_help(command: str) -> None:
    parser = _build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        command
    ]
    missing = [
        a.option_strings[0]
        for a in sub._actions
        if a.option_strings and not a.help and a.dest != "help"
    ]
    assert not missing, f"splitserve {command}: no help for {missing}"
