"""The `splitserve` command: one subcommand per role or tool.

Each subcommand lives in its own module, imported only when chosen (so `splitserve bench`
never imports torch). A subcommand module exposes:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int     # the process exit code

Every command takes its settings from flags, then SPLITSERVE_<FLAG> environment variables,
then a --config YAML file, then the built-in defaults (launch/config_sources.py);
`--print-config` prints the effective settings and where each came from, and exits.
Logging is set up once here, before the command runs (--log-level, --log-format:
launch/log_format.py).

User errors (ValueError, FileNotFoundError) end with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence

from splitserve.launch import config_sources
from splitserve.launch.log_format import LOG_FORMATS, configure_logging

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("splitserve.launch.generate_cmd", "offline generation with the engine"),
    "make-tiny-model": (
        "splitserve.launch.tiny_model_cmd",
        "write a tiny seeded test model in Hugging Face format",
    ),
    "bench": ("splitserve.benchmarks.cli", "SLO benchmark against an OpenAI-compatible server"),
    "up": ("splitserve.launch.up_cmd", "start a whole cluster on this host"),
    "prefill": ("splitserve.launch.prefill_cmd", "run a prefill node"),
    "decode": ("splitserve.launch.decode_cmd", "run a decode node"),
    "router": ("splitserve.launch.router_cmd", "run the OpenAI-compatible router"),
    # Needs the `ray` extra; its own package, which imports launch (so no import back).
    "ray": ("splitserve.ray_cluster.cli", "run a cluster on Ray: up, scale, status, down"),
}

LOG_LEVELS = ("debug", "info", "warning", "error")


def _common_arguments(is_repeat: bool = False) -> argparse.ArgumentParser:
    """The flags every command takes. `is_repeat`: their copy on a sub-action's parser
    (`bench run --config f`), which leaves what the command's parser read alone unless
    the flag is given after the action."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="logging verbosity")
    g.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="log lines as text, or as JSON objects with request id, node id and role",
    )
    g.add_argument(
        "--config",
        default=None,
        help="YAML file of settings (keys: flag names); flags and SPLITSERVE_* env win over it",
    )
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (YAML) with where each came from, and exit",
    )
    if is_repeat:
        for action in common._actions:
            action.default = argparse.SUPPRESS
    return common


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.splitlines()[0])
    common = _common_arguments()
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, parents=[common])
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub)
            _repeat_common_on_actions(sub)
    return parser


def _repeat_common_on_actions(parser: argparse.ArgumentParser) -> None:
    """The common flags on every sub-action's parser too (`bench run --log-level debug`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for common in _common_arguments(is_repeat=True)._actions:
                    if not set(common.option_strings) & set(sub._option_string_actions):
                        sub._add_action(common)


def command_flags() -> Mapping[str, frozenset[str]]:
    """command -> every flag name it takes (imports every command module: slow, rare)."""
    return {name: config_sources.all_flag_names(_build_parser([name])) for name in SUBCOMMANDS}


def command_actions(name: str) -> Mapping[str, argparse.Action]:
    """flag name -> action of the command `name` (imports its module)."""
    sub = config_sources.subcommand_parser(_build_parser([name]), name)
    return config_sources.option_actions([sub])


def resolve_args(argv: Sequence[str], environ: Mapping[str, str]) -> config_sources.Resolved:
    """`argv` with the environment and the --config file filled in (config_sources.py)."""
    parser = _build_parser(argv)
    if "-h" in argv or "--help" in argv:
        parser.parse_args(argv)  # prints the help and exits
    return config_sources.resolve(parser, argv, environ, command_flags)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        resolved = resolve_args(args_list, os.environ)
    except (ValueError, FileNotFoundError) as exc:
        command = next((a for a in args_list if a in SUBCOMMANDS), None)
        prog = f"splitserve {command}" if command else "splitserve"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    args = resolved.args
    configure_logging(str(args.log_level), str(args.log_format))
    if args.print_config:
        print(config_sources.render_yaml(resolved, args.command), flush=True)
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        code = module.run(args, resolved) if _takes_settings(module) else module.run(args)
        return int(code)
    except (ValueError, FileNotFoundError) as exc:
        print(f"splitserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _takes_settings(module: object) -> bool:
    """A command that forwards settings to child processes (up) takes the Resolved too."""
    return bool(getattr(module, "TAKES_SETTINGS", False))


if __name__ == "__main__":
    sys.exit(main())
