"""Node and router metric registries without a cluster: names, labels, per-node isolation,
the scrape-time engine snapshot, the HTTP server, the router's TTFT breakdown."""

from __future__ import annotations

import concurrent.futures
import logging
import time

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scripted_agent import ScriptedAgent

from splitserve.engine.kv_connector import FinalBlocks
from splitserve.engine.stats import EngineStats
from splitserve.kv_transfer import PeerName
from splitserve.node.metrics import NodeMetrics
from splitserve.node.metrics_http import MetricsServer
from splitserve.prefill.pusher import PrefillPusher, PushOutcome, PushTarget
from splitserve.protocol import node_pb2 as pb
from splitserve.router.metrics import RouterMetrics


def stats(**overrides: float) -> EngineStats:
    fields: dict[str, float] = dict(
        num_running=3,
        num_waiting=2,
        num_waiting_for_remote_kv=1,
        num_held=0,
        num_blocks=64,
        num_free_blocks=40,
        num_cached_blocks=8,
        kv_usage=0.375,
        prefix_cache_queries=100,
        prefix_cache_hits=48,
        num_preemptions=4,
        prompt_tokens_computed=52,
        generation_tokens=17,
        num_requests_finished=5,
        num_steps=30,
    )
    fields.update(overrides)
    return EngineStats(**fields)  # type: ignore[arg-type]


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(exposition: bytes, name: str, **labels: str) -> float:
    found = [
        v for (n, ls), v in samples(exposition).items() if n == name and labels.items() <= set(ls)
    ]
    if len(found) != 1:
        raise AssertionError(f"{name} {labels}: {len(found)} samples")
    return found[0]


def test_node_metrics_read_engine_stats_per_scrape_and_stay_per_node() -> None:
    current = [stats()]
    prefill = NodeMetrics("prefill-a", "prefill", lambda: current[0])
    decode = NodeMetrics("decode-b", "decode", lambda: stats(num_running=9))
    text = generate_latest(prefill.registry)
    ids = {"node_id": "prefill-a", "role": "prefill"}
    assert value(text, "splitserve_engine_num_requests_running", **ids) == 3
    assert value(text, "splitserve_engine_kv_usage", **ids) == 0.375
    assert value(text, "splitserve_engine_prefix_cache_hits_total", **ids) == 48
    assert value(text, "splitserve_engine_preemptions_total", **ids) == 4
    current[0] = stats(num_running=7, num_preemptions=6)
    text = generate_latest(prefill.registry)
    assert value(text, "splitserve_engine_num_requests_running", **ids) == 7
    assert value(text, "splitserve_engine_preemptions_total", **ids) == 6
    # Role groups: pushes on the prefill node, receives on the decode node, nothing shared.
    push = prefill.require_push()
    push.observe_push(True, 4096, 0.002)
    push.observe_push(False, 4096, 0.5)
    push.observe_request("ok")
    text = generate_latest(prefill.registry)
    assert value(text, "splitserve_kv_transfer_pushes_total", status="ok") == 1
    assert value(text, "splitserve_kv_transfer_pushes_total", status="failed") == 1
    assert value(text, "splitserve_kv_transfer_push_bytes_sum", **ids) == 4096
    assert value(text, "splitserve_kv_transfer_push_duration_seconds_count", **ids) == 1
    assert value(text, "splitserve_prefill_requests_total", status="ok") == 1
    other = generate_latest(decode.registry)
    assert b"splitserve_kv_transfer_push" not in other
    assert b"splitserve_prefill_" not in other
    assert value(other, "splitserve_engine_num_requests_running", node_id="decode-b") == 9
    with pytest.raises(RuntimeError, match="decode nodes only"):
        prefill.require_receive()


def test_receive_metrics_count_fallbacks_by_reason() -> None:
    decode = NodeMetrics("decode-b", "decode", stats)
    receive = decode.require_receive()
    receive.remote_prefills.inc(3)
    receive.observe_received(num_blocks=4, num_bytes=4 * 2048, elapsed_s=0.01)
    receive.observe_fallback("rpc_failed")
    receive.observe_fallback("pool_short")
    with pytest.raises(ValueError, match="fallback reason must be one of"):
        receive.observe_fallback("bad luck")
    text = generate_latest(decode.registry)
    assert value(text, "splitserve_decode_remote_prefills_total") == 3
    assert value(text, "splitserve_kv_transfer_receives_total", status="ok") == 1
    # A pool too short never sent the RPC: a fallback, but no failed transfer.
    assert value(text, "splitserve_kv_transfer_receives_total", status="failed") == 1
    assert value(text, "splitserve_kv_transfer_received_blocks_total") == 4
    assert value(text, "splitserve_kv_transfer_receive_bytes_sum") == 8192
    assert value(text, "splitserve_decode_prefill_fallbacks_total", reason="rpc_failed") == 1
    assert value(text, "splitserve_decode_prefill_fallbacks_total", reason="pool_short") == 1
    assert value(text, "splitserve_decode_prefill_fallbacks_total", reason="transfer_failed") == 0


