"""`splitserve decode`: a decode node (see launch/node_cmd.py). With no prefill nodes in
the cluster it serves alone (aggregated mode)."""

from __future__ import annotations

import argparse

from splitserve.launch.node_cmd import add_node_arguments, run_node


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_node_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_node(args, "decode")
