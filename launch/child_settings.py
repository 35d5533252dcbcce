"""The settings `splitserve up` passes down to its children, as explicit flags.

`up` resolves its own flags like every command (launch/config_sources.py). The keys of its
--config file and the SPLITSERVE_* variables that are not its own but flags of the nodes
(`prefill`/`decode`) or of the router go to those children as flags, checked here first
with the child's own parser; --log-level and --log-format go to every child. The children
then start with the SPLITSERVE_* variables removed from their environment, so that a
setting meant for `up` (SPLITSERVE_PORT: the router's port) never reaches a node, and each
child's --print-config shows these settings as flags.

Who calls what: up_cmd.run -> `child_settings(resolved, command_actions)` -> ChildSettings
-> ClusterConfig(node_args=..., router_args=..., drop_env=...).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from splitserve.launch.config_sources import Resolved, config_env_names
from splitserve.launch.setting_values import convert, primary_name

logger = logging.getLogger(__name__)

# Settings of `up` every child takes as well.
COMMON_FLAGS = ("log-level", "log-format")
NODE_COMMAND = "decode"  # prefill and decode take the same flags (launch/node_cmd.py)
ROUTER_COMMAND = "router"

# command -> its flag name -> action (launch/cli.py `command_actions`).
CommandActions = Callable[[str], Mapping[str, argparse.Action]]


@dataclass(frozen=True)
class ChildSettings:
    node_args: tuple[str, ...]
    router_args: tuple[str, ...]
    # Environment variables the children do not inherit.
    drop_env: tuple[str, ...]


def flag_args(action: argparse.Action, value: Any) -> list[str]:
    """`value` of `action` as the command line that gives it."""
    name = primary_name(action)
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        return [f"--{name}" if value else f"--no-{name}"]
    if isinstance(action, argparse._StoreConstAction):
        return [f"--{name}"] if value == action.const else []
    if isinstance(action, argparse._AppendAction):
        return [f"--{name}={item}" for item in value]
    if isinstance(value, list):
        return [f"--{name}", *(str(item) for item in value)]
    return [f"--{name}={value}"]


def _forward(
    resolved: Resolved, actions: Mapping[str, argparse.Action], names: list[str]
) -> list[str]:
    out: list[str] = []
    for name in names:
        if name in COMMON_FLAGS:
            out += flag_args(actions[name], getattr(resolved.args, resolved.dests[name]))
        elif name in resolved.others and name in actions:
            raw, origin = resolved.others[name]
            out += flag_args(actions[name], convert(actions[name], raw, origin, name))
    return out


def child_settings(
    resolved: Resolved, command_actions: CommandActions, environ: Mapping[str, str]
) -> ChildSettings:
    node = command_actions(NODE_COMMAND)
    router = command_actions(ROUTER_COMMAND)
    names = [*COMMON_FLAGS, *resolved.others]
    unused = [n for n in resolved.others if n not in node and n not in router]
    if unused:
        logger.info("not for the nodes nor the router, left unused: %s", ", ".join(unused))
    return ChildSettings(
        node_args=tuple(_forward(resolved, node, names)),
        router_args=tuple(_forward(resolved, router, names)),
        drop_env=tuple(config_env_names(environ)),
    )