def test_scrape_serves_the_previous_stats_when_the_engine_is_busy(caplog) -> None:
    answers: list[EngineStats | None] = [stats(num_running=5), None]

    def snapshot() -> EngineStats:
        answer = answers.pop(0)
        if answer is None:
            raise concurrent.futures.TimeoutError()
        return answer

    metrics = NodeMetrics("decode-b", "decode", snapshot)
    assert value(generate_latest(metrics.registry), "splitserve_engine_num_requests_running") == 5
    with caplog.at_level(logging.WARNING):
        text = generate_latest(metrics.registry)
    assert value(text, "splitserve_engine_num_requests_running") == 5
    assert "did not answer in time" in caplog.text


def test_metrics_server_serves_the_node_registry_on_a_free_port() -> None:
    metrics = NodeMetrics("prefill-a", "prefill", stats)
    metrics.engine.observe_step(0.02)
    server = MetricsServer(metrics.registry, "127.0.0.1", 0)
    server.start()
    try:
        url = server.url("10.0.0.1")
        assert url == f"http://127.0.0.1:{server.port}/metrics" and server.port > 0
        text = httpx.get(url, timeout=10).content
        assert value(text, "splitserve_engine_step_duration_seconds_count") == 1
        assert value(text, "splitserve_engine_num_kv_blocks") == 64
        busy = MetricsServer(metrics.registry, "127.0.0.1", server.port)
        with pytest.raises(ValueError, match="pick a free --metrics-port"):
            busy.start()
    finally:
        server.stop()
    wildcard = MetricsServer(metrics.registry, "0.0.0.0", 0)
    wildcard.port = 9
    assert wildcard.url("node-3.example") == "http://node-3.example:9/metrics"


def test_router_exports_the_ttft_breakdown_of_remote_prefills() -> None:
    router = RouterMetrics()
    router.observe_request_metrics(
        pb.RequestMetrics(
            is_prefill_remote=True,
            prefill_queue_time_s=0.003,
            prefill_compute_time_s=0.2,
            push_tail_time_s=0.0004,
            admission_time_s=0.01,
            transfer_time_s=0.25,
            queue_time_s=0.002,
        )
    )
    router.observe_request_metrics(pb.RequestMetrics(is_prefill_fallback=True))
    router.observe_request_metrics(pb.RequestMetrics(queue_time_s=0.03))  # prefilled locally
    text = router.exposition()
    p = "splitserve_router_"
    assert value(text, p + "remote_prefills_total", outcome="remote") == 1
    assert value(text, p + "remote_prefills_total", outcome="fallback") == 1
    assert value(text, p + "prefill_queue_time_seconds_count") == 1
    assert value(text, p + "prefill_compute_time_seconds_sum") == pytest.approx(0.2)
    assert value(text, p + "push_tail_time_seconds_bucket", le="0.0005") == 1
    assert value(text, p + "admission_time_seconds_sum") == pytest.approx(0.01)
    assert value(text, p + "kv_transfer_time_seconds_sum") == pytest.approx(0.25)
    assert value(text, p + "decode_queue_time_seconds_count") == 3
    assert value(text, p + "decode_queue_time_seconds_sum") == pytest.approx(0.032)


