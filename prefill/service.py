"""The prefill node's gRPC service (`Prefill` in protocol/node.proto).

A decode node calls `Prefill` with the prompt, its NIXL agent metadata and pool
descriptor, the destination block ids it allocated, and how many leading blocks it
already holds. On the engine thread this node connects to the decode node's agent
(once; cached; refused with FAILED_PRECONDITION when its KV compatibility hash differs,
kv_transfer/compat.py) and queues the prompt in the engine with its `PushTarget`; the
engine's KV connector here, the PrefillPusher, pushes each chunk's finished blocks as the
engine reports them (prefix-cache reuse and chunked prefill as anywhere; one sampled token).
The RPC answers once the last chunk's push completed: first token, final notification
tag, cache and push statistics. A failed push, an engine error or an abort ends the RPC
with an error status; the decode node then prefills the prompt itself. ABORTED (a failed
push, an abort) comes only once the request's pushes drained: the decode node gives its
blocks to other requests on it. No push is posted
past the RPC's deadline (the decode node's, propagated by gRPC, or `timeout_s`).

`Abort` (from the decode node: its client went away, or its Prefill RPC failed) stops the
named requests and answers once their pushes in flight drained, so that the decode node
may give their blocks to other requests; DEADLINE_EXCEEDED when they did not drain within
`ABORT_DRAIN_S`. A Prefill RPC that ends early (cancelled, past its deadline) likewise
aborts its request and waits for the drain before it ends.

Tracing: the RPC is a "Prefill.Prefill" span, child of the decode node's "prefill rpc" span
(W3C traceparent in the call's metadata); each chunk push is a "kv push" span under it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from splitserve.engine.core import EngineCore
from splitserve.kv_transfer import IncompatiblePeer, PoolDescriptor
from splitserve.node.rpcs import NodeRpcs, RoleStats
from splitserve.node.runtime import NodeRuntime
from splitserve.prefill.pusher import PrefillPusher, PushOutcome, PushTarget
from splitserve.protocol import log_context, node_pb2_grpc
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol.messages import sampling_params_from_proto, token_logprob_to_proto
from splitserve.protocol.tracing import (
    DECODE_NODE_ID,
    NODE_ID,
    PROMPT_TOKENS,
    REQUEST_ID,
    ROLE,
    AttributeValue,
    Span,
)

logger = logging.getLogger(__name__)

# How long an Abort waits for the named requests' pushes in flight to complete (they
# normally take milliseconds; a push to an unreachable peer fails within UCX's timeout).
ABORT_DRAIN_S = 30.0


def _refusal_status(exc: ValueError) -> grpc.StatusCode:
    """FAILED_PRECONDITION for a decode node whose KV pool is incompatible, else
    INVALID_ARGUMENT."""
    if isinstance(exc, IncompatiblePeer):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT


class PrefillService(NodeRpcs, node_pb2_grpc.PrefillServicer):
    def __init__(self, runtime: NodeRuntime, pusher: PrefillPusher) -> None:
        self.runtime = runtime
        self.pusher = pusher
        # Each request's push outcome, resolved once its pushes drained (any outcome).
        self._outcomes: dict[str, asyncio.Future[PushOutcome]] = {}
        # Requests whose Abort reached the engine before their Prefill's admission (engine
        # thread only): that admission is refused.
        self._aborted_early: set[str] = set()

    @classmethod
    async def create(cls, runtime: NodeRuntime) -> PrefillService:
        """The service, with its PrefillPusher installed as the engine's KV connector."""
        pusher = PrefillPusher(
            runtime.require_agent(), runtime.require_metrics().require_push(), runtime.tracer
        )
        await runtime.engine.run(lambda core: core.set_connector(pusher))
        return cls(runtime, pusher)

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        tracer = self.runtime.tracer
        parent = tracer.parent_from(context.invocation_metadata())
        attributes: dict[str, AttributeValue] = {
            REQUEST_ID: request.request_id,
            NODE_ID: self.runtime.node_id,
            ROLE: "prefill",
            PROMPT_TOKENS: len(request.prompt_token_ids),
            DECODE_NODE_ID: request.decode_node_id,
        }
        with tracer.start_span("Prefill.Prefill", parent, "server", attributes) as span:
            response = await self._prefill(request, context, span)
            span.set_many(
                {
                    "splitserve.cached_tokens": response.num_cached_tokens,
                    "splitserve.num_chunks": response.num_chunks,
                    "splitserve.bytes_pushed": response.num_bytes_pushed,
                }
            )
            return response

    async def _prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext, span: Span
    ) -> pb.PrefillResponse:
        if self.runtime.is_draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill node is draining")
        started = time.monotonic()
        rid = request.request_id
        log_context.REQUEST_ID.set(rid)  # this RPC's task: its log lines name the request
        try:
            params = sampling_params_from_proto(request.sampling_params)
            descriptor = PoolDescriptor.from_json(request.decode_pool_descriptor)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        loop = asyncio.get_running_loop()
        done = self._outcome_of(rid)
        agent = self.runtime.require_agent()
        prompt = list(request.prompt_token_ids)
        deadline = _deadline(request.timeout_s, context.time_remaining())

        def resolve(outcome: PushOutcome) -> None:
            if not done.done():
                done.set_result(outcome)

        def on_done(outcome: PushOutcome) -> None:
            loop.call_soon_threadsafe(resolve, outcome)

        def admit(core: EngineCore) -> None:
            if params.n != 1:
                raise ValueError("remote prefill serves n=1 requests")
            if rid in self._aborted_early:
                self._aborted_early.discard(rid)
                raise ValueError(f"request {rid} was aborted before its prefill began")
            peer = agent.connect(request.decode_agent_metadata, descriptor)
            dst = list(request.dst_block_ids)
            target = PushTarget(peer, dst, request.num_skip_blocks, on_done, span, deadline)
            core.add_request(rid, prompt, params, target)

        try:
            await self.runtime.engine.compile_grammar(params)
            await self.runtime.engine.run(admit)
        except ValueError as exc:
            done.cancel()  # nothing to drain: an Abort waiting for it returns
            # An Abort that came before a refused admission leaves nothing to refuse.
            await self.runtime.engine.run(lambda core: self._aborted_early.discard(rid))
            await context.abort(_refusal_status(exc), str(exc))
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            outcome = await asyncio.wait_for(asyncio.shield(done), timeout)
        except (TimeoutError, asyncio.CancelledError):
            await self._abort([rid])  # returns once its pushes drained
            raise
        if not outcome.ok:
            await context.abort(grpc.StatusCode.ABORTED, outcome.error or "prefill failed")
        return _response(rid, outcome, time.monotonic() - started)

    def _outcome_of(self, rid: str) -> asyncio.Future[PushOutcome]:
        """A new future for `rid`'s push outcome, known to `_abort` until resolved."""
        done: asyncio.Future[PushOutcome] = asyncio.get_running_loop().create_future()
        self._outcomes[rid] = done

        def forget(_: object) -> None:
            if self._outcomes.get(rid) is done:
                del self._outcomes[rid]

        done.add_done_callback(forget)
        return done

    async def _abort(self, request_ids: list[str]) -> tuple[int, list[str]]:
        """Abort the requests; (how many were known, those whose pushes in flight did not
        drain within ABORT_DRAIN_S), once the others drained."""
        pusher = self.pusher

        def abort(core: EngineCore) -> int:
            num = 0
            for rid in request_ids:
                known = core.is_unfinished(rid)
                core.abort(rid)
                known = pusher.abort(rid) or known
                if not known and rid in self._outcomes:  # its Prefill is not admitted yet
                    self._aborted_early.add(rid)
                num += int(known)
            return num

        num = await self.runtime.engine.run(abort)
        draining = {rid: f for rid in request_ids if (f := self._outcomes.get(rid)) is not None}
        if draining:
            await asyncio.wait(draining.values(), timeout=ABORT_DRAIN_S)
        return num, [rid for rid, f in draining.items() if not f.done()]

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        num, undrained = await self._abort(list(request.request_ids))
        if undrained:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"pushes of {undrained} still in flight after {ABORT_DRAIN_S:g} s",
            )
        return pb.AbortResponse(num_aborted=num)

    def role_stats(self) -> RoleStats:
        pusher = self.pusher
        return RoleStats(
            num_transfers_in_flight=pusher.num_in_flight,
            transfer_bytes_in_flight=pusher.num_bytes_in_flight,
            transfer_bytes_total=pusher.num_bytes_total,
            num_transfers_completed=pusher.num_pushes_completed,
            num_transfers_failed=pusher.num_pushes_failed,
        )


