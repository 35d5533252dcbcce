"""NodeRuntime: what a prefill and a decode node share: the AsyncEngine, the NIXL
TransferAgent over the engine's KV pool, the grpc.aio server, and the Redis publisher.

Start-up order (`start`): bind the gRPC port, with TLS and the cluster-token interceptor
when configured (protocol/security.py), so the node id, which names the NIXL agent,
carries the real port -> start tracing (`tracer`; a no-op without --otlp-traces-endpoint)
-> create the TransferAgent on the engine thread -> create the node's metrics
(node/metrics.py) -> let the role add its servicer (which installs its KV connector on the
engine, handing it its metrics) and the grpc.health.v1 service (node/health.py,
NOT_SERVING) -> start serving gRPC, then `/metrics` over HTTP (node/metrics_http.py) ->
register in Redis (the record carries the metrics URL) and publish the cached-block
snapshot -> grpc.health.v1 SERVING -> heartbeat the load every second, and publish KV
events after every step.

Stop order (`stop`): report DRAINING (Health RPC) and NOT_SERVING (grpc.health.v1) ->
deregister from Redis (the router stops sending) -> let in-flight requests finish for
`drain_timeout_s`, then abort the rest -> stop the gRPC server, then the metrics server ->
close the TransferAgent (deregisters the pool) -> stop the engine thread -> flush the spans
still queued for export.

Every TransferAgent call happens on the engine thread (via `engine.call` or step hooks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import grpc

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.stats import EngineStats
from splitserve.engine.thread_names import native_thread_name
from splitserve.kv_transfer import KvCompat, TransferAgent, TransferConfig
from splitserve.node.gc_pauses import GcPauses
from splitserve.node.health import NodeHealth
from splitserve.node.launch_lag import NodeLaunchLag
from splitserve.node.metrics import NodeMetrics
from splitserve.node.metrics_http import MetricsServer
from splitserve.node.publisher import NodePublisher
from splitserve.node.registry import (
    DEFAULT_CLUSTER,
    NodeCapacity,
    NodeLoad,
    NodeRecord,
    make_node_id,
)
from splitserve.protocol import keepalive
from splitserve.protocol.log_context import tag_process
from splitserve.protocol.security import TransportSecurity, add_port, server_interceptors
from splitserve.protocol.tracing import (
    NO_TRACER,
    Tracer,
    TracingConfig,
    check_endpoint,
    start_tracing,
)

logger = logging.getLogger(__name__)

NodeRole = Literal["prefill", "decode"]
# gRPC message cap: a 128k-token prompt is 512 KiB of token ids.
_MAX_MESSAGE_BYTES = 64 << 20
# Longest a metrics scrape waits for the engine thread (it answers between steps; a CPU
# step of a full token budget takes seconds). Prometheus' default scrape timeout is 10 s.
_SCRAPE_WAIT_S = 5.0
# OS name of the threads the NIXL agent starts (benchmarks/thread_cpu.py).
TRANSFER_THREAD_NAME = "kv-transfer"


@dataclass(frozen=True)
class NodeConfig:
    role: NodeRole
    # Address the gRPC server binds; port 0 picks a free one.
    host: str = "127.0.0.1"
    port: int = 0
    # Host other processes use to reach this node; None: `host` (127.0.0.1 for 0.0.0.0).
    advertise_host: str | None = None
    # Redis URL of the cluster; None runs the node unregistered (tests, direct use).
    redis_url: str | None = None
    cluster: str = DEFAULT_CLUSTER
    # Decode: seconds to wait for a prefill node's KV before prefilling locally.
    prefill_timeout_s: float = 30.0
    # Seconds in-flight requests may run on after a stop signal before they are aborted.
    drain_timeout_s: float = 5.0
    heartbeat_interval_s: float = 1.0
    # Seconds a push may stay unfinished before it is failed.
    push_timeout_s: float = 30.0
    # Decode: tokens a request gathers before its next stream message (the first tokens
    # and the last message go at once); 1 streams every engine step.
    stream_interval: int = 1
    # Address and port of the HTTP `/metrics` server; port 0 picks a free one.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # OTLP/gRPC collector for this node's spans (protocol/tracing.py); empty: tracing off.
    otlp_traces_endpoint: str = ""
    # TLS/mTLS of the gRPC server and of this node's calls to others, and the cluster token
    # every RPC must carry (protocol/security.py); default: plaintext, no token.
    security: TransportSecurity = field(default_factory=TransportSecurity)
    # CUDA: seconds of steps to record with launch probes, from `launch_lag_after_s` after
    # the node serves, their summary logged and written to `launch_lag_out` when given
    # (node/launch_lag.py); 0: off.
    launch_lag_s: float = 0.0
    launch_lag_after_s: float = 60.0
    launch_lag_out: str = ""

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if self.prefill_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("prefill_timeout_s must be > 0 and drain_timeout_s >= 0")
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {self.stream_interval}")
        if self.launch_lag_s < 0 or self.launch_lag_after_s < 0:
            raise ValueError(
                f"--launch-lag-s and --launch-lag-after-s must be >= 0, got "
                f"{self.launch_lag_s} and {self.launch_lag_after_s}"
            )
        if self.otlp_traces_endpoint:
            check_endpoint(self.otlp_traces_endpoint)

    @property
    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


# Adds the role's servicer (and installs its KV connector on the engine).
ServicerFactory = Callable[["NodeRuntime", grpc.aio.Server], Awaitable[None]]


class NodeRuntime:
    def __init__(self, engine_config: EngineConfig, config: NodeConfig) -> None:
        self.config = config
        self.engine_config = engine_config
        self.engine = AsyncEngine(engine_config)
        self.core: EngineCore = self.engine.core
        self.started_at = time.monotonic()
        self.gc_pauses = GcPauses()
        self.launch_lag: NodeLaunchLag | None = None
        self.is_draining = False
        self.node_id = ""
        self.port = 0
        self.agent: TransferAgent | None = None
        self.publisher: NodePublisher | None = None
        self.metrics: NodeMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.metrics_url = ""
        self.health: NodeHealth | None = None
        self._server: grpc.aio.Server | None = None
        # Coroutines the role's servicer registers to run once the gRPC server stopped.
        self.on_stop: list[Callable[[], Awaitable[None]]] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        # Spans of this node's RPCs; started once the node id is known (`start`).
        self.tracer: Tracer = NO_TRACER

    @property
    def address(self) -> str:
        return f"{self.config.public_host}:{self.port}"

    @property
    def model_id(self) -> str:
        return self.engine_config.model.model_id

    def require_agent(self) -> TransferAgent:
        if self.agent is None:
            raise RuntimeError("the node's transfer agent is not started")
        return self.agent

    def require_metrics(self) -> NodeMetrics:
        if self.metrics is None:
            raise RuntimeError("the node's metrics are made in start(), before its servicer")
        return self.metrics

    async def start(self, add_servicer: ServicerFactory) -> None:
        options = [
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ]
        security = self.config.security
        server = grpc.aio.server(
            options=[*options, *keepalive.SERVER_OPTIONS],
            interceptors=server_interceptors(security),
        )
        self.port = add_port(server, f"{self.config.host}:{self.config.port}", security)
        if self.port == 0:
            raise ValueError(f"cannot bind {self.config.host}:{self.config.port}; pick a free port")
        self.node_id = make_node_id(self.config.role, self.config.public_host, self.port)
        tag_process(self.node_id, self.config.role)
        self.tracer = start_tracing(self._tracing_config())
        self.agent = await self.engine.run(self._make_agent)
        self.metrics = NodeMetrics(self.node_id, self.config.role, self._stats_for_scrape)
        self.engine.add_step_observer(self.metrics.engine.observe_step)
        await add_servicer(self, server)
        self.health = NodeHealth(self.config.role)
        await self.health.start()
        self.health.add_to(server)
        await server.start()
        self._server = server
        self._start_metrics_server(self.metrics)
        if self.config.redis_url:
            await self._start_publisher(self.config.redis_url)
        await self._start_launch_lag()
        await self.health.set_serving(True)
        logger.info(
            "%s node %s serving on %s (%s)",
            self.config.role,
            self.node_id,
            self.address,
            security.describe(),
        )

    def _make_agent(self, core: EngineCore) -> TransferAgent:
        """The node's NIXL agent over the KV pool, with the pool's compatibility hash."""
        compat = KvCompat.from_pool(self.model_id, core.kv_cache)
        transfer = TransferConfig(
            agent_name=self.node_id,
            push_timeout_s=self.config.push_timeout_s,
            compat_hash=compat.hash(),
            compat_summary=compat.describe(),
        )
        # NIXL's own threads (its progress thread) take this name, not the engine thread's.
        with native_thread_name(TRANSFER_THREAD_NAME):
            return TransferAgent(transfer, core.kv_cache)

    def _start_metrics_server(self, metrics: NodeMetrics) -> None:
        server = MetricsServer(metrics.registry, self.config.metrics_host, self.config.metrics_port)
        server.start()
        self.metrics_server = server
        self.metrics_url = server.url(self.config.public_host)
        logger.info("%s node %s metrics at %s", self.config.role, self.node_id, self.metrics_url)

    def _stats_for_scrape(self) -> EngineStats:
        """On the metrics server's thread: the engine's stats, taken on the engine thread."""
        return self.engine.call(lambda core: core.stats()).result(timeout=_SCRAPE_WAIT_S)

    def _tracing_config(self) -> TracingConfig:
        return TracingConfig(
            endpoint=self.config.otlp_traces_endpoint,
            service_name=f"splitserve-{self.config.role}",
            instance_id=self.node_id,
            role=self.config.role,
            extra_resource={"splitserve.cluster": self.config.cluster},
        )

    async def _start_launch_lag(self) -> None:
        """With --launch-lag-s: launch probes over a stretch of this node's steps."""
        if not self.config.launch_lag_s:
            return
        config = self.config
        lag = NodeLaunchLag(config.launch_lag_after_s, config.launch_lag_s, config.launch_lag_out)
        await self.engine.run(lag.install)
        self.engine.add_step_hook(lag.tick)
        self.launch_lag = lag

    async def _start_publisher(self, redis_url: str) -> None:
        publisher = NodePublisher(
            redis_url, self.config.cluster, heartbeat_interval_s=self.config.heartbeat_interval_s
        )
        snapshot = await self.engine.run(lambda c: c.pool.cached_hashes())
        publisher.start(self._record(), lambda: snapshot)
        self.publisher = publisher
        self.engine.add_step_hook(self._publish_kv_events)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())

    def _record(self) -> NodeRecord:
        core = self.core
        sched = self.engine_config.scheduler
        return NodeRecord(
            node_id=self.node_id,  # type: ignore[arg-type]
            role=self.config.role,
            grpc_address=self.address,
            nixl_agent_name=self.require_agent().name,
            model=self.model_id,
            block_size=core.block_size,
            capacity=NodeCapacity(core.pool.num_blocks, sched.max_num_seqs),
            max_model_len=core.max_model_len,
            metrics_url=self.metrics_url,
            serves_generate_many=self.config.role == "decode",
        )

    def _publish_kv_events(self, core: EngineCore) -> bool:
        stored, removed = core.pool.take_events()
        if (stored or removed) and self.publisher is not None:
            self.publisher.publish_events(stored, removed)
        return False

    async def _heartbeat_loop(self) -> None:
        while True:
            stats = await self.engine.stats()
            if self.publisher is not None:
                self.publisher.heartbeat(
                    NodeLoad(stats.num_running, stats.num_waiting, stats.kv_usage)
                )
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def stop(self) -> None:
        self.is_draining = True
        if self.health is not None:
            await self.health.set_serving(False)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self.publisher is not None:
            self.publisher.stop()
        await self._drain()
        if self.health is not None:
            await self.health.shutdown()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        for hook in self.on_stop:
            await hook()
        self.gc_pauses.close()
        if self.launch_lag is not None:
            await self.engine.run(self.launch_lag.finish)
        if self.agent is not None:
            agent = self.agent

            def close(core: EngineCore) -> None:
                core.connector = None  # its poll reads the agent: stop polling first
                agent.close()

            await self.engine.run(close)
        self.engine.shutdown()
        self.tracer.shutdown()  # after the last span ended: exports what is queued
        logger.info("%s node %s stopped", self.config.role, self.node_id)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while time.monotonic() < deadline:
            ids = await self.engine.run(lambda c: c.unfinished_request_ids())
            if not ids:
                return
            await asyncio.sleep(0.05)
        for request_id in await self.engine.run(lambda c: c.unfinished_request_ids()):
            await self.engine.abort(request_id)
