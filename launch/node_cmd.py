"""`splitserve prefill ...` and `splitserve decode ...`: run one node until SIGINT/SIGTERM.

Once it serves it freezes its start-up heap out of garbage collection (launch/gc_heap.py),
then prints `<role> node <id> listening on <host:port>` (launchers and tests wait for that
line) and `<role> node <id> metrics at <url>` (the URL is in its Redis record too), then
stops cleanly on a signal: deregisters from Redis, lets
in-flight requests finish for --drain-timeout-s (then aborts them), frees the NIXL
registration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from splitserve.launch.engine_args import (
    add_engine_arguments,
    default_of,
    engine_config_from_args,
)
from splitserve.launch.gc_heap import freeze_startup_heap
from splitserve.launch.security_args import add_security_arguments, security_from_args
from splitserve.launch.tracing_args import add_tracing_argument
from splitserve.node.runtime import NodeConfig, NodeRole, NodeRuntime
from splitserve.protocol.log_context import tag_process

logger = logging.getLogger(__name__)


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    node = NodeConfig
    g = parser.add_argument_group("node")
    g.add_argument("--host", default=default_of(node, "host"), help="address the gRPC server binds")
    g.add_argument(
        "--port", type=int, default=default_of(node, "port"), help="gRPC port; 0 picks a free one"
    )
    g.add_argument(
        "--advertise-host",
        default=default_of(node, "advertise_host"),
        help="host others reach this node at",
    )
    g.add_argument(
        "--redis", default=default_of(node, "redis_url"), help="redis://host:port/db of the cluster"
    )
    g.add_argument(
        "--cluster", default=default_of(node, "cluster"), help="cluster name (Redis key prefix)"
    )
    timeouts = {
        "prefill_timeout_s": "decode: longest wait for a remote prefill before prefilling "
        "locally (a stalled push falls back sooner, docs/reliability.md)",
        "drain_timeout_s": "on SIGTERM: time running requests get to finish",
        "push_timeout_s": "prefill: longest a KV push to a decode node may take",
    }
    for name, help_text in timeouts.items():
        flag = "--" + name.replace("_", "-")
        g.add_argument(flag, type=float, default=default_of(node, name), help=help_text)
    g.add_argument(
        "--stream-interval",
        type=int,
        default=default_of(node, "stream_interval"),
        help="decode: tokens per stream message after the first (fewer messages at high load)",
    )
    g.add_argument(
        "--metrics-host",
        default=default_of(node, "metrics_host"),
        help="address the HTTP /metrics server binds (docs/metrics.md)",
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=default_of(node, "metrics_port"),
        help="port of the HTTP /metrics server; 0 picks a free one",
    )
    add_tracing_argument(g)
    _add_launch_lag_arguments(g, node)
    add_security_arguments(parser)


def _add_launch_lag_arguments(g: argparse._ArgumentGroup, node: type[NodeConfig]) -> None:
    g.add_argument(
        "--launch-lag-s",
        type=float,
        default=default_of(node, "launch_lag_s"),
        help="CUDA: seconds of steps to record with launch probes, where the device waits "
        "for the host in each forward pass (node/launch_lag.py); 0: off",
    )
    g.add_argument(
        "--launch-lag-after-s",
        type=float,
        default=default_of(node, "launch_lag_after_s"),
        help="... starting this long after the node serves",
    )
    g.add_argument(
        "--launch-lag-out",
        default=default_of(node, "launch_lag_out"),
        help="... and write their summary to this JSON file (else only logged)",
    )


def node_config_from_args(args: argparse.Namespace, role: NodeRole) -> NodeConfig:
    return NodeConfig(
        role=role,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        redis_url=args.redis,
        cluster=args.cluster,
        prefill_timeout_s=args.prefill_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        push_timeout_s=args.push_timeout_s,
        stream_interval=args.stream_interval,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        security=security_from_args(args),
        launch_lag_s=args.launch_lag_s,
        launch_lag_after_s=args.launch_lag_after_s,
        launch_lag_out=args.launch_lag_out,
    )


async def serve(runtime: NodeRuntime) -> None:
    if runtime.config.role == "prefill":
        from splitserve.prefill.service import add_prefill_service as add
    else:
        from splitserve.decode.service import add_decode_service as add
    await runtime.start(add)
    freeze_startup_heap()
    print(
        f"{runtime.config.role} node {runtime.node_id} listening on {runtime.address}\n"
        f"{runtime.config.role} node {runtime.node_id} metrics at {runtime.metrics_url}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stop signal: draining")
    await runtime.stop()


def run_node(args: argparse.Namespace, role: NodeRole) -> int:
    tag_process("", role)  # the node id once its port is bound (NodeRuntime.start)
    engine_config = engine_config_from_args(args)
    runtime = NodeRuntime(engine_config, node_config_from_args(args, role))
    asyncio.run(serve(runtime))
    return 0