def test_pusher_counts_pushes_and_requests_by_result() -> None:
    metrics = NodeMetrics("prefill-a", "prefill", stats)
    agent = ScriptedAgent()
    pusher = PrefillPusher(agent, metrics.require_push())  # type: ignore[arg-type]
    outcomes: list[PushOutcome] = []
    for rid in ("good", "bad"):
        target = PushTarget(PeerName("decode-b"), list(range(10, 14)), 0, outcomes.append)
        pusher.on_admission(rid, target)
        pusher.on_blocks_final(FinalBlocks(rid, [1, 2], 0, False, None, None))
        pusher.on_blocks_final(FinalBlocks(rid, [3, 4], 2, True, 5, None))
    text = generate_latest(metrics.registry)
    assert value(text, "splitserve_kv_transfer_pushes_in_flight") == 4
    assert value(text, "splitserve_kv_transfer_push_bytes_in_flight") == 8000
    for push_id, ok in ((0, True), (1, True), (2, True), (3, False)):
        agent.finish(push_id, ok)
    pusher.poll()
    assert [o.ok for o in outcomes] == [True, False]
    text = generate_latest(metrics.registry)
    k = "splitserve_kv_transfer_"
    assert value(text, k + "pushes_total", status="ok") == 3
    assert value(text, k + "pushes_total", status="failed") == 1
    assert value(text, k + "push_bytes_sum") == 6000
    assert value(text, k + "push_duration_seconds_sum") == pytest.approx(0.009)
    assert value(text, k + "pushes_in_flight") == value(text, k + "push_bytes_in_flight") == 0
    assert value(text, "splitserve_prefill_requests_total", status="ok") == 1
    assert value(text, "splitserve_prefill_requests_total", status="failed") == 1
    assert value(text, "splitserve_prefill_requests_total", status="aborted") == 0


def test_router_exports_its_process_cpu_time() -> None:
    """The router streams every token on one event loop: its CPU seconds say how close it
    is to a full core (the serving benchmark reads them from the scrape's deltas)."""
    router = RouterMetrics()
    before = value(router.exposition(), "splitserve_router_process_cpu_seconds_total")
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = value(router.exposition(), "splitserve_router_process_cpu_seconds_total")
    assert after - before >= 0.2
    assert value(router.exposition(), "splitserve_router_process_resident_memory_bytes") > 0


def test_router_exposes_each_nodes_totals_from_its_stats_as_counters() -> None:
    """The Stats answers of a scrape give per-node counters (the bench diffs them over a
    run: engine steps, so tokens per step); a node that did not answer is left out."""
    from splitserve.node.registry import NodeCapacity, NodeId, NodeRecord

    def record(name: str) -> NodeRecord:
        return NodeRecord(
            node_id=NodeId(name),
            role="decode",
            grpc_address=f"{name}:1",
            nixl_agent_name=name,
            model="m",
            block_size=16,
            capacity=NodeCapacity(num_kv_blocks=100, max_num_seqs=8),
        )

    router = RouterMetrics()
    answered = pb.StatsResponse(
        num_steps=30,
        prompt_tokens_computed=52,
        generation_tokens=17,
        num_preemptions=4,
        extra={
            "prefix_cache_hit_rate": 0.5,
            "prefill_runs_cudnn": 5,
            "prefill_runs_context": 2,
            "forwards_decode": 25,
            "forwards_prefill": 5,
            "forward_device_s_decode": 0.2,
            "forward_device_s_prefill": 0.5,
            "forward_rows_prefill": 9,
            "gc_collections_1": 3,
            "gc_pause_s_1": 0.012,
        },
    )
    router.set_nodes([record("d1"), record("d2")], [answered, None])
    text = router.exposition()
    p = "splitserve_router_node_"
    assert value(text, p + "engine_steps_total", node_id="d1", role="decode") == 30
    assert value(text, p + "prompt_tokens_computed_total", node_id="d1") == 52
    assert value(text, p + "generation_tokens_total", node_id="d1") == 17
    assert value(text, p + "preemptions_total", node_id="d1") == 4
    runs = p + "prefill_attention_runs_total"
    assert value(text, runs, node_id="d1", path="cudnn") == 5
    assert value(text, runs, node_id="d1", path="context") == 2
    assert not [k for k in samples(text) if k[0] == runs and ("path", "flash") in k[1]]
    assert value(text, p + "forwards_total", node_id="d1", kind="decode") == 25
    assert value(text, p + "forwards_total", node_id="d1", kind="prefill") == 5
    assert value(text, p + "forward_device_seconds_total", node_id="d1", kind="prefill") == 0.5
    assert value(text, p + "forward_rows_total", node_id="d1", kind="prefill") == 9
    assert value(text, p + "gc_collections_total", node_id="d1", generation="1") == 3
    assert value(text, p + "gc_pause_seconds_total", node_id="d1", generation="1") == 0.012
    # The pool's size comes from the registry record, answered or not.
    for node in ("d1", "d2"):
        assert value(text, p + "kv_cache_tokens", node_id=node, role="decode") == 1600
    # d2's gauges fall back to its registry load; its totals are unknown, so absent.
    assert not [k for k in samples(text) if ("node_id", "d2") in k[1] and "_total" in k[0]]
    router.set_nodes([record("d1")], [pb.StatsResponse(num_steps=45)])
    assert value(router.exposition(), p + "engine_steps_total", node_id="d1") == 45
