"""A TransferAgent double for the prefill node's pusher: pushes are posted, and finish when
the test says so (`finish(push_id, ok)`); `poll` returns the finished ones."""

from __future__ import annotations

from splitserve.engine.request import RequestId
from splitserve.kv_transfer import PeerName, PushHandle, PushResult


class ScriptedAgent:
    def __init__(self) -> None:
        self.posted: list[PushHandle] = []
        self.finished: list[PushResult] = []

    def push(self, peer: PeerName, src: list[int], dst: list[int], tag: str) -> PushHandle:
        handle = PushHandle(len(self.posted), peer, tag, RequestId(tag), 1000 * len(src), 1)
        self.posted.append(handle)
        return handle

    def finish(self, push_id: int, ok: bool) -> None:
        h = self.posted[push_id]
        error = None if ok else "UCX error"
        self.finished.append(
            PushResult(h.push_id, h.peer, h.tag, h.request_id, ok, error, h.num_bytes, 0.003)
        )

    def poll(self) -> list[PushResult]:
        out, self.finished = self.finished, []
        return out
