"""`splitserve ray`: a splitserve cluster on a running Ray cluster (docs/deploy.md).

    splitserve ray up     --address ADDR --num-prefill N --num-decode M [--model ...] [--port ...]
    splitserve ray scale  --num-prefill N --num-decode M
    splitserve ray status [--json]
    splitserve ray down

`up` and `scale` return once every server answers and the router lists exactly the
cluster's nodes; the cluster keeps running in Ray (a detached controller actor owns it)
until `down`. Every action takes --address (default: the Ray
cluster of this host, or RAY_ADDRESS) and --cluster (default: default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from splitserve.engine.model.source import DEFAULT_MODEL
from splitserve.launch.config_sources import Resolved
from splitserve.ray_cluster.config import PLACEMENTS, RayClusterConfig, check_counts
from splitserve.ray_cluster.status import ClusterStatus

# launch/cli.py passes `run` the resolved settings too (node flags from env/--config).
TAKES_SETTINGS = True
# Longest the router may take to list the nodes `up` or `scale` left serving (s): it reads
# Redis about once a second, and a node record expires 5 s after its node died.
ROUTABLE_TIMEOUT_S = 60.0
# Not 6379: the default port of the Ray head's own GCS.
DEFAULT_REDIS_PORT = 6380


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", "auto"),
        help="Ray cluster to use, HOST:PORT of its head (default: RAY_ADDRESS, else the "
        "Ray cluster started on this host)",
    )
    common.add_argument("--cluster", default="default", help="cluster name (Redis key prefix)")
    sub = parser.add_subparsers(dest="ray_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", parents=[common], help="start a cluster on Ray")
    _add_up_arguments(up)
    scale = sub.add_parser("scale", parents=[common], help="change the number of nodes")
    scale.add_argument("--num-prefill", type=int, default=None, help="prefill nodes wanted")
    scale.add_argument("--num-decode", type=int, default=None, help="decode nodes wanted")
    scale.add_argument(
        "--timeout-s", type=float, default=600.0, help="longest wait for new nodes and drains"
    )
    status = sub.add_parser("status", parents=[common], help="where each server runs")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    down = sub.add_parser("down", parents=[common], help="stop the cluster (drains the nodes)")
    down.add_argument("--timeout-s", type=float, default=600.0, help="longest wait for drains")


def _add_up_arguments(up: argparse.ArgumentParser) -> None:
    up.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model directory at the same path on every host, a built-in name (resolved on "
        f"this host) or dummy:<preset> (default: {DEFAULT_MODEL})",
    )
    up.add_argument("--served-model-name", default=None, help="name the API serves the model as")
    up.add_argument("--port", type=int, default=8000, help="router HTTP port (fixed)")
    up.add_argument("--num-prefill", type=int, default=1, help="prefill nodes to start")
    up.add_argument("--num-decode", type=int, default=1, help="decode nodes to start")
    up.add_argument("--redis", default=None, help="use this Redis instead of starting one")
    up.add_argument(
        "--redis-port", type=int, default=DEFAULT_REDIS_PORT, help="port of the Redis started"
    )
    up.add_argument(
        "--host", default=None, help="address every server binds (default: its host's Ray IP)"
    )
    up.add_argument("--cpu", action="store_true", help="nodes run on CPUs, not one GPU each")
    up.add_argument(
        "--cpus-per-node", type=float, default=1.0, help="with --cpu: Ray CPUs each node takes"
    )
    up.add_argument(
        "--node-resource", default="", help="custom Ray resource each node takes one unit of"
    )
    up.add_argument(
        "--router-resource",
        default="",
        help="custom Ray resource that picks the router's host (default: the head node)",
    )
    for role in ("prefill", "decode"):
        up.add_argument(
            f"--{role}-placement", default="spread", choices=PLACEMENTS, help=f"{role} nodes"
        )
        up.add_argument(
            f"--{role}-arg", action="append", default=[], help=f"extra flag for {role} nodes"
        )
    up.add_argument("--node-arg", action="append", default=[], help="extra flag for every node")
    up.add_argument("--router-arg", action="append", default=[], help="extra flag for the router")
    up.add_argument(
        "--drain-timeout-s", type=float, default=None, help="nodes: drain time on scale-down"
    )
    up.add_argument("--max-restarts", type=int, default=5, help="restarts of one actor")
    up.add_argument("--restart-backoff-s", type=float, default=1.0, help="first restart delay")
    up.add_argument(
        "--start-timeout-s", type=float, default=300.0, help="longest start of one server"
    )


def config_from_args(args: argparse.Namespace, resolved: Resolved | None) -> RayClusterConfig:
    from splitserve.launch.child_settings import child_settings
    from splitserve.launch.cli import command_actions
    from splitserve.launch.up_cmd import resolve_served_model

    model, served = resolve_served_model(args.model, args.served_model_name)
    forwarded = child_settings(resolved, command_actions, os.environ) if resolved else None
    return RayClusterConfig(
        model=model,
        served_model_name=served,
        cluster=args.cluster,
        num_prefill=args.num_prefill,
        num_decode=args.num_decode,
        router_port=args.port,
        redis_url=args.redis,
        host=args.host,
        use_gpu=not args.cpu,
        cpus_per_node=args.cpus_per_node,
        node_resource=args.node_resource,
        router_resource=args.router_resource,
        prefill_placement=args.prefill_placement,
        decode_placement=args.decode_placement,
        node_args=(*(forwarded.node_args if forwarded else ()), *args.node_arg),
        prefill_args=tuple(args.prefill_arg),
        decode_args=tuple(args.decode_arg),
        router_args=(*(forwarded.router_args if forwarded else ()), *args.router_arg),
        drop_env=forwarded.drop_env if forwarded else (),
        drain_timeout_s=args.drain_timeout_s,
        max_restarts=args.max_restarts,
        restart_backoff_s=args.restart_backoff_s,
        start_timeout_s=args.start_timeout_s,
    )


def run(args: argparse.Namespace, resolved: Resolved | None = None) -> int:
    from splitserve.ray_cluster import client
    from splitserve.ray_cluster.status import format_status

    config = config_from_args(args, resolved) if args.ray_command == "up" else None
    if args.ray_command == "scale" and args.num_prefill is None and args.num_decode is None:
        raise ValueError("give --num-prefill, --num-decode or both")
    client.connect(args.address)
    try:
        if config is not None:
            print(format_status(routable(client.up(config, args.redis_port))), flush=True)
        elif args.ray_command == "scale":
            print(format_status(routable(_scale(args))), flush=True)
        elif args.ray_command == "status":
            status = client.status(args.cluster)
            text = json.dumps(dataclasses.asdict(status)) if args.json else format_status(status)
            print(text, flush=True)
        else:
            deleted = client.down(args.cluster, args.timeout_s)
            print(f"cluster {args.cluster!r} is down ({deleted} leftover Redis keys deleted)")
    except client.ClusterCallFailed as exc:
        print(f"splitserve ray {args.ray_command}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def routable(status: ClusterStatus, timeout_s: float = ROUTABLE_TIMEOUT_S) -> ClusterStatus:
    """`status` once the router lists exactly its nodes (a new node is routable, a removed
    one is no longer routed to); ClusterCallFailed after `timeout_s`."""
    from splitserve.launch.up_cmd import wait_until_ready
    from splitserve.ray_cluster.client import ClusterCallFailed

    if not status.router_url:
        raise ClusterCallFailed("the router does not answer: `splitserve ray status` shows why")
    try:
        wait_until_ready(status.router_url, status.num_prefill, status.num_decode, timeout_s)
    except RuntimeError as exc:
        raise ClusterCallFailed(str(exc)) from None
    return status


def _scale(args: argparse.Namespace) -> ClusterStatus:
    from splitserve.ray_cluster import client

    num_prefill, num_decode = args.num_prefill, args.num_decode
    if num_prefill is None or num_decode is None:
        now = client.status(args.cluster)
        num_prefill = now.num_prefill if num_prefill is None else num_prefill
        num_decode = now.num_decode if num_decode is None else num_decode
    check_counts(num_prefill, num_decode)
    print(f"scaling cluster {args.cluster!r} to {num_prefill}P{num_decode}D", flush=True)
    return client.scale(args.cluster, num_prefill, num_decode, args.timeout_s)
