"""The RPCs both node kinds answer the same way: Health, Stats, TransferMetadata.

Each role's servicer inherits `NodeRpcs` and implements `role_stats` -> `RoleStats`, what
only that role knows (transfers in flight, prompt tokens received, fallbacks); `stats`
is the one conversion of the engine's and the role's statistics to the proto.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from splitserve.node.runtime import NodeRuntime
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol.messages import LABELLED_COUNTERS


@dataclass(frozen=True)
class RoleStats:
    """A node kind's own statistics (KV transfer), as the Stats RPC reports them."""

    num_transfers_in_flight: int = 0
    transfer_bytes_in_flight: int = 0
    transfer_bytes_total: int = 0
    num_transfers_completed: int = 0
    num_transfers_failed: int = 0
    # Decode: remote prefills replaced by local ones, prompt tokens received over NIXL.
    num_prefill_fallbacks: int = 0
    prompt_tokens_received: int = 0
    # Named values without a field of their own (recent means and maxima).
    extra: dict[str, float] = field(default_factory=dict)


def health(runtime: NodeRuntime) -> pb.HealthResponse:
    status = pb.HealthResponse.DRAINING if runtime.is_draining else pb.HealthResponse.SERVING
    return pb.HealthResponse(
        status=status,
        node_id=runtime.node_id,
        role=runtime.config.role,
        model=runtime.model_id,
        block_size=runtime.core.block_size,
        uptime_s=time.monotonic() - runtime.started_at,
        message="draining: finishing in-flight requests" if runtime.is_draining else "",
    )


async def stats(runtime: NodeRuntime, role: RoleStats) -> pb.StatsResponse:
    engine_stats = await runtime.engine.stats()
    # EngineStats names its labelled counts (prefill runs, forward passes) by the extra
    # map's keys.
    keys = tuple(counter.key for counter in LABELLED_COUNTERS)
    labelled = {k: v for k, v in engine_stats.as_dict().items() if k.startswith(keys)}
    extra = {
        "prefix_cache_hit_rate": engine_stats.prefix_cache_hit_rate,
        **labelled,
        **runtime.gc_pauses.totals(),
        **role.extra,
    }
    return pb.StatsResponse(
        node_id=runtime.node_id,
        role=runtime.config.role,
        num_running=engine_stats.num_running,
        num_waiting=engine_stats.num_waiting,
        num_waiting_for_remote_kv=engine_stats.num_waiting_for_remote_kv,
        num_blocks_total=engine_stats.num_blocks,
        num_blocks_free=engine_stats.num_free_blocks,
        num_blocks_cached=engine_stats.num_cached_blocks,
        kv_usage=engine_stats.kv_usage,
        prefix_cache_queries=engine_stats.prefix_cache_queries,
        prefix_cache_hits=engine_stats.prefix_cache_hits,
        num_preemptions=engine_stats.num_preemptions,
        prompt_tokens_computed=engine_stats.prompt_tokens_computed,
        generation_tokens=engine_stats.generation_tokens,
        num_requests_finished=engine_stats.num_requests_finished,
        num_steps=engine_stats.num_steps,
        uptime_s=time.monotonic() - runtime.started_at,
        num_transfers_in_flight=role.num_transfers_in_flight,
        transfer_bytes_in_flight=role.transfer_bytes_in_flight,
        transfer_bytes_total=role.transfer_bytes_total,
        num_transfers_completed=role.num_transfers_completed,
        num_transfers_failed=role.num_transfers_failed,
        num_prefill_fallbacks=role.num_prefill_fallbacks,
        prompt_tokens_received=role.prompt_tokens_received,
        extra=extra,
    )


async def transfer_metadata(runtime: NodeRuntime) -> pb.TransferMetadataResponse:
    agent = runtime.require_agent()
    metadata = await runtime.engine.run(lambda core: agent.metadata())
    return pb.TransferMetadataResponse(
        node_id=runtime.node_id,
        agent_name=agent.name,
        agent_metadata=metadata,
        pool_descriptor=agent.pool_descriptor.to_json().encode(),
    )


class NodeRpcs:
    """Health, Stats and TransferMetadata for a servicer holding `self.runtime`."""

    runtime: NodeRuntime

    def role_stats(self) -> RoleStats:
        raise NotImplementedError

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        return health(self.runtime)

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        return await stats(self.runtime, self.role_stats())

    async def TransferMetadata(
        self, request: pb.TransferMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransferMetadataResponse:
        return await transfer_metadata(self.runtime)
