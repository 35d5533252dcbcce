"""The standard gRPC health service (`grpc.health.v1.Health`) of a node, which Kubernetes
gRPC probes, `grpc_health_probe` and load balancers speak.

Who calls what, in order (node/runtime.py):
  1. `NodeHealth(role)` then `add_to(server)` before the gRPC server starts: both services
     answer NOT_SERVING while the engine, the NIXL agent and the Redis registration come up.
  2. `set_serving(True)` once the node serves and is registered.
  3. `set_serving(False)` first thing on a stop signal: probes see NOT_SERVING for the
     whole drain (in-flight requests finishing), while the server still answers.
  4. `shutdown()` just before the server stops: NOT_SERVING for good (later sets ignored).

Services answered: "" (the whole server) and the node's own gRPC service, `splitserve.Decode`
or `splitserve.Prefill`; any other name is NOT_FOUND. `Check` answers at once; `Watch`
streams every change. The node's own `Health` RPC (node/rpcs.py) says DRAINING in the same
window, with more detail.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.protocol import node_pb2 as pb

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The node's own gRPC service per role, as a probe names it (`-service=splitserve.Decode`).
ROLE_SERVICES = {
    "decode": pb.DESCRIPTOR.services_by_name["Decode"].full_name,
    "prefill": pb.DESCRIPTOR.services_by_name["Prefill"].full_name,
}


def service_name(role: str) -> str:
    """The gRPC service name a node of `role` is probed under."""
    try:
        return ROLE_SERVICES[role]
    except KeyError:
        raise ValueError(f"role must be one of {sorted(ROLE_SERVICES)}, got {role!r}") from None


class NodeHealth:
    """The node's grpc.health.v1 servicer and the one switch that flips its two services."""

    def __init__(self, role: str) -> None:
        self.services = ("", service_name(role))
        self.servicer = health.aio.HealthServicer()
        self.is_serving = False

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """NOT_SERVING on every service (the servicer starts with "" SERVING)."""
        for name in self.services:
            await self.servicer.set(name, NOT_SERVING)

    async def set_serving(self, is_serving: bool) -> None:
        status = SERVING if is_serving else NOT_SERVING
        for name in self.services:
            await self.servicer.set(name, status)
        if is_serving != self.is_serving:
            logger.info("grpc.health.v1: %s", "SERVING" if is_serving else "NOT_SERVING")
        self.is_serving = is_serving

    async def shutdown(self) -> None:
        """NOT_SERVING for good: the server is about to stop."""
        await self.servicer.enter_graceful_shutdown()
        self.is_serving = False
