"""PrefillPusher: turns the engine's chunk reports into NIXL pushes, per request.

Runs on the engine thread only (the AsyncEngine's thread), where every TransferAgent and
EngineCore call of the prefill node happens:

    begin(request_id, peer, dst_block_ids, num_skip_blocks, on_done)   before add_request
    cancel(request_id)       when add_request refused the request
    on_chunk(chunk)          installed as EngineCore.on_prefill_chunk: one push per chunk
                             of blocks past the decode node's cached prefix
    poll(core)               step hook: collects push results; once the last chunk went
                             out and nothing is in flight, releases the request's held
                             blocks and calls on_done(PushOutcome)
    abort(request_id)        no further pushes; finishes once in-flight pushes drained

Chunk indices are contiguous from 0 over the pushes actually sent, and the last push
carries the final flag (a last chunk with nothing left to send carries the tag alone), so
the decode node's ArrivalTracker knows when every chunk has landed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from splitserve.engine.core import EngineCore, PrefillChunk
from splitserve.engine.outputs import TokenLogprob
from splitserve.kv_transfer import PeerName, TransferAgent, encode_tag

logger = logging.getLogger(__name__)


class PushOutcome(NamedTuple):
    ok: bool
    error: str | None
    first_token_id: int | None
    first_logprob: TokenLogprob | None
    final_tag: str
    num_chunks: int
    num_blocks: int
    num_bytes: int
    num_cached_tokens: int
    queue_time_s: float
    # First chunk scheduled to last chunk computed, and from there to the last push done.
    compute_time_s: float
    push_tail_time_s: float


@dataclass
class _Pushing:
    peer: PeerName
    dst_block_ids: list[int]
    num_skip_blocks: int
    on_done: Callable[[PushOutcome], None]
    num_chunks: int = 0
    num_blocks: int = 0
    num_bytes: int = 0
    push_ids: set[int] = field(default_factory=set)
    sent_last: bool = False
    aborted: bool = False
    error: str | None = None
    first: tuple[int, TokenLogprob | None] | None = None
    final_tag: str = ""
    num_cached_tokens: int = 0
    begun_at: float = field(default_factory=time.monotonic)
    queue_time_s: float = 0.0
    last_chunk_at: float = 0.0


class PrefillPusher:
    def __init__(self, agent: TransferAgent) -> None:
        self.agent = agent
        self._requests: dict[str, _Pushing] = {}
        self._by_push: dict[int, str] = {}
        # Statistics for the Stats RPC.
        self.num_bytes_in_flight = 0
        self.num_bytes_total = 0
        self.num_pushes_completed = 0
        self.num_pushes_failed = 0

    @property
    def num_in_flight(self) -> int:
        return len(self._by_push)

    def begin(
        self,
        request_id: str,
        peer: PeerName,
        dst_block_ids: list[int],
        num_skip_blocks: int,
        on_done: Callable[[PushOutcome], None],
    ) -> None:
        if not 0 <= num_skip_blocks <= len(dst_block_ids):
            raise ValueError(
                f"num_skip_blocks={num_skip_blocks} is outside [0, {len(dst_block_ids)}] "
                "destination blocks"
            )
        self._requests[request_id] = _Pushing(peer, dst_block_ids, num_skip_blocks, on_done)

    def on_chunk(self, chunk: PrefillChunk) -> None:
        state = self._requests.get(chunk.request_id)
        if state is None or state.aborted or state.error is not None:
            return
        state.num_cached_tokens = chunk.num_cached_tokens
        state.queue_time_s = chunk.queue_time_s
        if chunk.is_last:
            state.last_chunk_at = time.monotonic()
            state.first = (chunk.first_token_id, chunk.first_logprob)  # type: ignore[assignment]
        start = max(chunk.first_block_index, state.num_skip_blocks)
        end = chunk.first_block_index + len(chunk.block_ids)
        if end > len(state.dst_block_ids):
            state.error = (
                f"prompt needs {end} blocks but the decode node gave "
                f"{len(state.dst_block_ids)} destination blocks"
            )
            return
        src = chunk.block_ids[start - chunk.first_block_index :]
        if not src and not chunk.is_last:
            return
        tag = encode_tag(chunk.request_id, state.num_chunks, chunk.is_last)
        try:
            handle = self.agent.push(state.peer, src, state.dst_block_ids[start:end], tag)
        except ValueError as exc:
            state.error = str(exc)
            return
        state.num_chunks += 1
        state.num_blocks += len(src)
        state.num_bytes += handle.num_bytes
        state.sent_last = chunk.is_last
        state.final_tag = tag if chunk.is_last else state.final_tag
        state.push_ids.add(handle.push_id)
        self._by_push[handle.push_id] = chunk.request_id
        self.num_bytes_in_flight += handle.num_bytes

    def cancel(self, request_id: str) -> None:
        """Forget a request that never reached the engine (its admission failed)."""
        self._requests.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        state = self._requests.get(request_id)
        if state is None:
            return False
        state.aborted = True
        return True

    def poll(self, core: EngineCore) -> bool:
        """Step hook: returns True while pushes are in flight."""
        for result in self.agent.poll():
            request_id = self._by_push.pop(result.push_id, None)
            self.num_bytes_in_flight -= result.num_bytes
            if result.ok:
                self.num_pushes_completed += 1
                self.num_bytes_total += result.num_bytes
            else:
                self.num_pushes_failed += 1
            state = self._requests.get(request_id) if request_id is not None else None
            if state is None:
                continue
            state.push_ids.discard(result.push_id)
            if not result.ok and state.error is None:
                state.error = f"KV push failed: {result.error}"
        for request_id, state in list(self._requests.items()):
            if not state.sent_last and not core.is_unfinished(request_id):
                state.aborted = True  # the engine ended it (abort, error) before the last chunk
            is_over = state.sent_last or state.aborted or state.error is not None
            if is_over and not state.push_ids:
                self._finish(core, request_id, state)
        return bool(self._by_push)

    def _finish(self, core: EngineCore, request_id: str, state: _Pushing) -> None:
        del self._requests[request_id]
        if core.is_unfinished(request_id):
            core.abort(request_id)  # a push failed mid-prompt: stop computing it
        core.release(request_id)
        error = state.error or ("aborted" if state.aborted else None)
        first_token, first_logprob = state.first if state.first is not None else (None, None)
        last_chunk = state.last_chunk_at or time.monotonic()
        outcome = PushOutcome(
            ok=error is None and state.sent_last,
            error=error,
            first_token_id=first_token,
            first_logprob=first_logprob,
            final_tag=state.final_tag,
            num_chunks=state.num_chunks,
            num_blocks=state.num_blocks,
            num_bytes=state.num_bytes,
            num_cached_tokens=state.num_cached_tokens,
            queue_time_s=state.queue_time_s,
            compute_time_s=max(0.0, last_chunk - state.begun_at - state.queue_time_s),
            push_tail_time_s=time.monotonic() - last_chunk,
        )
        try:
            state.on_done(outcome)
        except Exception:
            logger.exception("prefill completion callback failed for %s", request_id)
