"""Values a `TransferAgent` hands out: peer names, push handles and results, notifications."""

from __future__ import annotations

from typing import NamedTuple, NewType

from splitserve.engine.request import RequestId

PeerName = NewType("PeerName", str)


class PushHandle(NamedTuple):
    push_id: int
    peer: PeerName
    tag: str
    request_id: RequestId
    num_bytes: int
    # NIXL descriptors after coalescing (one per run of adjacent blocks).
    num_descs: int


class PushResult(NamedTuple):
    push_id: int
    peer: PeerName
    tag: str
    request_id: RequestId
    ok: bool
    error: str | None
    num_bytes: int
    elapsed_s: float


class Notification(NamedTuple):
    peer: PeerName
    message: bytes
