"""Decode-node side of KV transfer: which requests have all their blocks in the pool.

Who calls what, in order (decode node):

1. ``tracker = ArrivalTracker(agent, timeout_s)`` next to the node's `TransferAgent`.
2. Before asking a prefill node to prefill a request into blocks it allocated (never
   after: a notification for a request not yet expected is dropped):
   ``tracker.expect(request_id, peer=prefill_agent_name)``.
3. Every loop turn, idle too: ``tracker.poll()`` reads NIXL notifications (each one a tag
   from `tags.encode_tag`, sent once a chunk's bytes have landed) and returns a
   `RequestArrival` per request that completed (ok) or ran past its deadline (failed).
   A request is complete once its final chunk AND every chunk before it have arrived.
   With `stall_timeout_s`, it also fails when no chunk arrives for that long (a frozen
   or wedged prefill node), however far its overall deadline is. Progress is counted per
   sender: with `peer`, a chunk of any request from that prefill node restarts the stall
   clock of every request expected from it (a busy node computing other prompts first is
   not stalled; a frozen one sends nothing at all).
4. ``tracker.forget(request_id)`` on abort; late notifications of a forgotten, finished or
   timed-out request are dropped (DEBUG log); tags of requests never expected are logged
   as warnings and ignored.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from splitserve.engine.request import RequestId
from splitserve.kv_transfer.tags import ChunkTag, decode_tag, validate_request_id
from splitserve.kv_transfer.types import Notification

logger = logging.getLogger(__name__)

# Finished request ids remembered so their late notifications are not called unknown.
_MAX_RETIRED = 4096


class NotificationSource(Protocol):
    def get_notifs(self) -> list[Notification]: ...


class RequestArrival(NamedTuple):
    request_id: RequestId
    ok: bool
    error: str | None
    num_chunks: int
    elapsed_s: float


@dataclass
class _Expected:
    started: float
    deadline: float
    # Only notifications from this agent count (None: any peer).
    peer: str | None = None
    chunks: set[int] = field(default_factory=set)
    last_idx: int | None = None
    # No-progress bound: a chunk must arrive within stall_s of the last one (or of expect).
    stall_s: float | None = None
    last_progress: float = 0.0

    def stalled_for(self, now: float) -> float | None:
        """Seconds without progress when past the stall bound, else None."""
        silent = now - self.last_progress
        return silent if self.stall_s is not None and silent > self.stall_s else None


class ArrivalTracker:
    def __init__(
        self,
        source: NotificationSource,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._source = source
        self._timeout_s = timeout_s
        self._clock = clock
        self._expected: dict[RequestId, _Expected] = {}
        self._retired: OrderedDict[RequestId, None] = OrderedDict()
        self._ready: list[RequestArrival] = []

    @property
    def num_expected(self) -> int:
        return len(self._expected)

    def is_expected(self, request_id: str) -> bool:
        return request_id in self._expected

    def expect(
        self,
        request_id: str,
        timeout_s: float | None = None,
        peer: str | None = None,
        stall_timeout_s: float | None = None,
    ) -> None:
        """Start waiting for `request_id`'s chunks; reported failed after the timeout, or
        after `stall_timeout_s` without a new chunk.

        With `peer` (the prefill node's agent name), chunks from other agents are ignored:
        a late push of an earlier, abandoned attempt cannot complete a retry.
        """
        if stall_timeout_s is not None and stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {stall_timeout_s}")
        rid = validate_request_id(request_id)
        if rid in self._expected:
            raise ValueError(f"request {rid!r} is already expected; forget() it first")
        timeout = self._timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout}")
        now = self._clock()
        self._retired.pop(rid, None)
        self._expected[rid] = _Expected(
            started=now,
            deadline=now + timeout,
            peer=peer,
            stall_s=stall_timeout_s,
            last_progress=now,
        )

    def forget(self, request_id: str) -> bool:
        """Stop waiting (abort); False if the request was not expected."""
        rid = RequestId(request_id)
        if self._expected.pop(rid, None) is None:
            return False
        self._retire(rid)
        return True

    def poll(self) -> list[RequestArrival]:
        """Read notifications; return requests completed or timed out since the last call."""
        for note in self._source.get_notifs():
            self.handle_notification(note)
        now = self._clock()
        for rid, exp in list(self._expected.items()):
            if now > exp.deadline:
                self._report(rid, exp, _timeout_error(exp, now), now)
            elif (silent := exp.stalled_for(now)) is not None:
                self._report(rid, exp, f"stalled: no KV chunk for {silent:.3g} s", now)
        ready, self._ready = self._ready, []
        return ready

    def handle_notification(self, note: Notification) -> None:
        """Account for one notification (poll() calls this for every one it reads)."""
        try:
            tag = decode_tag(note.message.decode())
        except (UnicodeDecodeError, ValueError) as e:
            logger.warning("ignoring KV notification %r from %s: %s", note.message, note.peer, e)
            return
        exp = self._expected.get(tag.request_id)
        if exp is None:
            if tag.request_id in self._retired:
                logger.debug("late KV notification %r from %s dropped", note.message, note.peer)
            else:
                logger.warning(
                    "ignoring KV notification for unknown request (tag %r from %s)",
                    note.message.decode(),
                    note.peer,
                )
            return
        if exp.peer is not None and note.peer != exp.peer:
            logger.warning(
                "ignoring KV notification %r from %s: request %s expects its KV from %s",
                note.message,
                note.peer,
                tag.request_id,
                exp.peer,
            )
            return
        self._add_chunk(tag, exp)
        if exp.peer is not None:
            self._note_progress(exp.peer)

    def _note_progress(self, peer: str) -> None:
        """A chunk from `peer` landed: every request expected from it is making progress."""
        now = self._clock()
        for other in self._expected.values():
            if other.peer == peer:
                other.last_progress = now

    def _add_chunk(self, tag: ChunkTag, exp: _Expected) -> None:
        rid, idx = tag.request_id, tag.chunk_idx
        if idx in exp.chunks:
            logger.warning("duplicate KV chunk %d of request %s ignored", idx, rid)
            return
        error = None
        if tag.is_last:
            if exp.last_idx is not None:
                error = f"two final chunks ({exp.last_idx} and {idx})"
            elif exp.chunks and max(exp.chunks) > idx:
                error = f"final chunk {idx} after chunk {max(exp.chunks)}"
            exp.last_idx = idx
        elif exp.last_idx is not None and idx > exp.last_idx:
            error = f"chunk {idx} after final chunk {exp.last_idx}"
        exp.chunks.add(idx)
        now = self._clock()
        exp.last_progress = now
        if error is not None:
            self._report(rid, exp, f"bad chunk sequence: {error}", now)
        elif exp.last_idx is not None and len(exp.chunks) == exp.last_idx + 1:
            self._report(rid, exp, None, now)

    def _report(self, rid: RequestId, exp: _Expected, error: str | None, now: float) -> None:
        del self._expected[rid]
        self._retire(rid)
        if error is not None:
            logger.warning("KV arrival of request %s failed: %s", rid, error)
        num_chunks = len(exp.chunks)
        self._ready.append(RequestArrival(rid, error is None, error, num_chunks, now - exp.started))

    def _retire(self, rid: RequestId) -> None:
        self._retired[rid] = None
        self._retired.move_to_end(rid)
        while len(self._retired) > _MAX_RETIRED:
            self._retired.popitem(last=False)


def _timeout_error(exp: _Expected, now: float) -> str:
    have = sorted(exp.chunks)
    final = "final chunk not seen" if exp.last_idx is None else f"final chunk {exp.last_idx}"
    return f"timed out after {now - exp.started:.3g} s with chunks {have} ({final})"
