"""The `splitserve` command: one subcommand per role or tool.

Each subcommand lives in its own module, imported only when chosen (so `splitserve bench`
never imports torch). A subcommand module exposes:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int     # the process exit code

Logging is set up once here, before the command runs (--log-level, --log-format:
launch/log_format.py).

User errors (ValueError, FileNotFoundError) end with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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
}

LOG_LEVELS = ("debug", "info", "warning", "error")


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="logging verbosity")
    common.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="log lines as text, or as JSON objects with request id, node id and role",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, parents=[common])
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(args_list)
    args = parser.parse_args(args_list)
    configure_logging(str(args.log_level), str(args.log_format))
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"splitserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
