"""Where a command's settings come from, in order of precedence:

    1. a flag on the command line             --max-num-seqs 8
    2. an environment variable                SPLITSERVE_MAX_NUM_SEQS=8
    3. a key of the --config YAML file        max-num-seqs: 8   (or max_num_seqs: 8)
    4. the built-in default                   (the flag's default, read from the config
                                               dataclasses through `default_of`)

Generic over argparse: every optional flag of the chosen command's parser (and of its
sub-action, `bench run`) is a setting, so flags added later are covered without a line
here. Values from the environment and the file are parsed as the flag would parse them
(launch/setting_values.py). A YAML null leaves the key unset.

A key (or a SPLITSERVE_ variable) that is a flag of another splitserve command is left to
that command (one file or environment can serve a whole deployment; `splitserve up` forwards
those of the nodes and the router to its children); one that is a flag of no command is an
error naming it. SPLITSERVE_ variables that are not flags are listed in NON_FLAG_ENV.

Who calls what (launch/cli.py `main`, once per process): `resolve(parser, argv, environ,
other_commands)` parses the command line alone, reads the environment and the file, checks
unknown keys (`other_commands` is called only then: it imports every command), converts,
and parses again with those values as defaults -> `Resolved` (the namespace, where each
value came from, the other commands' settings) -> `render_yaml(resolved, command)` for
`--print-config`; `up` hands `Resolved.others` to launch/child_settings.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from splitserve.launch.setting_values import (
    Origin,
    convert,
    flag_name,
    primary_name,
    read_config_file,
)

ENV_PREFIX = "SPLITSERVE_"
# SPLITSERVE_ variables that are not flags (each read where it is used).
NON_FLAG_ENV = frozenset(
    {
        "SPLITSERVE_CACHE",  # converted-model cache (engine/model/source.py)
        "SPLITSERVE_GIT_COMMIT",  # commit recorded in benchmark results (benchmarks/results_io.py)
        "SPLITSERVE_FREEZE_S",  # fault-test freeze length (tests/test_faults_freeze.py)
    }
)
# Flags that steer the resolution itself and are no settings of the file.
CONFIG_FLAG = "config"
PRINT_FLAG = "print-config"
_NOT_IN_FILE = frozenset({CONFIG_FLAG, PRINT_FLAG})
# --print-config shows these as *** (secrets).
SECRET_NAME = re.compile(r"(^|-)(key|token|secret|password)($|-)")

# command name -> its flag names (every command of the CLI); called only when a key is not
# one of the chosen command's flags.
OtherCommands = Callable[[], Mapping[str, frozenset[str]]]


@dataclass(frozen=True)
class Resolved:
    args: argparse.Namespace
    # flag name (no dashes) -> where its value came from, for every setting of the command.
    origins: dict[str, Origin]
    # flag name -> its dest in `args`, and the action's first name (`no-stream` -> `stream`).
    dests: dict[str, str]
    primary: dict[str, str]
    # Settings of other commands (flag name -> raw value, origin), for `up` to forward.
    others: dict[str, tuple[Any, Origin]] = field(default_factory=dict)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper().replace("-", "_")


def config_env_names(environ: Mapping[str, str]) -> list[str]:
    """The SPLITSERVE_ variables of `environ` that name settings (not NON_FLAG_ENV)."""
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in NON_FLAG_ENV)


def command_parsers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Any]:
    """The parsers the parsed `args` went through, top first (`splitserve`, `bench`, `run`)."""
    path = [parser]
    while True:
        subs = _subparser_actions(path[-1])
        chosen = getattr(args, subs[0].dest, None) if subs else None
        if not subs or chosen not in subs[0].choices:
            return path
        path.append(subs[0].choices[chosen])


def _subparser_actions(parser: argparse.ArgumentParser) -> list[Any]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _tree(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every parser below it."""
    out = [parser]
    for action in _subparser_actions(parser):
        for sub in action.choices.values():
            out += _tree(sub)
    return out


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of `parser`'s sub-command `name`."""
    for action in _subparser_actions(parser):
        if name in action.choices:
            sub: argparse.ArgumentParser = action.choices[name]
            return sub
    raise ValueError(f"{parser.prog} has no sub-command {name!r}")


def option_actions(parsers: Sequence[argparse.ArgumentParser]) -> dict[str, argparse.Action]:
    """flag name -> action, for every long option of `parsers` but --help."""
    out: dict[str, argparse.Action] = {}
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            for option in action.option_strings:
                if option.startswith("--"):
                    out[flag_name(option)] = action
    return out


def all_flag_names(parser: argparse.ArgumentParser) -> frozenset[str]:
    """Every flag name of `parser` and of all its sub-actions."""
    return frozenset(option_actions(_tree(parser)))


@contextlib.contextmanager
def _patched(actions: Sequence[Any], **attrs: Any) -> Iterator[None]:
    saved = [(a, {k: getattr(a, k) for k in attrs}) for a in actions]
    try:
        for action in actions:
            for key, value in attrs.items():
                setattr(action, key, value)
        yield
    finally:
        for action, old in saved:
            for key, value in old.items():
                setattr(action, key, value)


def _tree_optionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for p in _tree(parser)
        for a in p._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]


