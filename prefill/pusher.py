"""PrefillPusher: the prefill node's KV connector (engine/kv_connector.py): it turns the
engine's reports of final blocks into NIXL pushes, per request.

Runs on the engine thread only (the AsyncEngine's thread), where every TransferAgent and
EngineCore call of the prefill node happens. The engine calls its hooks:

    on_admission(request_id, PushTarget)   in add_request: where the KV goes, and the
                             on_done(PushOutcome) callback; the prompt is computed here
    on_blocks_final(blocks)  one push per report of blocks past the decode node's cached
                             prefix (the engine reports as each step ends: no overlap),
                             each with a "kv push" span under the Prefill RPC's span,
                             ended when its result is polled
    on_finish(request_id)    the engine ended the request: its blocks are held while
                             pushes may still read them
    poll()                   collects push results; once the last chunk went out (or the
                             request failed) and nothing is in flight, the request's
                             blocks are released (or it is aborted first, when a push
                             failed mid-prompt) and on_done(PushOutcome) is called
and the service calls `abort(request_id)` (no further pushes; it finishes once in-flight
pushes drained: on_done tells when). No push is posted past the RPC's deadline
(`PushTarget.deadline`): the decode node may have given the blocks to another request.
The engine generates one token per request here (`max_new_tokens`) and reserves a
prompt's blocks at admission (`reserves_prompt`), so a push never reads a block that was
preempted.

Chunk indices are contiguous from 0 over the pushes actually sent, and the last push
carries the final flag (a last chunk with nothing left to send carries the tag alone), so
the decode node's ArrivalTracker knows when every chunk has landed.

Every finished push and every finished request is counted in the node's PushMetrics
(node/metrics.py): pushes by result with their bytes and durations, requests by outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from splitserve.engine.kv_connector import FinalBlocks, KVEvents
from splitserve.engine.outputs import TokenLogprob
from splitserve.engine.scheduler import RemotePlan
from splitserve.kv_transfer import PeerName, TransferAgent, encode_tag
from splitserve.node.metrics import PushMetrics, detached_push_metrics
from splitserve.protocol.tracing import (
    CHUNK_BYTES,
    CHUNK_INDEX,
    NO_SPAN,
    NO_TRACER,
    REQUEST_ID,
    AttributeValue,
    Span,
    Tracer,
)

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


@dataclass(frozen=True)
class PushTarget:
    """Where a request's KV goes: the decode node's agent and the blocks it allocated."""

    peer: PeerName
    dst_block_ids: list[int]
    # Leading blocks the decode node holds already (not pushed).
    num_skip_blocks: int
    on_done: Callable[[PushOutcome], None]
    # The Prefill RPC's span: parent of one span per chunk push (issued to completed).
    span: Span = NO_SPAN
    # time.monotonic() past which no push is posted (the RPC's deadline: the decode node
    # may give the blocks to another request once it passed); None: no deadline.
    deadline: float | None = None


@dataclass
class _Pushing:
    peer: PeerName
    dst_block_ids: list[int]
    num_skip_blocks: int
    on_done: Callable[[PushOutcome], None]
    span: Span = NO_SPAN
    deadline: float | None = None
    # The span of each push in flight, by push id.
    push_spans: dict[int, Span] = field(default_factory=dict)
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
    # The engine finished the request (its blocks are held until the pushes drained).
    is_engine_done: bool = False


class PrefillPusher:
    max_new_tokens: int | None = 1
    reserves_prompt = True
    supports_overlap = False

    def __init__(
        self, agent: TransferAgent, metrics: PushMetrics | None = None, tracer: Tracer = NO_TRACER
    ) -> None:
        self.agent = agent
        self.tracer = tracer
        self.metrics = metrics if metrics is not None else detached_push_metrics()
        self.metrics.pushes_in_flight.set_function(lambda: self.num_in_flight)
        self.metrics.push_bytes_in_flight.set_function(lambda: self.num_bytes_in_flight)
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

    def on_admission(self, request_id: str, kv_params: object | None) -> bool:
        if not isinstance(kv_params, PushTarget):
            raise ValueError("a prefill node serves Prefill RPCs only (no push target given)")
        target = kv_params
        num_skip, num_dst = target.num_skip_blocks, len(target.dst_block_ids)
        if not 0 <= num_skip <= num_dst:
            raise ValueError(
                f"num_skip_blocks={num_skip} is outside [0, {num_dst}] destination blocks"
            )
        self._requests[request_id] = _Pushing(
            target.peer,
            target.dst_block_ids,
            num_skip,
            target.on_done,
            target.span,
            target.deadline,
        )
        return False  # the prompt is computed here

    def on_remote_plan(self, request_id: str, plan: RemotePlan | None) -> None:
        raise RuntimeError("a prefill node admits no remote KV")

    def on_finish(self, request_id: str) -> bool:
        state = self._requests.get(request_id)
        if state is None:
            return False
        state.is_engine_done = True
        if not state.sent_last:
            state.aborted = True  # ended (abort, error) before its last chunk went out
        return True

    def on_blocks_final(self, chunk: FinalBlocks) -> None:
        state = self._requests.get(chunk.request_id)
        if state is None or state.aborted or state.error is not None:
            return
        if state.deadline is not None and time.monotonic() > state.deadline:
            state.error = "the Prefill RPC's deadline passed before its KV was pushed"
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
        span = self._chunk_span(chunk, state, len(src))
        try:
            handle = self.agent.push(state.peer, src, state.dst_block_ids[start:end], tag)
        except ValueError as exc:
            state.error = str(exc)
            span.fail(state.error)
            span.end()
            return
        span.set(CHUNK_BYTES, handle.num_bytes)
        state.push_spans[handle.push_id] = span
        state.num_chunks += 1
        state.num_blocks += len(src)
        state.num_bytes += handle.num_bytes
        state.sent_last = chunk.is_last
        state.final_tag = tag if chunk.is_last else state.final_tag
        state.push_ids.add(handle.push_id)
        self._by_push[handle.push_id] = chunk.request_id
        self.num_bytes_in_flight += handle.num_bytes

    def _chunk_span(self, chunk: FinalBlocks, state: _Pushing, num_blocks: int) -> Span:
        attributes: dict[str, AttributeValue] = {
            REQUEST_ID: chunk.request_id,
            CHUNK_INDEX: state.num_chunks,
            "splitserve.chunk.blocks": num_blocks,
            "splitserve.chunk.is_last": chunk.is_last,
        }
        return self.tracer.start_span("kv push", state.span, attributes=attributes)

    def abort(self, request_id: str) -> bool:
        state = self._requests.get(request_id)
        if state is None:
            return False
        state.aborted = True
        return True

    def poll(self) -> KVEvents:
        events = KVEvents()
        self._collect_results()
        for request_id, state in list(self._requests.items()):
            is_over = state.sent_last or state.aborted or state.error is not None
            if is_over and not state.push_ids:
                del self._requests[request_id]
                if not state.is_engine_done:
                    events.to_abort.append(request_id)  # a push failed mid-prompt
                events.released.append(request_id)
                self._report(request_id, state)
        events.is_busy = bool(self._by_push)
        return events

    def _collect_results(self) -> None:
        for result in self.agent.poll():
            request_id = self._by_push.pop(result.push_id, None)
            self.num_bytes_in_flight -= result.num_bytes
            self.metrics.observe_push(result.ok, result.num_bytes, result.elapsed_s)
            if result.ok:
                self.num_pushes_completed += 1
                self.num_bytes_total += result.num_bytes
            else:
                self.num_pushes_failed += 1
            state = self._requests.get(request_id) if request_id is not None else None
            if state is None:
                continue
            state.push_ids.discard(result.push_id)
            span = state.push_spans.pop(result.push_id, NO_SPAN)
            if not result.ok:
                span.fail(f"KV push failed: {result.error}")
            span.end()
            if not result.ok and state.error is None:
                state.error = f"KV push failed: {result.error}"

    def _report(self, request_id: str, state: _Pushing) -> None:
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
        status = "ok" if outcome.ok else ("failed" if state.error else "aborted")
        self.metrics.observe_request(status)
        try:
            state.on_done(outcome)
        except Exception:
            logger.exception("prefill completion callback failed for %s", request_id)