def _deadline(timeout_s: float, remaining_s: float | None) -> float | None:
    """time.monotonic() of the earlier of the request's `timeout_s` (0: none) and the
    call's propagated deadline (`remaining_s` from now; None: none)."""
    bounds = [t for t in (timeout_s or None, remaining_s) if t is not None]
    return time.monotonic() + min(bounds) if bounds else None


def _response(rid: str, outcome: PushOutcome, prefill_time_s: float) -> pb.PrefillResponse:
    return pb.PrefillResponse(
        request_id=rid,
        first_token_id=outcome.first_token_id or 0,
        first_token_logprob=(
            token_logprob_to_proto(outcome.first_logprob) if outcome.first_logprob else None
        ),
        final_notif_tag=outcome.final_tag.encode(),
        num_cached_tokens=outcome.num_cached_tokens,
        prefill_time_s=prefill_time_s,
        num_bytes_pushed=outcome.num_bytes,
        num_chunks=outcome.num_chunks,
        num_blocks_pushed=outcome.num_blocks,
        queue_time_s=outcome.queue_time_s,
        compute_time_s=outcome.compute_time_s,
        push_tail_time_s=outcome.push_tail_time_s,
    )


async def add_prefill_service(runtime: NodeRuntime, server: grpc.aio.Server) -> None:
    node_pb2_grpc.add_PrefillServicer_to_server(await PrefillService.create(runtime), server)
