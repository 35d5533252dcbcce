"""The decode node's gRPC service (`Decode` in protocol/node.proto).

`GenerateMany` (bidirectional, decode/multiplex.py) carries many requests over one stream
per router, each run as `Generate` runs it (`run`); what follows holds for both.

`Generate` (server stream), from the router:
- with `prefill_node` set and n == 1: add the request with `RemotePrefillParams`; the
  engine allocates the prompt's blocks and its KV connector (RemotePrefills) expects the
  chunks and hands the plan back (`on_plan`, engine thread -> event loop); then call
  `Prefill` on that node with this node's NIXL metadata and the destination blocks; the
  request joins the batch once every chunk landed and the RPC answered. If the pool is
  short, the RPC fails or the KV does not arrive in time, the prompt is prefilled here;
  after a failed RPC the blocks the prefill node was given stay set aside until its
  `Abort` for the request answered (it answers once the request's pushes drained), or
  past the RPC's deadline when it cannot answer. An RPC that ended ABORTED (the node
  stopped the request: a failed push, or the Abort sent when the client went away) was
  answered once its pushes drained: its blocks go at once, with no second Abort.
- otherwise: prefill locally (aggregated mode, or conditional disaggregation).
Token deltas stream back as they are generated, coalesced: one message carries every
token the request got since the previous one (one per engine step while the stream keeps
up, or per `--stream-interval` tokens). The engine hands them to the request's
`StreamedRequest` (decode/streamed_request.py) without waking a task per request. The
last message carries usage and metrics; with `trace_timing`, every message carries its
StreamTiming (engine step end, step time, hand-off to gRPC). A cancelled stream (client
gone) aborts the request here and on the prefill node.

Tracing (decode/generate_spans.py): the call is a "Decode.Generate" span, child of the
router's span named in the call's metadata; under it "prefill rpc" (whose context goes to
the prefill node in the Prefill call's metadata), "admission" (blocks allocated to KV
landed or fallback) and "stream" (first token to the end).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc

from splitserve.decode.generate_spans import GenerateSpans
from splitserve.decode.multiplex import (
    Metadata,
    Multiplexer,
    Outbox,
    RequestRefused,
    one_stream,
)
from splitserve.decode.remote_prefill import (
    RemotePrefillInfo,
    RemotePrefillParams,
    RemotePrefills,
    TransferMetrics,
)
from splitserve.decode.streamed_request import StreamedRequest
from splitserve.engine.core import EngineCore
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.scheduler import RemotePlan
from splitserve.kv_transfer import ArrivalTracker
from splitserve.kv_transfer.layout import PoolDescriptor
from splitserve.node.rpcs import NodeRpcs, RoleStats
from splitserve.node.runtime import NodeRuntime
from splitserve.protocol import log_context, node_pb2_grpc
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol.messages import (
    sampling_params_from_proto,
    token_logprob_from_proto,
)
from splitserve.protocol.security import open_channel
from splitserve.protocol.tracing import (
    NODE_ID,
    PREFILL_NODE_ID,
    PREFILL_REMOTE,
    PROMPT_TOKENS,
    REQUEST_ID,
    ROLE,
    AttributeValue,
)

logger = logging.getLogger(__name__)
_RECENT = 1000
# After a failed Prefill RPC whose prefill node did not confirm its pushes drained: how
# long past the RPC's deadline a push posted before it may still land.
PUSH_GRACE_S = 5.0
# How long a client-gone request's Abort, forwarded to its prefill node, may take.
ABORT_FORWARD_TIMEOUT_S = 5.0


class DecodeService(NodeRpcs, node_pb2_grpc.DecodeServicer):
    def __init__(self, runtime: NodeRuntime, remote: RemotePrefills, agent_metadata: bytes):
        self.runtime = runtime
        self.pool: PoolDescriptor = runtime.require_agent().pool_descriptor
        self.remote = remote
        self._agent_metadata = agent_metadata
        # Requests whose Generate stream is open (a plan for any other is abandoned).
        self._open: set[str] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._recent_ttft_s: deque[float] = deque(maxlen=_RECENT)
        self._recent_transfer_s: deque[float] = deque(maxlen=_RECENT)

    @classmethod
    async def create(cls, runtime: NodeRuntime) -> DecodeService:
        """The service, with its RemotePrefills installed as the engine's KV connector."""
        agent = runtime.require_agent()
        tracker = ArrivalTracker(agent, runtime.config.prefill_timeout_s)
        remote = RemotePrefills(
            tracker,
            agent.pool_descriptor.block_bytes,
            runtime.core.block_size,
            runtime.require_metrics().require_receive(),
        )

        def install(core: EngineCore) -> bytes:
            core.set_connector(remote)
            return agent.metadata()

        return cls(runtime, remote, await runtime.engine.run(install))

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for msg in one_stream(self.run, request, context.invocation_metadata()):
                yield msg
        except RequestRefused as refused:
            await context.abort(refused.code, refused.details)

    async def GenerateMany(
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepBatch]:
        async for batch in Multiplexer(self.run).serve(requests):
            yield batch

    async def run(self, request: pb.GenerateRequest, metadata: Metadata, outbox: Outbox) -> None:
        """Run one request (Generate and GenerateMany), its messages to `outbox`, until
        its finished message was put there; RequestRefused when the node is draining or
        the request is invalid."""
        if self.runtime.is_draining:
            raise RequestRefused(grpc.StatusCode.UNAVAILABLE, "decode node is draining")
        started = time.monotonic()
        rid = request.request_id
        log_context.REQUEST_ID.set(rid)  # this RPC's task: its log lines name the request
        try:
            params = sampling_params_from_proto(request.sampling_params)
        except ValueError as exc:
            raise RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        node = request.prefill_node if request.HasField("prefill_node") else None
        if params.n != 1:
            node = None  # n > 1 samples several first tokens: prefill here
        spans = self._generate_spans(request, metadata, node)
        kv_params = None if node is None else self._remote_params(rid, request, node, spans)
        stream = StreamedRequest(
            request, self.runtime.config.stream_interval, outbox, spans.on_first_token
        )
        is_done = False
        is_first = rid not in self._open  # a duplicate id is refused by the engine below
        self._open.add(rid)
        engine = self.runtime.engine
        prompt = list(request.prompt_token_ids)
        try:
            await engine.add(rid, prompt, params, kv_params, stream.on_output)
            try:
                out = await stream.last
            finally:
                await engine.close(rid, stream.last.done())
            stream.send_last(out, await self._final(rid, out, started, stream.first_token_time))
            is_done = True
        except ValueError as exc:
            spans.rpc.fail(str(exc))
            raise RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        finally:
            if is_first:
                self._open.discard(rid)
            if node is not None and not is_done:
                self._spawn(self._abort_on(node.grpc_address, rid))
            num_tokens = stream.num_generated
            spans.finish(num_tokens, None if is_done else "ended before its last token")

    def _generate_spans(
        self, request: pb.GenerateRequest, metadata: Metadata, node: pb.NodeEndpoint | None
    ) -> GenerateSpans:
        tracer = self.runtime.tracer
        attributes: dict[str, AttributeValue] = {
            REQUEST_ID: request.request_id,
            NODE_ID: self.runtime.node_id,
            ROLE: "decode",
            PROMPT_TOKENS: len(request.prompt_token_ids),
            PREFILL_REMOTE: node is not None,
        }
        if node is not None:
            attributes[PREFILL_NODE_ID] = node.node_id
        parent = tracer.parent_from(metadata)
        return GenerateSpans(tracer, parent, attributes)

    def _remote_params(
        self, rid: str, request: pb.GenerateRequest, node: pb.NodeEndpoint, spans: GenerateSpans
    ) -> RemotePrefillParams:
        loop = asyncio.get_running_loop()

        def start_prefill(plan: RemotePlan) -> None:  # on the event loop
            if rid in self._open:
                spans.on_plan()
                self._spawn(self._call_prefill(rid, request, plan, node, spans))
            else:  # the client went away while the request was being added
                self._spawn(self.runtime.engine.run(lambda core: self.remote.abandon(rid)))

        def on_plan(plan: RemotePlan) -> None:  # on the engine thread
            loop.call_soon_threadsafe(start_prefill, plan)

        def on_outcome(metrics: TransferMetrics) -> None:  # on the engine thread
            loop.call_soon_threadsafe(spans.on_admitted, metrics)

        timeout = self.runtime.config.prefill_timeout_s
        num_prompt = len(request.prompt_token_ids)
        traced = on_outcome if self.runtime.tracer.is_enabled else None
        return RemotePrefillParams(node.node_id, timeout, num_prompt, on_plan, traced)

    async def _final(
        self, rid: str, out: RequestOutput, started: float, first_token_time: float | None
    ) -> dict[str, Any]:
        metrics: TransferMetrics | None = await self.runtime.engine.run(
            lambda core: self.remote.pop_metrics(rid)
        )
        ttft = (first_token_time or time.monotonic()) - started
        self._recent_ttft_s.append(ttft)
        is_remote = metrics is not None and metrics.is_prefill_remote
        if metrics is not None and is_remote:
            self._recent_transfer_s.append(metrics.transfer_time_s)
        # Waiting in this node's scheduler: from arrival (a local prefill) or from the KV
        # landing (a remote one) to the first schedule; 0 if it never was (one token).
        scheduled = out.metrics.get("first_scheduled_s")
        queue_s = 0.0
        if scheduled is not None:
            since = metrics.landed_at if metrics is not None and is_remote else started
            queue_s = max(0.0, scheduled - since)
        return {
            "ttft_s": ttft,
            "transfer": metrics,
            "first_token_time": first_token_time,
            "queue_time_s": queue_s,
        }

    async def _call_prefill(
        self,
        rid: str,
        request: pb.GenerateRequest,
        plan: RemotePlan,
        node: pb.NodeEndpoint,
        spans: GenerateSpans,
    ) -> None:
        timeout = self.runtime.config.prefill_timeout_s
        message = pb.PrefillRequest(
            request_id=rid,
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params,
            decode_node_id=self.runtime.node_id,
            decode_agent_name=self.pool.agent_name,
            decode_agent_metadata=self._agent_metadata,
            decode_pool_descriptor=self.pool.to_json().encode(),
            dst_block_ids=plan.block_ids,
            num_skip_blocks=plan.num_cached_blocks,
            timeout_s=timeout,
        )
        engine = self.runtime.engine
        deadline = time.monotonic() + timeout
        with spans.prefill_call(node.node_id) as span:
            try:
                stub = node_pb2_grpc.PrefillStub(self._channel(node.grpc_address))
                resp = await stub.Prefill(message, timeout=timeout, metadata=span.metadata())
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
                span.fail(error)
                await engine.run(lambda c: self.remote.rpc_failed(rid, error))
                if exc.code() != grpc.StatusCode.ABORTED:  # ABORTED: its pushes drained
                    await self._await_pushes_over(rid, node.grpc_address, deadline)
                await engine.run(lambda c: self.remote.writes_ended(rid))
                return
            span.set("splitserve.cached_tokens", resp.num_cached_tokens)
        logprob = (
            token_logprob_from_proto(resp.first_token_logprob)
            if resp.HasField("first_token_logprob")
            else None
        )
        info = RemotePrefillInfo(
            num_cached_tokens=resp.num_cached_tokens,
            queue_time_s=resp.queue_time_s,
            compute_time_s=resp.compute_time_s,
            push_tail_time_s=resp.push_tail_time_s,
        )
        await engine.run(
            lambda c: self.remote.rpc_succeeded(rid, resp.first_token_id, logprob, info)
        )

    async def _await_pushes_over(self, rid: str, address: str, deadline: float) -> None:
        """Return once the prefill node at `address` pushes nothing more into `rid`'s blocks.

        A failed Prefill RPC says nothing of that: a deadline ends the call here while the
        node may still be computing and pushing. Its Abort answers once the request's
        pushes drained; a node that cannot be reached (UNAVAILABLE: gone) pushes nothing.
        Otherwise (frozen, overloaded) wait until past the RPC's deadline, after which the
        node posts no push (prefill/pusher.py), and `PUSH_GRACE_S` for those in flight."""
        code = await self._send_abort(address, rid, self.runtime.config.prefill_timeout_s)
        if code is None or code == grpc.StatusCode.UNAVAILABLE:
            return
        wait_s = max(0.0, deadline + PUSH_GRACE_S - time.monotonic())
        logger.warning(
            "prefill node %s did not confirm that it stopped pushing %s (%s): its blocks "
            "stay set aside %.3g s more",
            address,
            rid,
            code.name,
            wait_s,
        )
        await asyncio.sleep(wait_s)

    async def _abort_on(self, address: str, rid: str) -> None:
        code = await self._send_abort(address, rid, ABORT_FORWARD_TIMEOUT_S)
        if code is not None:
            logger.info("could not forward abort of %s to %s: %s", rid, address, code.name)

    async def _send_abort(self, address: str, rid: str, timeout: float) -> grpc.StatusCode | None:
        """Call Abort for `rid` on the prefill node at `address`: None once it answered
        (it stopped the request and its pushes drained), else the call's status code."""
        stub = node_pb2_grpc.PrefillStub(self._channel(address))
        try:
            await stub.Abort(pb.AbortRequest(request_ids=[rid]), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return None

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, (), self.runtime.config.security)
            self._channels[address] = channel
        return channel

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        ids = list(request.request_ids)

        def known(core: EngineCore) -> int:
            return sum(core.is_unfinished(rid) for rid in ids)

        num = await self.runtime.engine.run(known)
        for rid in ids:
            await self.runtime.engine.abort(rid)
        return pb.AbortResponse(num_aborted=num)

    def role_stats(self) -> RoleStats:
        remote = self.remote
        extra = {}
        for name, values in (
            ("ttft_s", self._recent_ttft_s),
            ("transfer_time_s", self._recent_transfer_s),
        ):
            if values:
                extra[f"{name}_mean"] = statistics.fmean(values)
                extra[f"{name}_max"] = max(values)
        return RoleStats(
            num_transfers_in_flight=remote.num_in_flight,
            transfer_bytes_in_flight=remote.num_bytes_in_flight,
            transfer_bytes_total=remote.num_bytes_total,
            num_transfers_completed=remote.num_completed,
            num_transfers_failed=remote.num_failed,
            num_prefill_fallbacks=remote.num_fallbacks,
            prompt_tokens_received=remote.num_prompt_tokens_received,
            extra=extra,
        )

    async def close(self) -> None:
        """Close the channels to prefill nodes (after the gRPC server stopped)."""
        for channel in self._channels.values():
            await channel.close()


async def add_decode_service(runtime: NodeRuntime, server: grpc.aio.Server) -> None:
    service = await DecodeService.create(runtime)
    runtime.on_stop.append(service.close)
    node_pb2_grpc.add_DecodeServicer_to_server(service, server)
