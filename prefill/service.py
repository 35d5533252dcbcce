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
with an error status; the decode node then prefills the prompt itself.

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
        done: asyncio.Future[PushOutcome] = loop.create_future()
        agent = self.runtime.require_agent()
        prompt = list(request.prompt_token_ids)

        def resolve(outcome: PushOutcome) -> None:
            if not done.done():
                done.set_result(outcome)

        def on_done(outcome: PushOutcome) -> None:
            loop.call_soon_threadsafe(resolve, outcome)

        def admit(core: EngineCore) -> None:
            if params.n != 1:
                raise ValueError("remote prefill serves n=1 requests")
            peer = agent.connect(request.decode_agent_metadata, descriptor)
            dst = list(request.dst_block_ids)
            target = PushTarget(peer, dst, request.num_skip_blocks, on_done, span)
            core.add_request(rid, prompt, params, target)

        try:
            await self.runtime.engine.compile_grammar(params)
            await self.runtime.engine.run(admit)
        except ValueError as exc:
            await context.abort(_refusal_status(exc), str(exc))
        timeout = request.timeout_s or None
        try:
            outcome = await asyncio.wait_for(asyncio.shield(done), timeout)
        except (TimeoutError, asyncio.CancelledError):
            await self._abort([rid])
            raise
        if not outcome.ok:
            await context.abort(grpc.StatusCode.ABORTED, outcome.error or "prefill failed")
        return _response(rid, outcome, time.monotonic() - started)

    async def _abort(self, request_ids: list[str]) -> int:
        pusher = self.pusher

        def abort(core: EngineCore) -> int:
            num = 0
            for rid in request_ids:
                known = core.is_unfinished(rid)
                core.abort(rid)
                num += int(pusher.abort(rid) or known)
            return num

        return await self.runtime.engine.run(abort)

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        return pb.AbortResponse(num_aborted=await self._abort(list(request.request_ids)))

    def role_stats(self) -> RoleStats:
        pusher = self.pusher
        return RoleStats(
            num_transfers_in_flight=pusher.num_in_flight,
            transfer_bytes_in_flight=pusher.num_bytes_in_flight,
            transfer_bytes_total=pusher.num_bytes_total,
            num_transfers_completed=pusher.num_pushes_completed,
            num_transfers_failed=pusher.num_pushes_failed,
        )


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
