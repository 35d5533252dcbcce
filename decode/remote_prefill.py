"""RemotePrefills: the decode node's KV connector (engine/kv_connector.py), on the engine
thread. Network I/O stays in decode/service.py.

The engine calls its hooks:

    on_admission(rid, RemotePrefillParams)  a request whose prompt a prefill node computes
    on_remote_plan(rid, plan)   the prompt's blocks are allocated (reusing this node's
                                cached prefix): expect the request's KV chunks and hand the
                                plan to `params.on_plan` (the service sends the Prefill
                                RPC); None when the pool is short: the engine prefills it
    on_finish(rid)              a request that ends while its KV is in flight keeps its
                                blocks until the prefill node writes them no more (its
                                Prefill RPC answered, or `writes_ended`)
    poll()                      chunk arrivals from the ArrivalTracker; a request whose
                                blocks all landed AND whose RPC answered arrives with the
                                first token; a failure, a timeout or a stall (no chunk
                                within `stall_timeout_s(prompt size)`) makes the engine
                                prefill it locally into fresh blocks (the ones given to the
                                prefill node are set aside until it writes them no more:
                                its RPC answered, or `writes_ended`); held and
                                set-aside blocks are released; `params.on_outcome` (when
                                given) hears of the arrival or the fallback

and the service calls, through `AsyncEngine.run`:

    rpc_succeeded(...)      the prefill node answered: first token, its cache hits; its
                            pushes are over (it answers once the last one completed)
    rpc_failed(...)         the Prefill RPC failed (node died, error, deadline): the
                            request is prefilled here, but a failed call does not mean
                            the prefill node stopped writing (a deadline ends the call on
                            this side at once), so the blocks it was given stay set aside
    writes_ended(rid)       after `rpc_failed`: the prefill node confirmed that it pushes
                            no more for the request (its Abort answered once its pushes
                            drained), or cannot any more; the set-aside blocks may go
    abandon(rid)            the client went away before the Prefill RPC was sent: no
                            prefill node will write the blocks, so they can go
    pop_metrics(rid)        per-request transfer metrics, for the final Generate message

Remote prefills requested, KV received (blocks, bytes, time) and fallbacks by reason are
counted in the node's ReceiveMetrics (node/metrics.py) as they happen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from splitserve.engine.kv_connector import FinalBlocks, KVEvents, RemoteKV
from splitserve.engine.outputs import TokenLogprob
from splitserve.engine.scheduler import RemotePlan
from splitserve.kv_transfer import ArrivalTracker
from splitserve.node.metrics import ReceiveMetrics, detached_receive_metrics

logger = logging.getLogger(__name__)

# No-progress bound of a remote prefill: a chunk must land within this base plus a budget
# per prompt token still to receive, so a frozen prefill node costs seconds, not the whole
# --prefill-timeout-s. The budget (1 ms/token: 10 s more for 10k tokens) covers a slow
# chunk of a long prompt and some queueing on a busy prefill node.
STALL_BASE_S = 5.0
STALL_PER_TOKEN_S = 0.001


def stall_timeout_s(num_tokens: int, timeout_s: float) -> float:
    """The no-progress deadline for a prompt of `num_tokens` to receive (at most half the
    overall timeout, so the fallback always comes well before it)."""
    return min(STALL_BASE_S + STALL_PER_TOKEN_S * num_tokens, timeout_s / 2)


class RemotePrefillInfo(NamedTuple):
    """What the prefill node reported beside the first token."""

    num_cached_tokens: int = 0
    queue_time_s: float = 0.0
    compute_time_s: float = 0.0
    push_tail_time_s: float = 0.0


@dataclass(frozen=True)
class RemotePrefillParams:
    """`kv_params` of a request whose prompt a prefill node computes."""

    prefill_node_id: str
    timeout_s: float
    num_prompt_tokens: int
    # Called on the engine thread with the allocated blocks (never with None).
    on_plan: Callable[[RemotePlan], None]
    # Called on the engine thread when the KV landed or the request fell back to local
    # prefill (tracing); None: not called.
    on_outcome: Callable[[TransferMetrics], None] | None = None


@dataclass
class _Pending:
    started: float
    prefill_node_id: str
    num_tokens_to_receive: int
    num_blocks: int
    num_bytes: int
    first: tuple[int, TokenLogprob | None] | None = None
    info: RemotePrefillInfo = field(default_factory=RemotePrefillInfo)
    has_arrived: bool = False
    # No write into the request's blocks can come any more (the RPC answered, the prefill
    # node confirmed its pushes drained, or none was sent).
    are_writes_over: bool = False
    is_aborted: bool = False
    on_outcome: Callable[[TransferMetrics], None] | None = None


@dataclass(frozen=True)
class TransferMetrics:
    is_prefill_remote: bool
    is_prefill_fallback: bool
    prefill_node_id: str
    # Admission to KV landed (remote) or to the fallback decision.
    transfer_time_s: float
    info: RemotePrefillInfo
    # time.monotonic() when the request joined the queue with its KV (remote only).
    landed_at: float


class RemotePrefills:
    max_new_tokens: int | None = None
    reserves_prompt = False
    supports_overlap = True

    def __init__(
        self,
        tracker: ArrivalTracker,
        block_bytes: int,
        block_size: int,
        metrics: ReceiveMetrics | None = None,
    ) -> None:
        self.tracker = tracker
        self.metrics = metrics if metrics is not None else detached_receive_metrics()
        self.block_bytes = block_bytes
        self.block_size = block_size
        self._admitting: dict[str, RemotePrefillParams] = {}
        self._pending: dict[str, _Pending] = {}
        # Requests that fell back to local prefill: the engine set the blocks the prefill
        # node was given aside (held under the request's id). Those whose prefill node may
        # still write get late writes; their blocks go once its RPC answered or it
        # confirmed it stopped (`writes_ended`), through `_release_next`.
        self._late_writers: set[str] = set()
        # Set-aside blocks that may go, and the requests whose failure (so whose set-aside)
        # an earlier poll reported.
        self._release_next: list[str] = []
        self._set_aside: set[str] = set()
        self._metrics: dict[str, TransferMetrics] = {}
        self._events = KVEvents()
        # Statistics for the Stats RPC.
        self.num_completed = 0
        self.num_failed = 0
        self.num_fallbacks = 0
        self.num_bytes_total = 0
        self.num_prompt_tokens_received = 0
        self.metrics.receives_in_flight.set_function(lambda: len(self._pending))

    @property
    def num_in_flight(self) -> int:
        return len(self._pending)

    @property
    def num_bytes_in_flight(self) -> int:
        return sum(p.num_bytes for p in self._pending.values())

    # Engine hooks.

    def on_admission(self, request_id: str, kv_params: object | None) -> bool:
        if not isinstance(kv_params, RemotePrefillParams):
            return False
        self._admitting[request_id] = kv_params
        return True

    def on_remote_plan(self, request_id: str, plan: RemotePlan | None) -> None:
        params = self._admitting.pop(request_id)
        if plan is None:
            logger.info(
                "KV pool short for %s: prefilling it locally",
                request_id,
                extra={"request_id": request_id},
            )
            self.metrics.observe_fallback("pool_short")
            return
        num_blocks = len(plan.block_ids) - plan.num_cached_blocks
        num_tokens = params.num_prompt_tokens - plan.num_cached_blocks * self.block_size
        stall_s = stall_timeout_s(num_tokens, params.timeout_s)
        # The prefill node's NIXL agent is named by its node id: only its chunks count, and
        # any of them shows it is not stalled (kv_transfer/arrivals.py).
        self.tracker.expect(
            request_id, params.timeout_s, peer=params.prefill_node_id, stall_timeout_s=stall_s
        )
        self._pending[request_id] = _Pending(
            started=time.monotonic(),
            prefill_node_id=params.prefill_node_id,
            num_tokens_to_receive=num_tokens,
            num_blocks=num_blocks,
            num_bytes=num_blocks * self.block_bytes,
            on_outcome=params.on_outcome,
        )
        self.metrics.remote_prefills.inc()
        params.on_plan(plan)

    def on_blocks_final(self, blocks: FinalBlocks) -> None:
        """Prompts computed here stay here."""

    def on_finish(self, request_id: str) -> bool:
        """A request ended while its KV was in flight (the client went away): its blocks
        stay held until no write can come (its RPC answered, or `writes_ended`), then
        `poll` releases them."""
        pending = self._pending.get(request_id)
        if pending is None:
            return False
        pending.is_aborted = True
        self.tracker.forget(request_id)
        return True

    def poll(self) -> KVEvents:
        for arrival in self.tracker.poll():
            pending = self._pending.get(arrival.request_id)
            if pending is None:
                continue
            if arrival.ok:
                pending.has_arrived = True
                self._advance(arrival.request_id, pending)
            else:
                error = arrival.error or "KV did not arrive"
                self._fail(arrival.request_id, pending, error, "transfer_failed")
        for request_id, pending in list(self._pending.items()):
            self._release_if_aborted(request_id, pending)
        events, self._events = self._events, KVEvents()
        # The engine applies releases before failures: set-aside blocks go out only once
        # the failure that set them aside was reported by an earlier poll.
        ready = [rid for rid in self._release_next if rid in self._set_aside]
        self._release_next = [rid for rid in self._release_next if rid not in self._set_aside]
        self._set_aside.difference_update(ready)
        events.released.extend(ready)
        self._set_aside.update(events.failed)
        events.is_busy = bool(self._pending or self._release_next)
        return events

    # The service's calls.

    def rpc_succeeded(
        self,
        request_id: str,
        first_token_id: int,
        first_logprob: TokenLogprob | None,
        info: RemotePrefillInfo,
    ) -> None:
        pending = self._pending.get(request_id)
        if pending is None:
            self._end_late_writer(request_id)
            return
        pending.are_writes_over = True
        pending.first = (first_token_id, first_logprob)
        pending.info = info
        self._advance(request_id, pending)

    def rpc_failed(self, request_id: str, error: str) -> None:
        """The Prefill RPC failed: prefill here; the blocks stay set aside (or held, for an
        aborted request) until `writes_ended`."""
        pending = self._pending.get(request_id)
        if pending is not None and not pending.is_aborted:
            self._fail(request_id, pending, f"Prefill RPC failed: {error}", "rpc_failed")

    def writes_ended(self, request_id: str) -> None:
        """After `rpc_failed`: the prefill node writes nothing more for the request."""
        pending = self._pending.get(request_id)
        if pending is None:
            self._end_late_writer(request_id)
        else:
            pending.are_writes_over = True  # an aborted request's held blocks go at poll

    def abandon(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.are_writes_over = True  # none was sent; poll frees the held blocks
            self.tracker.forget(request_id)

    def pop_metrics(self, request_id: str) -> TransferMetrics | None:
        return self._metrics.pop(request_id, None)

    # Internals.

    def _release_if_aborted(self, request_id: str, pending: _Pending) -> bool:
        """Whether the request was aborted; once no write can come any more, its held
        blocks go and it is forgotten."""
        if pending.is_aborted and pending.are_writes_over:
            self._events.released.append(request_id)
            del self._pending[request_id]
        return pending.is_aborted

    def _end_late_writer(self, request_id: str) -> None:
        """The prefill node of a request that fell back writes the blocks set aside for
        it no more, so they may go."""
        if request_id in self._late_writers:
            self._late_writers.discard(request_id)
            self._release_next.append(request_id)

    def _advance(self, request_id: str, pending: _Pending) -> None:
        if self._release_if_aborted(request_id, pending):
            return
        if not pending.has_arrived or pending.first is None:
            return
        del self._pending[request_id]
        self.num_completed += 1
        self.num_bytes_total += pending.num_bytes
        self.num_prompt_tokens_received += pending.num_tokens_to_receive
        elapsed_s = time.monotonic() - pending.started
        self.metrics.observe_received(pending.num_blocks, pending.num_bytes, elapsed_s)
        self._record(request_id, pending, is_fallback=False)
        token, logprob = pending.first
        self._events.arrived.append(RemoteKV(request_id, token, logprob))

    def _fail(self, request_id: str, pending: _Pending, error: str, reason: str) -> None:
        self.tracker.forget(request_id)
        if self._release_if_aborted(request_id, pending):
            return  # released here or in poll once the RPC is done
        del self._pending[request_id]
        if pending.are_writes_over:
            self._release_next.append(request_id)
        else:
            self._late_writers.add(request_id)
        self.num_failed += 1
        logger.warning(
            "remote prefill of %s failed (%s): prefilling locally",
            request_id,
            error,
            extra={"request_id": request_id},  # the engine thread: no request context here
        )
        self._events.failed.append(request_id)
        self.num_fallbacks += 1
        self.metrics.observe_fallback(reason)
        self._record(request_id, pending, is_fallback=True)

    def _record(self, request_id: str, pending: _Pending, is_fallback: bool) -> None:
        now = time.monotonic()
        metrics = TransferMetrics(
            is_prefill_remote=not is_fallback,
            is_prefill_fallback=is_fallback,
            prefill_node_id=pending.prefill_node_id,
            transfer_time_s=now - pending.started,
            info=pending.info,
            landed_at=now,
        )
        self._metrics[request_id] = metrics
        if pending.on_outcome is not None:
            pending.on_outcome(metrics)
