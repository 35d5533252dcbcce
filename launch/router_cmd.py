"""`splitserve router`: the OpenAI-compatible HTTP front end of a cluster, until SIGINT/SIGTERM.

Once it serves it freezes its start-up heap out of garbage collection (launch/gc_heap.py),
then prints `router listening on http(s)://<host>:<port>` (launchers and tests wait for that
line), then stops cleanly on a signal (in-flight requests get a few seconds) and
exits with code 0.
"""

from __future__ import annotations

import argparse
import asyncio

from splitserve.launch.gc_heap import freeze_startup_heap
from splitserve.launch.security_args import add_security_arguments, security_from_args
from splitserve.launch.tracing_args import add_tracing_argument
from splitserve.node.registry import DEFAULT_CLUSTER
from splitserve.router.config import RouterConfig
from splitserve.router.policy import POLICIES, PolicyConfig
from splitserve.router.tool_parsers import TOOL_CALL_PARSERS


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
    g.add_argument(
        "--routing-policy",
        default="cache_aware",
        choices=POLICIES,
        help="how a decode (and prefill) node is chosen per prompt",
    )
    g.add_argument(
        "--disagg-min-tokens",
        type=int,
        default=PolicyConfig.disagg_min_tokens,
        help="uncached prompt tokens below which the decode node prefills itself",
    )
    _add_request_arguments(g)
    g.add_argument(
        "--tool-call-parser",
        default=None,
        choices=tuple(TOOL_CALL_PARSERS),
        help="the model's tool-call format, read for tool_choice 'auto': llama3_json (Llama "
        "3.x), hermes (Qwen2.5/3, Hermes); default none: 'auto' is a 400",
    )
    g.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser requests from this origin ('*' for any); repeat for several",
    )
    g.add_argument(
        "--trace-stream-timing",
        action="store_true",
        help="export per-message streaming stage times in /metrics (nodes on this host only)",
    )
    g.add_argument(
        "--multiplex-streams",
        action=argparse.BooleanOptionalAction,
        default=RouterConfig.multiplex_streams,
        help="one Decode.GenerateMany stream per decode node for all its requests (default; "
        "--no-multiplex-streams: one Decode.Generate stream per request)",
    )
    add_tracing_argument(g)
    _add_https_arguments(parser)
    add_security_arguments(parser)
    _add_liveness_arguments(parser)


def _add_request_arguments(g: argparse._ArgumentGroup) -> None:
    """How the router reads requests: body size, parsing threads, unknown fields."""
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=0,
        help="largest request body; larger is a 413 (default 0: from the model's context)",
    )
    g.add_argument(
        "--tokenizer-threads",
        type=int,
        default=0,
        help="threads that parse and tokenize requests off the event loop (0: one per core)",
    )
    g.add_argument(
        "--strict-fields",
        action="store_true",
        help="reject unknown request fields with a 400 (default: ignore and log them, as vLLM)",
    )


def _add_https_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("router access: API key and HTTPS")
    g.add_argument(
        "--api-key",
        default="",
        help="require 'Authorization: Bearer <key>' on every path but /health, /live, /ready "
        "(and /metrics, unless --protect-metrics)",
    )
    g.add_argument(
        "--protect-metrics", action="store_true", help="/metrics requires --api-key as well"
    )
    g.add_argument("--ssl-certfile", default="", help="PEM certificate: serve HTTPS")
    g.add_argument("--ssl-keyfile", default="", help="PEM private key of --ssl-certfile")
    g.add_argument(
        "--ssl-ca-certs",
        default="",
        help="PEM CA bundle: require HTTPS clients to present a certificate signed by it",
    )


def _add_liveness_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("router liveness (docs/reliability.md)")
    defaults = RouterConfig(redis_url="redis://unused", model="unused")
    g.add_argument(
        "--keepalive-interval-s",
        type=float,
        default=defaults.keepalive_interval_s,
        help="gRPC ping interval towards nodes",
    )
    g.add_argument(
        "--keepalive-timeout-s",
        type=float,
        default=defaults.keepalive_timeout_s,
        help="a node that does not answer a ping within this is dead to its streams",
    )
    g.add_argument(
        "--stream-idle-timeout-s",
        type=float,
        default=defaults.stream_idle_timeout_s,
        help="longest silence of a decode stream after its first token",
    )
    g.add_argument(
        "--first-message-timeout-s",
        type=float,
        default=defaults.first_message_timeout_s,
        help="longest wait for a decode stream's first token (prefill included)",
    )
    g.add_argument(
        "--http-keep-alive-s",
        type=int,
        default=defaults.http_keep_alive_s,
        help="idle HTTP client connections stay open this long (keep it above the clients' "
        "and load balancers' own idle timeouts)",
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
        protect_metrics=args.protect_metrics,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_ca_certs=args.ssl_ca_certs,
        security=security_from_args(args),
        policy=PolicyConfig(name=args.routing_policy, disagg_min_tokens=args.disagg_min_tokens),
        keepalive_interval_s=args.keepalive_interval_s,
        keepalive_timeout_s=args.keepalive_timeout_s,
        stream_idle_timeout_s=args.stream_idle_timeout_s,
        first_message_timeout_s=args.first_message_timeout_s,
        http_keep_alive_s=args.http_keep_alive_s,
        max_body_bytes=args.max_body_bytes,
        num_tokenizer_threads=args.tokenizer_threads,
        strict_fields=args.strict_fields,
        cors_origins=tuple(args.cors_origin),
        trace_stream_timing=args.trace_stream_timing,
        multiplex_streams=args.multiplex_streams,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        tool_call_parser=args.tool_call_parser or "",
    )


def run(args: argparse.Namespace) -> int:
    from splitserve.protocol.log_context import tag_process
    from splitserve.router.server import RouterServer

    tag_process("", "router")
    config = config_from_args(args)
    server = RouterServer(config, log_level=str(args.log_level))

    def ready(url: str) -> None:
        freeze_startup_heap()
        print(f"router listening on {url}", flush=True)

    asyncio.run(server.serve(on_ready=ready))
    return 0
