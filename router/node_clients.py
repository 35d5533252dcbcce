"""gRPC channels from the router to nodes: one grpc.aio channel per address, reused.

The router streams requests from decode nodes (`open_generate`: over one
`Decode.GenerateMany` stream per node, router/multiplex.py, or one `Decode.Generate`
stream each), sends `Decode.Abort` when a
client goes away, and calls `Stats` on decode and prefill nodes (for /metrics, and for fresh
load while Redis is down). Channels reconnect quickly (200 ms to 2 s backoff), so a node that
restarts on the same address is reachable again within a heartbeat or two. Every channel
pings its node (protocol/keepalive.py): a frozen node fails its streams with UNAVAILABLE
within keepalive interval + timeout instead of holding them. Channels carry the cluster's
TLS credentials and token (protocol/security.py); `admit` is the authenticated Health call
that lets a newly registered node into routing (router/cluster.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc

from splitserve.node.registry import NodeRecord
from splitserve.protocol import keepalive
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol import node_pb2_grpc as pb_grpc
from splitserve.protocol.security import TransportSecurity, open_channel
from splitserve.router.multiplex import MultiplexedCall, NodeStream, OnItem

# What `open_generate` returns; both have cancel(). The caller reads a Generate call
# (`read()`); a MultiplexedCall hands its items to the `on_item` it was opened with.
GenerateCall: TypeAlias = "grpc.aio.UnaryStreamCall[Any, Any] | MultiplexedCall"

logger = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class NodeClients:
    """Channel pool and the small RPCs (Stats, Abort); Generate goes through `decode_stub`."""

    def __init__(
        self,
        rpc_timeout_s: float,
        keepalive_interval_s: float,
        keepalive_timeout_s: float,
        security: TransportSecurity | None = None,
        multiplex: bool = False,
    ) -> None:
        self.rpc_timeout_s = rpc_timeout_s
        self.security = security or TransportSecurity()
        self._options = [
            *_CHANNEL_OPTIONS,
            *keepalive.client_options(keepalive_interval_s, keepalive_timeout_s),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.multiplex = multiplex
        self._streams: dict[str, NodeStream] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, self._options, self.security)
            self._channels[address] = channel
        return channel

    def decode_stub(self, node: NodeRecord) -> pb_grpc.DecodeStub:
        return pb_grpc.DecodeStub(self._channel(node.grpc_address))

    def open_generate(
        self,
        node: NodeRecord,
        request: pb.GenerateRequest,
        metadata: tuple[tuple[str, str], ...],
        on_item: OnItem,
    ) -> GenerateCall:
        """One request's stream on a decode node: over the node's GenerateMany stream
        (router/multiplex.py) when multiplexing and the node serves it, a MultiplexedCall
        whose items go to `on_item` from the stream's reader; else its own Generate call,
        which the caller reads (`on_item` unused)."""
        if not (self.multiplex and node.serves_generate_many):
            return self.decode_stub(node).Generate(request, metadata=metadata)
        stream = self._streams.get(node.grpc_address)
        if stream is None:
            stream = self._streams[node.grpc_address] = NodeStream(self.decode_stub(node))
        return stream.open(request, metadata, on_item)

    async def stats(self, node: NodeRecord) -> pb.StatsResponse | None:
        """The node's Stats, or None when it does not answer in time (logged at DEBUG)."""
        channel = self._channel(node.grpc_address)
        stub: pb_grpc.DecodeStub | pb_grpc.PrefillStub = (
            pb_grpc.DecodeStub(channel) if node.role == "decode" else pb_grpc.PrefillStub(channel)
        )
        try:
            response: pb.StatsResponse = await stub.Stats(
                pb.StatsRequest(), timeout=self.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            logger.debug("Stats on %s failed: %s", node.node_id, exc.code().name)
            return None
        return response

    async def admit(self, node: NodeRecord) -> str | None:
        """None when `node` answers an authenticated Health call; otherwise why not."""
        channel = self._channel(node.grpc_address)
        stub: pb_grpc.DecodeStub | pb_grpc.PrefillStub = (
            pb_grpc.DecodeStub(channel) if node.role == "decode" else pb_grpc.PrefillStub(channel)
        )
        try:
            await stub.Health(pb.HealthRequest(), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return None

    async def stats_many(self, nodes: Sequence[NodeRecord]) -> list[pb.StatsResponse | None]:
        return list(await asyncio.gather(*(self.stats(n) for n in nodes)))

    def abort_soon(self, node: NodeRecord, request_ids: Sequence[str]) -> None:
        """Send Decode.Abort in the background (callable from a cancelled task's cleanup)."""
        task = asyncio.get_running_loop().create_task(self._abort(node, list(request_ids)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, node: NodeRecord, request_ids: list[str]) -> None:
        try:
            response = await self.decode_stub(node).Abort(
                pb.AbortRequest(request_ids=request_ids), timeout=self.rpc_timeout_s
            )
            logger.info(
                "aborted %s on %s (%d known there)", request_ids, node.node_id, response.num_aborted
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning(
                "Abort of %s on %s failed: %s %s",
                request_ids,
                node.node_id,
                exc.code().name,
                exc.details(),
            )

    async def close(self) -> None:
        for stream in self._streams.values():
            await stream.close()
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.rpc_timeout_s * 2)
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