def _tree_groups(parser: argparse.ArgumentParser) -> list[Any]:
    return [g for p in _tree(parser) for g in p._mutually_exclusive_groups]


class _CommandLineError(Exception):
    """The command line is wrong whatever the environment and the file hold."""


def _raise_error(message: str) -> NoReturn:
    raise _CommandLineError(message)


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """The command line alone: only what it names is in the namespace. A wrong command line
    is reported by the unpatched parser (its usage line, exit code 2)."""
    try:
        with (
            _patched(_tree_optionals(parser), default=argparse.SUPPRESS, required=False),
            _patched(_tree_groups(parser), required=False),
            _patched(_tree(parser), error=_raise_error),
        ):
            return parser.parse_args(argv)
    except _CommandLineError as exc:
        parser.parse_args(argv)  # exits with the parser's own message
        raise ValueError(str(exc)) from None


@dataclass
class _Gathered:
    """Raw values from the environment and the file, before conversion."""

    mine: dict[str, tuple[Any, Origin]] = field(default_factory=dict)
    others: dict[str, tuple[Any, Origin]] = field(default_factory=dict)


def _gather(
    actions: Mapping[str, argparse.Action],
    environ: Mapping[str, str],
    config_path: str | None,
) -> _Gathered:
    out = _Gathered()
    for var in config_env_names(environ):
        name = flag_name(var[len(ENV_PREFIX) :])
        target = out.mine if name in actions else out.others
        target[name] = (environ[var], Origin("env", var))
    if not config_path:
        return out
    for key, raw in read_config_file(config_path).items():
        name = flag_name(str(key))
        if name in _NOT_IN_FILE:
            raise ValueError(f"--config {config_path}: {key!r} cannot be set in a config file")
        if raw is None:
            continue
        target = out.mine if name in actions else out.others
        target.setdefault(name, (raw, Origin("file", config_path)))
    return out


def _check_known(
    others: Mapping[str, tuple[Any, Origin]], other_commands: OtherCommands, command: str
) -> None:
    if not others:
        return
    known = frozenset().union(*other_commands().values())
    for name, (_, origin) in others.items():
        if name not in known:
            key = origin.where if origin.kind == "env" else f"{name!r} in {origin.where}"
            raise ValueError(
                f"{key}: unknown setting: no splitserve command has a flag --{name} "
                f"(see `{command} --help`)"
            )


def _check_required(actions: Mapping[str, argparse.Action], given: set[str]) -> None:
    for name, action in actions.items():
        names = {flag_name(o) for o in action.option_strings}
        if action.required and not names & given:
            raise ValueError(
                f"--{name} is required: give it as a flag, as {env_name(name)} or as "
                f"'{name}:' in the --config file"
            )


def resolve(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str],
    other_commands: OtherCommands,
) -> Resolved:
    """The namespace of `argv` with the environment and the --config file filled in."""
    explicit_ns = _explicit(parser, argv)
    path = command_parsers(parser, explicit_ns)
    actions = option_actions(path[1:])
    explicit = {n for n, a in actions.items() if hasattr(explicit_ns, a.dest)}
    config_path = getattr(explicit_ns, CONFIG_FLAG, None) or environ.get(env_name(CONFIG_FLAG))
    gathered = _gather(actions, environ, config_path if CONFIG_FLAG in actions else None)
    _check_known(gathered.others, other_commands, path[-1].prog)
    values = {n: convert(actions[n], raw, o, n) for n, (raw, o) in gathered.mine.items()}
    _check_required(actions, explicit | set(values))
    supplied = {n: actions[n] for n in values if n not in explicit}
    with contextlib.ExitStack() as stack:
        for name, action in supplied.items():
            stack.enter_context(_patched([action], default=values[name], required=False))
        chosen = set(supplied.values())
        groups = [g for g in _tree_groups(parser) if set(g._group_actions) & chosen]
        stack.enter_context(_patched(groups, required=False))
        args = parser.parse_args(argv)
    # Per action, so that `no-stream: true` in a file shows as the source of `stream`.
    by_action = {id(actions[n]): origin for n, (_, origin) in gathered.mine.items()}
    by_action.update({id(actions[n]): Origin("flag") for n in explicit})
    origins = {n: by_action.get(id(a), Origin("default")) for n, a in actions.items()}
    dests = {n: a.dest for n, a in actions.items()}
    primary = {n: primary_name(a) for n, a in actions.items()}
    return Resolved(args, origins, dests, primary, dict(gathered.others))


def render_yaml(resolved: Resolved, command: str) -> str:
    """`--print-config`: every setting as YAML (a valid --config file), with its source."""
    lines = [
        f"# splitserve {command}: effective settings",
        "# precedence: flag > SPLITSERVE_* environment > --config file > default",
    ]
    for name, origin in resolved.origins.items():
        if name in _NOT_IN_FILE or name != resolved.primary[name]:
            continue  # shown under its first name (`stream`, not `no-stream`)
        value = getattr(resolved.args, resolved.dests[name], None)
        shown = '"***"' if value and SECRET_NAME.search(name) else json.dumps(value, default=str)
        lines.append(f"{name}: {shown}  # {origin}")
    return "\n".join(lines)
