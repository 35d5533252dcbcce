"""Flags of the cluster's gRPC transport security, shared by `splitserve router`, `prefill`
and `decode`, and the TransportSecurity they build (protocol/security.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitserve.protocol.security import TransportSecurity, read_token_file


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster transport security (docs/operations.md#security)")
    g.add_argument(
        "--grpc-ca-certs",
        default="",
        help="PEM CA bundle of the cluster: gRPC between router and nodes runs over TLS, "
        "peers verified against it",
    )
    g.add_argument(
        "--grpc-certfile",
        default="",
        help="this process's PEM certificate (a node serves TLS with it; every process "
        "presents it as its client certificate)",
    )
    g.add_argument("--grpc-keyfile", default="", help="the private key of --grpc-certfile")
    g.add_argument(
        "--grpc-require-client-cert",
        action="store_true",
        help="node: refuse gRPC clients without a certificate signed by --grpc-ca-certs (mTLS)",
    )
    token = g.add_mutually_exclusive_group()
    token.add_argument(
        "--cluster-token",
        default="",
        help="shared secret every gRPC call in the cluster carries and every node checks",
    )
    token.add_argument(
        "--cluster-token-file",
        default="",
        help="read --cluster-token from this file (keeps it out of the process list)",
    )


def security_from_args(args: argparse.Namespace) -> TransportSecurity:
    """The flags' TransportSecurity; ValueError (a one-line message) for a file that cannot be
    read, before any model is loaded."""
    token = read_token_file(args.cluster_token_file) if args.cluster_token_file else ""
    for flag in ("grpc_ca_certs", "grpc_certfile", "grpc_keyfile"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")
    return TransportSecurity(
        ca_certs=args.grpc_ca_certs,
        certfile=args.grpc_certfile,
        keyfile=args.grpc_keyfile,
        require_client_cert=args.grpc_require_client_cert,
        token=token or args.cluster_token,
    )
