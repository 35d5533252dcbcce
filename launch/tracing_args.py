"""`--otlp-traces-endpoint`, the same flag on `router`, `prefill`, `decode` and `up`."""

from __future__ import annotations

import argparse

from splitserve.launch.engine_args import default_of
from splitserve.protocol.tracing import TracingConfig

FLAG = "--otlp-traces-endpoint"


def add_tracing_argument(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument(
        FLAG,
        default=default_of(TracingConfig, "endpoint"),
        metavar="URL",
        help="send OpenTelemetry spans to this OTLP/gRPC collector, e.g. http://127.0.0.1:4317 "
        "(https:// for TLS); needs the otel extra. Default: tracing off",
    )
