"""Prometheus metrics of one node (prefill or decode), on a registry of its own.

Every series carries the labels `node_id` and `role`. Names follow docs/metrics.md:
`splitserve_engine_*` (the engine, both roles), `splitserve_kv_transfer_*` (NIXL pushes on
a prefill node, KV received on a decode node), `splitserve_prefill_*` and
`splitserve_decode_*` (what only that role does).

Who calls what:
- NodeRuntime.start builds `NodeMetrics(node_id, role, snapshot)` once the node id is
  known, before the role's servicer is added, and serves `registry` over HTTP
  (node/metrics_http.py). `snapshot()` returns the engine's `EngineStats`; it is called on
  the HTTP server's thread at each scrape (the runtime runs it on the engine thread), so the
  engine gauges and totals are read, never copied, from what the Stats RPC reports.
- The AsyncEngine calls `engine.observe_step(seconds)` after every step (engine thread).
- PrefillPusher (prefill/pusher.py) calls `PushMetrics.observe_push` per finished push and
  `observe_request` per finished remote prefill; RemotePrefills (decode/remote_prefill.py)
  calls `ReceiveMetrics.observe_*` as remote prefills are requested, land or fall back.
  Both run on the engine thread; prometheus_client's metrics are thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitserve.engine.stats import EngineStats

logger = logging.getLogger(__name__)

LABELS = ("node_id", "role")
# Seconds: a GPU step takes milliseconds, a CPU step of a full token budget seconds.
STEP_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0, 10.0, 20.0,
)  # fmt: skip
# Seconds: one chunk over NVLink takes under a millisecond; a stalled push is failed at
# --push-timeout-s (30 s by default).
TRANSFER_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Bytes: one block of a tiny model is KiBs, a 128k-token Llama-8B prompt 16 GiB.
BYTES_BUCKETS = tuple(float(4**i * 1024) for i in range(13))  # 1 KiB .. 16 GiB
FALLBACK_REASONS = ("pool_short", "rpc_failed", "transfer_failed")

Snapshot = Callable[[], EngineStats]

# (name after splitserve_engine_, help, EngineStats field), read at each scrape.
ENGINE_GAUGES = (
    ("num_requests_running", "Requests in the running batch", "num_running"),
    ("num_requests_waiting", "Requests waiting to be scheduled", "num_waiting"),
    (
        "num_requests_waiting_for_remote_kv",
        "Requests whose prompt KV a prefill node is computing",
        "num_waiting_for_remote_kv",
    ),
    ("kv_usage", "Fraction of KV blocks owned by requests (0..1)", "kv_usage"),
    ("num_kv_blocks", "KV blocks in the pool", "num_blocks"),
)
# Counters (exposed with a _total suffix).
ENGINE_TOTALS = (
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
    ("prefix_cache_hits", "Prompt tokens found in the prefix cache", "prefix_cache_hits"),
    ("preemptions", "Requests preempted (recompute) for lack of KV blocks", "num_preemptions"),
    (
        "prompt_tokens_computed",
        "Prompt tokens this engine computed (not cached, not received)",
        "prompt_tokens_computed",
    ),
    ("generation_tokens", "Tokens generated", "generation_tokens"),
    ("requests_finished", "Requests that ended (any reason)", "num_requests_finished"),
)


class EngineStatsCollector(Collector):
    """The engine's gauges and running totals, read from one `EngineStats` per scrape."""

    def __init__(self, labels: tuple[str, str], snapshot: Snapshot) -> None:
        self.labels = list(labels)
        self.snapshot = snapshot
        self._last: EngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        if stats is None:
            return
        for name, doc, field in ENGINE_GAUGES:
            gauge = GaugeMetricFamily("splitserve_engine_" + name, doc, labels=LABELS)
            gauge.add_metric(self.labels, float(getattr(stats, field)))
            yield gauge
        for name, doc, field in ENGINE_TOTALS:
            total = CounterMetricFamily("splitserve_engine_" + name, doc, labels=LABELS)
            total.add_metric(self.labels, float(getattr(stats, field)))
            yield total

    def _read(self) -> EngineStats | None:
        """This scrape's stats; the previous ones (logged) when the engine does not answer."""
        try:
            self._last = self.snapshot()
        except FutureTimeout:
            logger.warning(
                "metrics scrape: the engine did not answer in time (a long step?); "
                "serving its previous statistics"
            )
        return self._last


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, labels: tuple[str, str]) -> None:
        self.step_duration = Histogram(
            "splitserve_engine_step_duration_seconds",
            "Duration of one engine step (schedule, forward, sample)",
            LABELS,
            buckets=STEP_BUCKETS_S,
            registry=registry,
        ).labels(*labels)

    def observe_step(self, seconds: float) -> None:
        self.step_duration.observe(seconds)


