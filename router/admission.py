"""Which registered nodes the router may route to, when the cluster's gRPC is secured.

Anything that reaches Redis can write a node record, so a record alone is no proof of
membership. With TLS or a cluster token configured, ClusterView passes every node list it
reads from Redis through `NodeAdmission.filter`: a node not yet admitted at its address gets
one authenticated Health call (NodeClients.admit: this router's CA, client certificate and
token); a node that answers is admitted, one that fails (a wrong token: UNAUTHENTICATED; a
certificate the CA did not sign: the handshake fails) is left out, logged once, and asked
again after `retry_s`. Without transport security every record is taken as it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from splitserve.node.registry import NodeId, NodeRecord

logger = logging.getLogger(__name__)

# NodeClients.admit: None when the node answered, else the reason it did not.
AdmitCall = Callable[[NodeRecord], Awaitable[str | None]]


class NodeAdmission:
    def __init__(self, admit: AdmitCall, is_enabled: bool, retry_s: float) -> None:
        self._admit = admit
        self.is_enabled = is_enabled
        self.retry_s = retry_s
        # node id -> the gRPC address it was admitted at
        self._admitted: dict[NodeId, str] = {}
        # node id -> when it may be asked again
        self._refused_until: dict[NodeId, float] = {}

    @property
    def refused(self) -> frozenset[NodeId]:
        return frozenset(self._refused_until)

    async def filter(self, records: Sequence[NodeRecord]) -> list[NodeRecord]:
        """The records of admitted nodes (asking the new ones first)."""
        if not self.is_enabled:
            return list(records)
        now = time.monotonic()
        new = [
            r
            for r in records
            if self._admitted.get(r.node_id) != r.grpc_address
            and self._refused_until.get(r.node_id, 0.0) <= now
        ]
        if new:
            reasons = await asyncio.gather(*(self._admit(r) for r in new))
            for record, reason in zip(new, reasons, strict=True):
                self._settle(record, reason, now)
        self._forget_absent({r.node_id for r in records})
        return [r for r in records if self._admitted.get(r.node_id) == r.grpc_address]

    def _settle(self, record: NodeRecord, reason: str | None, now: float) -> None:
        if reason is None:
            self._admitted[record.node_id] = record.grpc_address
            self._refused_until.pop(record.node_id, None)
            logger.info("node %s at %s admitted to routing", record.node_id, record.grpc_address)
            return
        self._admitted.pop(record.node_id, None)
        if record.node_id not in self._refused_until:
            logger.warning(
                "node %s at %s is registered but failed the authenticated Health call (%s): "
                "not routed to; give it the cluster's certificates and --cluster-token",
                record.node_id,
                record.grpc_address,
                reason,
            )
        self._refused_until[record.node_id] = now + self.retry_s

    def _forget_absent(self, present: set[NodeId]) -> None:
        for node_id in [n for n in self._admitted if n not in present]:
            del self._admitted[node_id]
        for node_id in [n for n in self._refused_until if n not in present]:
            del self._refused_until[node_id]
