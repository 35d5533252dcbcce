"""`splitserve router`: the OpenAI-compatible HTTP front end of a cluster, until SIGINT/SIGTERM.

Prints `router listening on http://<host>:<port>` once it serves (launchers and tests wait
for that line), then stops cleanly on a signal (in-flight requests get a few seconds) and
exits with code 0.
"""

from __future__ import annotations

import argparse
import asyncio

from splitserve.node.registry import DEFAULT_CLUSTER
from splitserve.router.config import RouterConfig
from splitserve.router.policy import POLICIES, PolicyConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("router")
    g.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds")
    g.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one")
    g.add_argument("--redis", required=True, help="redis://host:port/db of the cluster")
    g.add_argument("--cluster", default=DEFAULT_CLUSTER, help="cluster name (Redis key prefix)")
    g.add_argument(
        "--model",
        default="",
        help="served model name to expect (the nodes' --served-model-name or --model); "
        "default: whatever the live decode nodes serve",
    )
    g.add_argument(
        "--tokenizer",
        default="",
        help="local tokenizer directory or dummy:<preset> (default: --model)",
    )
    g.add_argument("--api-key", default="", help="require 'Authorization: Bearer <key>'")
    g.add_argument("--routing-policy", default="cache_aware", choices=POLICIES)
    g.add_argument(
        "--disagg-min-tokens",
        type=int,
        default=PolicyConfig.disagg_min_tokens,
        help="uncached prompt tokens below which the decode node prefills itself",
    )


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        redis_url=args.redis,
        tokenizer=args.tokenizer,
        model=args.model,
        cluster=args.cluster,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        policy=PolicyConfig(name=args.routing_policy, disagg_min_tokens=args.disagg_min_tokens),
    )


def run(args: argparse.Namespace) -> int:
    from splitserve.router.server import RouterServer

    config = config_from_args(args)
    server = RouterServer(config, log_level=str(args.log_level))
    asyncio.run(server.serve(on_ready=lambda url: print(f"router listening on {url}", flush=True)))
    return 0
