"""Transport security of the cluster's gRPC control plane: TLS, mTLS and the cluster token.

One frozen `TransportSecurity` is built from the CLI of every process (router, decode and
prefill nodes) and passed down explicitly:

- a node's gRPC server (node/runtime.py) binds with `add_port(server, address, security)`
  and installs `server_interceptors(security)`: TLS with the node's certificate when
  `ca_certs` is set, client certificates signed by that CA required with
  `require_client_cert` (mTLS), and the cluster token checked on every RPC;
- every client of a node (the router's NodeClients, a decode node's channels to prefill
  nodes) opens its channel with `open_channel(address, options, security)`: TLS verified
  against `ca_certs`, this process's certificate presented as the client certificate, and
  the token sent as `x-splitserve-cluster-token` metadata on every call.

A call without the right token ends with UNAUTHENTICATED before any servicer runs; the
node logs it once per peer connection. The standard `grpc.health.v1` service is left out of
the token check (Kubernetes' gRPC probes cannot send metadata), as the router leaves
/health open; TLS and client certificates still apply to it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "x-splitserve-cluster-token"
# RPCs of these services skip the token check (TLS still applies).
TOKEN_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
# Peers whose refusal was logged, remembered at most this many (then forgotten at once).
MAX_LOGGED_PEERS = 1024

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class TransportSecurity:
    # PEM bundle of the cluster CA; set: gRPC runs over TLS, servers are verified against it
    # (and, with require_client_cert, so are clients). Empty: plaintext gRPC.
    ca_certs: str = ""
    # This process's PEM certificate and key: a node serves TLS with them, and every process
    # presents them as its client certificate. Both or neither.
    certfile: str = ""
    keyfile: str = ""
    # Nodes refuse TLS clients without a certificate signed by ca_certs (mTLS).
    require_client_cert: bool = False
    # Shared secret every RPC must carry; empty: no token check.
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("pass --grpc-certfile and --grpc-keyfile together")
        if self.certfile and not self.ca_certs:
            raise ValueError(
                "--grpc-certfile needs --grpc-ca-certs (the CA that verifies the cluster's "
                "certificates): TLS is on for the whole cluster or off"
            )
        if self.require_client_cert and not self.ca_certs:
            raise ValueError("--grpc-require-client-cert needs --grpc-ca-certs")
        if self.token != self.token.strip():
            raise ValueError("the cluster token must not start or end with whitespace")

    @property
    def is_tls(self) -> bool:
        return bool(self.ca_certs)

    def describe(self) -> str:
        """One line for the start-up log (never the token itself)."""
        tls = "mTLS" if self.require_client_cert else ("TLS" if self.is_tls else "plaintext")
        return f"{tls}, cluster token {'on' if self.token else 'off'}"


def read_token_file(path: str) -> str:
    """The cluster token stored in `path` (surrounding whitespace dropped)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read --cluster-token-file {path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"--cluster-token-file {path} is empty: write the token into it")
    return token


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None


def server_credentials(security: TransportSecurity) -> grpc.ServerCredentials:
    """The node's TLS server credentials (security.is_tls and a certificate required)."""
    if not security.certfile:
        raise ValueError(
            "a node serving TLS needs its certificate: pass --grpc-certfile and --grpc-keyfile"
        )
    pair = (_read(security.keyfile, "--grpc-keyfile"), _read(security.certfile, "--grpc-certfile"))
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=_read(security.ca_certs, "--grpc-ca-certs"),
        require_client_auth=security.require_client_cert,
    )


def add_port(server: grpc.aio.Server, address: str, security: TransportSecurity) -> int:
    """Bind `address` (TLS when configured); the bound port, 0 when binding failed."""
    if not security.is_tls:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(security))


def channel_credentials(security: TransportSecurity) -> grpc.ChannelCredentials:
    key = _read(security.keyfile, "--grpc-keyfile") if security.keyfile else None
    cert = _read(security.certfile, "--grpc-certfile") if security.certfile else None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(security.ca_certs, "--grpc-ca-certs"),
        private_key=key,
        certificate_chain=cert,
    )


def open_channel(
    address: str, options: ChannelOptions, security: TransportSecurity
) -> grpc.aio.Channel:
    """A channel to a node that carries this process's credentials on every call."""
    interceptors = _client_interceptors(security.token) if security.token else None
    if security.is_tls:
        return grpc.aio.secure_channel(
            address, channel_credentials(security), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(TOKEN_METADATA_KEY, token)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TokenInterceptor:
    """Adds the cluster token to a call's metadata; one subclass per call kind, since a
    grpc.aio channel files each interceptor under one kind only."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def _intercept(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._token), request)


class _TokenUnaryUnary(_TokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _TokenInterceptor._intercept


class _TokenUnaryStream(_TokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _TokenInterceptor._intercept


class _TokenStreamStream(_TokenInterceptor, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _TokenInterceptor._intercept


def _client_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    return [_TokenUnaryUnary(token), _TokenUnaryStream(token), _TokenStreamStream(token)]


class ClusterTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every RPC without the cluster token (logged once per peer)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._logged_peers: set[str] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(TOKEN_EXEMPT_PREFIXES) or self._is_valid(handler_call_details):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        return self._refusal(handler, method)

    def _is_valid(self, details: grpc.HandlerCallDetails) -> bool:
        given = b""
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                given = value if isinstance(value, bytes) else value.encode()
        return bool(given) and hmac.compare_digest(given, self._token)

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            peer = context.peer()
            if peer not in self._logged_peers:
                if len(self._logged_peers) >= MAX_LOGGED_PEERS:
                    self._logged_peers.clear()
                self._logged_peers.add(peer)
                logger.warning(
                    "refused %s from %s: missing or wrong cluster token (further refusals of "
                    "this peer are not logged)",
                    method,
                    peer,
                )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong cluster token: start this process with the cluster's "
                "--cluster-token or --cluster-token-file",
            )

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await refuse(request, context)
            yield  # pragma: no cover - abort raised above

        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        behaviour = refuse_stream if handler.response_streaming else refuse
        return make(
            behaviour,  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def server_interceptors(security: TransportSecurity) -> list[grpc.aio.ServerInterceptor]:
    return [ClusterTokenInterceptor(security.token)] if security.token else []