class PushMetrics:
    """Prefill node: KV pushes to decode nodes, and the remote prefills served."""

    def __init__(self, registry: CollectorRegistry, labels: tuple[str, str]) -> None:
        self.registry = registry
        p = "splitserve_kv_transfer_"
        self._pushes = Counter(
            p + "pushes",
            "KV pushes (one per chunk) by result",
            [*LABELS, "status"],
            registry=registry,
        )
        self.push_bytes = Histogram(
            p + "push_bytes", "Bytes of one completed push", LABELS,
            buckets=BYTES_BUCKETS, registry=registry,
        ).labels(*labels)  # fmt: skip
        self.push_duration = Histogram(
            p + "push_duration_seconds", "Push posted to completed, per completed push", LABELS,
            buckets=TRANSFER_BUCKETS_S, registry=registry,
        ).labels(*labels)  # fmt: skip
        self.pushes_in_flight = Gauge(
            p + "pushes_in_flight", "Pushes posted and not finished", LABELS, registry=registry
        ).labels(*labels)
        self.push_bytes_in_flight = Gauge(
            p + "push_bytes_in_flight", "Bytes of the pushes in flight", LABELS, registry=registry
        ).labels(*labels)
        self._requests = Counter(
            "splitserve_prefill_requests",
            "Remote prefills served, by result (ok: every chunk pushed and the first token "
            "returned; failed: a push failed; aborted)",
            [*LABELS, "status"],
            registry=registry,
        )
        self._labels = labels
        for status in ("ok", "failed"):
            self._pushes.labels(*labels, status)
        for status in ("ok", "failed", "aborted"):
            self._requests.labels(*labels, status)

    def observe_push(self, ok: bool, num_bytes: int, elapsed_s: float) -> None:
        self._pushes.labels(*self._labels, "ok" if ok else "failed").inc()
        if ok:
            self.push_bytes.observe(num_bytes)
            self.push_duration.observe(elapsed_s)

    def observe_request(self, status: str) -> None:
        self._requests.labels(*self._labels, status).inc()


class ReceiveMetrics:
    """Decode node: remote prefills requested, KV received, fallbacks to local prefill."""

    def __init__(self, registry: CollectorRegistry, labels: tuple[str, str]) -> None:
        self.registry = registry
        p = "splitserve_kv_transfer_"
        self._receives = Counter(
            p + "receives",
            "Remote prefills whose KV landed (ok) or did not (failed), per request",
            [*LABELS, "status"],
            registry=registry,
        )
        self.receive_bytes = Histogram(
            p + "receive_bytes", "Bytes of KV received for one request", LABELS,
            buckets=BYTES_BUCKETS, registry=registry,
        ).labels(*labels)  # fmt: skip
        self.receive_duration = Histogram(
            p + "receive_duration_seconds",
            "Prefill RPC planned to every KV block landed and the RPC answered, per request",
            LABELS, buckets=TRANSFER_BUCKETS_S, registry=registry,
        ).labels(*labels)  # fmt: skip
        self.received_blocks = Counter(
            p + "received_blocks", "KV blocks received", LABELS, registry=registry
        ).labels(*labels)
        self.receives_in_flight = Gauge(
            p + "receives_in_flight", "Remote prefills waiting for KV", LABELS, registry=registry
        ).labels(*labels)
        self.remote_prefills = Counter(
            "splitserve_decode_remote_prefills",
            "Prefill RPCs requested from prefill nodes",
            LABELS,
            registry=registry,
        ).labels(*labels)
        self._fallbacks = Counter(
            "splitserve_decode_prefill_fallbacks",
            "Remote prefills replaced by a local one, by reason",
            [*LABELS, "reason"],
            registry=registry,
        )
        self._labels = labels
        for status in ("ok", "failed"):
            self._receives.labels(*labels, status)
        for reason in FALLBACK_REASONS:
            self._fallbacks.labels(*labels, reason)

    def observe_received(self, num_blocks: int, num_bytes: int, elapsed_s: float) -> None:
        self._receives.labels(*self._labels, "ok").inc()
        self.received_blocks.inc(num_blocks)
        self.receive_bytes.observe(num_bytes)
        self.receive_duration.observe(elapsed_s)

    def observe_fallback(self, reason: str) -> None:
        if reason not in FALLBACK_REASONS:
            raise ValueError(f"fallback reason must be one of {FALLBACK_REASONS}, got {reason!r}")
        if reason != "pool_short":
            self._receives.labels(*self._labels, "failed").inc()
        self._fallbacks.labels(*self._labels, reason).inc()


class NodeMetrics:
    """The registry of one node and the metric groups of its role."""

    def __init__(self, node_id: str, role: str, snapshot: Snapshot) -> None:
        self.registry = CollectorRegistry()
        labels = (node_id, role)
        self.registry.register(EngineStatsCollector(labels, snapshot))
        self.engine = EngineMetrics(self.registry, labels)
        self.push = PushMetrics(self.registry, labels) if role == "prefill" else None
        self.receive = ReceiveMetrics(self.registry, labels) if role == "decode" else None

    def require_push(self) -> PushMetrics:
        if self.push is None:
            raise RuntimeError("push metrics exist on prefill nodes only")
        return self.push

    def require_receive(self) -> ReceiveMetrics:
        if self.receive is None:
            raise RuntimeError("receive metrics exist on decode nodes only")
        return self.receive


def detached_push_metrics() -> PushMetrics:
    """Push metrics on a registry nobody serves (a pusher built outside a node)."""
    return PushMetrics(CollectorRegistry(), ("", "prefill"))


def detached_receive_metrics() -> ReceiveMetrics:
    """Receive metrics on a registry nobody serves (RemotePrefills outside a node)."""
    return ReceiveMetrics(CollectorRegistry(), ("", "decode"))
