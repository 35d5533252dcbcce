"""Prometheus metrics of the router, on a registry of its own (one per app instance).

Request metrics are observed on the request path; per-node gauges are set when /metrics is
scraped, from the node list (registry load) and one Stats call per node (prefix-cache hits),
and the same Stats answers give per-node totals (engine steps, tokens computed and
generated, preemptions), collected as counters at the scrape (`NodeTotals`).
The TTFT breakdown (every completion's wait in the decode node's queue; for a remote
prefill, where its time to first token went: prefill queue, prefill compute, push tail,
admission, and the whole KV transfer) comes from the decode node's `RequestMetrics` on
the final stream message (`observe_request_metrics`, called by router/generation.py).
Every metric is listed in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from splitserve.node.registry import NodeRecord
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol.messages import LABELLED_COUNTERS, labelled_values

_LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
_ITL_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
_ROUTING_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
_STAGE_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
# Parts of a time to first token: a queue wait or a push tail can be under a millisecond.
_BREAKDOWN_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_NODE_LABELS = ("node_id", "role")
# The TTFT breakdown of remote prefills: (RequestMetrics field, histogram name, help).
TTFT_BREAKDOWN = (
    (
        "prefill_queue_time_s",
        "prefill_queue_time_seconds",
        "Remote prefill: waiting in the prefill node's scheduler",
    ),
    (
        "prefill_compute_time_s",
        "prefill_compute_time_seconds",
        "Remote prefill: first chunk scheduled to last chunk computed",
    ),
    (
        "push_tail_time_s",
        "push_tail_time_seconds",
        "Remote prefill: last chunk computed to its KV push completed",
    ),
    (
        "admission_time_s",
        "admission_time_seconds",
        "Remote prefill: KV landed and Prefill RPC answered to the first token streamed",
    ),
    (
        "transfer_time_s",
        "kv_transfer_time_seconds",
        "Remote prefill: Prefill RPC sent to the last KV block landed (decode node's clock)",
    ),
)
_DECODE_QUEUE_HELP = (
    "Waiting in the decode node's scheduler: arrival (local prefill) or KV landed (remote "
    "prefill) to first scheduled"
)
# Stages of a streamed message, in order (docs/performance.md); observed only with
# --trace-stream-timing.
STREAM_STAGES = ("engine_step", "node", "grpc", "router")
# Per-node totals from the Stats RPC: (StatsResponse field, counter name, help).
NODE_TOTALS = (
    ("num_steps", "node_engine_steps", "Engine steps the node ran since it started"),
    (
        "prompt_tokens_computed",
        "node_prompt_tokens_computed",
        "Prompt tokens the node computed since it started (not cached, not received)",
    ),
    ("generation_tokens", "node_generation_tokens", "Tokens the node generated since it started"),
    (
        "num_preemptions",
        "node_preemptions",
        "Requests the node preempted for lack of KV blocks since it started",
    ),
)


class NodeTotals:
    """The nodes' cumulative engine counts from their last Stats answers, yielded as
    counters when the registry is collected (a node's own counters, read, not counted
    here; a restarted node starts again from 0, which Prometheus reads as a reset)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._rows: list[tuple[str, str, pb.StatsResponse]] = []

    def update(self, nodes: Sequence[NodeRecord], stats: Sequence[pb.StatsResponse | None]) -> None:
        self._rows = [
            (node.node_id, node.role, st)
            for node, st in zip(nodes, stats, strict=True)
            if st is not None
        ]

    def collect(self) -> Iterator[CounterMetricFamily]:
        for field, name, help_text in NODE_TOTALS:
            family = CounterMetricFamily(self._prefix + name, help_text, labels=_NODE_LABELS)
            for node_id, role, st in self._rows:
                family.add_metric([node_id, role], float(getattr(st, field)))
            yield family
        for counter in LABELLED_COUNTERS:
            family = CounterMetricFamily(
                self._prefix + "node_" + counter.metric,
                counter.help,
                labels=[*_NODE_LABELS, counter.label],
            )
            for node_id, role, st in self._rows:
                for label, value in sorted(labelled_values(st.extra, counter.key).items()):
                    family.add_metric([node_id, role, label], value)
            yield family


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        p = "splitserve_router_"
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Request arrival to its first generated token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Time between consecutive token messages of one completion stream",
            buckets=_ITL_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds",
            "Request arrival to its last token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.routing = Histogram(
            p + "routing_decision_seconds",
            "Node list, prefix lookup and policy for one prompt",
            buckets=_ROUTING_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens served", registry=r)
        self.cached_tokens = Counter(
            p + "cached_prompt_tokens", "Prompt tokens found cached (node usage)", registry=r
        )
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", registry=r)
        # The router process's CPU seconds, memory and open files (Linux /proc): how close
        # the one event loop that streams every token is to a full core.
        ProcessCollector(namespace=p.rstrip("_"), registry=r)
        self._add_request_and_node_metrics(p, r)

    def _add_request_and_node_metrics(self, p: str, r: CollectorRegistry) -> None:
        self.requests = Counter(
            p + "requests",
            "Finished HTTP requests by endpoint and status (499: client went away)",
            ["endpoint", "status"],
            registry=r,
        )
        self.decisions = Counter(
            p + "routing_decisions",
            "Routing decisions by policy used and prefill placement",
            ["policy", "prefill"],
            registry=r,
        )
        self.node_running = Gauge(
            p + "node_num_running", "Running requests", _NODE_LABELS, registry=r
        )
        self.node_waiting = Gauge(
            p + "node_num_waiting", "Waiting requests", _NODE_LABELS, registry=r
        )
        self.node_kv_usage = Gauge(
            p + "node_kv_usage", "Fraction of KV blocks in use", _NODE_LABELS, registry=r
        )
        self.node_kv_cache_tokens = Gauge(
            p + "node_kv_cache_tokens",
            "The node's KV pool in tokens (blocks x block size)",
            _NODE_LABELS,
            registry=r,
        )
        self.node_hit_rate = Gauge(
            p + "node_prefix_cache_hit_rate",
            "Prefix-cache hits / queries (prompt tokens) since the node started",
            _NODE_LABELS,
            registry=r,
        )
        self.node_totals = NodeTotals(p)
        r.register(self.node_totals)
        self.stream_stage = Histogram(
            p + "stream_stage_seconds",
            "Per streamed message: engine_step = the step that made its tokens, node = step "
            "end to the node's gRPC hand-off, grpc = hand-off to the router's receipt, "
            "router = receipt to its SSE frame handed to the HTTP server "
            "(--trace-stream-timing, one-host clusters)",
            ["stage"],
            buckets=_STAGE_BUCKETS_S,
            registry=r,
        )
        # The stages' children, looked up once (a message's worth of observations comes
        # with every streamed message).
        self._engine_step_stage = self.stream_stage.labels("engine_step")
        self._node_stage = self.stream_stage.labels("node")
        self._grpc_stage = self.stream_stage.labels("grpc")
        self._router_stage = self.stream_stage.labels("router")
        self.redis_up = Gauge(p + "redis_up", "1 when Redis answered the last call", registry=r)
        self._add_ttft_breakdown(p, r)

    def _add_ttft_breakdown(self, p: str, r: CollectorRegistry) -> None:
        self.ttft_breakdown = {
            field: Histogram(p + name, doc, buckets=_BREAKDOWN_BUCKETS_S, registry=r)
            for field, name, doc in TTFT_BREAKDOWN
        }
        self.decode_queue_time = Histogram(
            p + "decode_queue_time_seconds",
            _DECODE_QUEUE_HELP,
            buckets=_BREAKDOWN_BUCKETS_S,
            registry=r,
        )
        self.remote_prefills = Counter(
            p + "remote_prefills",
            "Completions whose prompt was sent to a prefill node, by outcome (remote: its KV "
            "arrived; fallback: the decode node prefilled it itself)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("remote", "fallback"):
            self.remote_prefills.labels(outcome)

    def observe_request_metrics(self, metrics: pb.RequestMetrics) -> None:
        """The decode node's metrics of one finished completion (its final message)."""
        self.decode_queue_time.observe(metrics.queue_time_s)
        if metrics.is_prefill_fallback:
            self.remote_prefills.labels("fallback").inc()
        if not metrics.is_prefill_remote:
            return
        self.remote_prefills.labels("remote").inc()
        for field, histogram in self.ttft_breakdown.items():
            histogram.observe(getattr(metrics, field))

    def observe_node_timing(self, timing: pb.StreamTiming, received_s: float) -> None:
        """The node's stages of one message; `received_s` is the router's monotonic clock."""
        self._engine_step_stage.observe(timing.step_time_s)
        self._node_stage.observe(max(0.0, timing.sent_s - timing.step_end_s))
        self._grpc_stage.observe(max(0.0, received_s - timing.sent_s))

    def observe_router_stage(self, seconds: float) -> None:
        """The router's stage of one timed message: its receipt to its SSE frame."""
        self._router_stage.observe(seconds)

    def set_nodes(
        self, nodes: Sequence[NodeRecord], stats: Sequence[pb.StatsResponse | None]
    ) -> None:
        gauges = (
            self.node_running,
            self.node_waiting,
            self.node_kv_usage,
            self.node_kv_cache_tokens,
            self.node_hit_rate,
        )
        for gauge in gauges:
            gauge.clear()
        self.node_totals.update(nodes, stats)
        for node, st in zip(nodes, stats, strict=True):
            labels = (node.node_id, node.role)
            if st is None:
                running, waiting, kv = (
                    node.load.num_running,
                    node.load.num_waiting,
                    node.load.kv_usage,
                )
            else:
                running, waiting = st.num_running, st.num_waiting + st.num_waiting_for_remote_kv
                kv = st.kv_usage
                if st.prefix_cache_queries:
                    rate = st.prefix_cache_hits / st.prefix_cache_queries
                    self.node_hit_rate.labels(*labels).set(rate)
            self.node_running.labels(*labels).set(running)
            self.node_waiting.labels(*labels).set(waiting)
            self.node_kv_usage.labels(*labels).set(kv)
            pool = node.capacity.num_kv_blocks * node.block_size
            self.node_kv_cache_tokens.labels(*labels).set(pool)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
