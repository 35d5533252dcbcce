"""Metrics on a running `splitserve up` cluster (Redis, router, one prefill and one decode
node as processes, the tiny llama on CPU): after 50 remote prefills every node's /metrics
agrees with the router's count, and every metric the Grafana dashboard queries exists."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from splitserve.launch.processes import ManagedProcess
from splitserve.node.registry import NodeRegistry

# Real node processes: `-m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

MODEL = "tiny"
NUM_REQUESTS = 50
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "splitserve.json"

Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture(scope="module")
def cluster(tiny_llama, redis_server):
    proc = ManagedProcess.splitserve(
        "up",
        "up",
        *("--model", str(tiny_llama), "--served-model-name", MODEL, "--port", "0", "--cpu"),
        *("--redis", redis_server.url, "--disagg-min-tokens", "32"),
        "--node-arg=--dtype=float32",
        "--node-arg=--num-blocks=256",
        ready_pattern=re.compile(r"OpenAI API: (\S+)/v1"),
    ).start(timeout_s=240)
    client = redis.Redis.from_url(redis_server.url)
    nodes = {n.role: n for n in NodeRegistry(client).list_live_nodes()}
    client.close()
    yield proc.address, nodes
    assert proc.stop(timeout_s=60) == 0


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=30).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    if name not in samples:
        raise AssertionError(f"{name} is not exported")
    return sum(v for ls, v in samples[name] if labels.items() <= ls.items())


def eventually(check: Callable[[], None], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def send_requests(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120)

    def one(k: int) -> None:
        # Distinct from the first block on, and past --disagg-min-tokens: a remote prefill.
        prompt = f"Request {k}: " + " ".join(f"item {k}-{j}" for j in range(30))
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens == 3

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(NUM_REQUESTS)))


def test_node_metrics_agree_with_the_router_after_50_requests(cluster) -> None:
    router_url, nodes = cluster
    prefill, decode = nodes["prefill"], nodes["decode"]
    for node in (prefill, decode):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", node.metrics_url), node
    send_requests(router_url)

    def consistent() -> None:
        router = scrape(f"{router_url}/metrics")
        p, d = scrape(prefill.metrics_url), scrape(decode.metrics_url)
        remote = total(router, "splitserve_router_routing_decisions_total", prefill="remote")
        assert remote == NUM_REQUESTS
        r = "splitserve_router_"
        assert total(router, r + "remote_prefills_total", outcome="remote") == remote
        assert total(router, r + "remote_prefills_total", outcome="fallback") == 0
        for part in ("prefill_queue", "prefill_compute", "push_tail", "admission", "kv_transfer"):
            assert total(router, f"{r}{part}_time_seconds_count") == remote, part
        assert total(router, r + "prefill_compute_time_seconds_sum") > 0
        assert total(router, r + "decode_queue_time_seconds_count") == NUM_REQUESTS
        assert total(router, r + "decode_queue_time_seconds_sum") > 0
        # Decode node: every remote prefill requested, received, none fell back.
        k = "splitserve_kv_transfer_"
        assert total(d, "splitserve_decode_remote_prefills_total") == remote
        assert total(d, k + "receives_total", status="ok") == remote
        assert total(d, k + "receives_total", status="failed") == 0
        assert total(d, "splitserve_decode_prefill_fallbacks_total") == 0
        assert total(d, k + "receive_bytes_count") == remote
        assert total(d, k + "receive_duration_seconds_count") == remote
        assert total(d, k + "received_blocks_total") >= remote * 5  # 5+ blocks per prompt
        assert total(d, k + "receives_in_flight") == 0
        # Prefill node: every remote prefill served, its pushes delivered what decode got.
        assert total(p, "splitserve_prefill_requests_total", status="ok") == remote
        assert total(p, "splitserve_prefill_requests_total", status="failed") == 0
        pushes = total(p, k + "pushes_total", status="ok")
        assert pushes >= remote and total(p, k + "pushes_total", status="failed") == 0
        assert total(p, k + "push_bytes_count") == pushes
        assert total(p, k + "push_duration_seconds_count") == pushes
        assert total(p, k + "push_bytes_sum") == total(d, k + "receive_bytes_sum") > 0
        assert total(p, k + "pushes_in_flight") == total(p, k + "push_bytes_in_flight") == 0
        # Engines: both stepped, the prefill node looked its prompts up in its cache.
        for node, samples in ((prefill, p), (decode, d)):
            labels = {"node_id": node.node_id, "role": node.role}
            assert total(samples, "splitserve_engine_step_duration_seconds_count", **labels) > 0
            assert total(samples, "splitserve_engine_num_requests_running", **labels) == 0
        assert total(p, "splitserve_engine_prefix_cache_queries_total") >= remote * 80
        assert total(d, "splitserve_engine_generation_tokens_total") > 0

    eventually(consistent)


# PromQL: what is not a metric name.
_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "clamp_min", "clamp_max", "abs", "topk", "bottomk", "sum_over_time", "avg_over_time",
}  # fmt: skip
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and"}
_KEYWORDS |= {"or", "unless", "offset"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects; raises ValueError on what it cannot read."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    for left, right in ("()", "{}", "[]"):
        if text.count(left) != text.count(right):
            raise ValueError(f"unbalanced {left}{right} in {expr!r}")
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges: [5m], [$__rate_interval]
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = _GROUPING.sub("", text)
    if re.search(r"[^\w\s().,+\-*/^<>=!:]", text):
        raise ValueError(f"unexpected characters in {expr!r}")
    names = set()
    # Numbers and durations (0.99, 1e3, 5m) first, so that their units are not names.
    for match in re.finditer(r"(\d[\w.+]*)|[A-Za-z_:][\w:]*(\s*\()?", text):
        word, is_call = match.group(0).rstrip("( \t"), match.group(2) is not None
        if match.group(1):
            continue
        if is_call:
            if word not in _FUNCTIONS:
                raise ValueError(f"unknown function {word!r} in {expr!r}")
        elif word not in _KEYWORDS:
            names.add(word)
    return names


def test_promql_reader() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, role) (rate(a_seconds_bucket{role="x(y"}'
        "[$__rate_interval]))) / on (role) group_left sum(b_total offset 5m)"
    )
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total"}
    with pytest.raises(ValueError, match="unknown function"):
        promql_metric_names("ratee(x[5m])")
    with pytest.raises(ValueError, match="unbalanced"):
        promql_metric_names("sum(rate(x[5m])")


def test_every_dashboard_metric_exists_on_the_cluster(cluster) -> None:
    router_url, nodes = cluster
    exported: set[str] = set(scrape(f"{router_url}/metrics"))
    for node in nodes.values():
        exported |= set(scrape(node.metrics_url))
    dashboard = json.loads(DASHBOARD.read_text())
    queried: set[str] = set()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            queried |= names
    assert all(name.startswith("splitserve_") for name in queried), queried
    assert not queried - exported, f"queried but not exported: {sorted(queried - exported)}"
    # The dashboard covers TTFT/TPOT, throughput, queues, KV usage, transfers, fallbacks.
    for needed in (
        "splitserve_router_time_to_first_token_seconds_bucket",
        "splitserve_router_inter_token_latency_seconds_bucket",
        "splitserve_router_generation_tokens_total",
        "splitserve_engine_num_requests_waiting",
        "splitserve_engine_kv_usage",
        "splitserve_engine_step_duration_seconds_bucket",
        "splitserve_kv_transfer_push_duration_seconds_bucket",
        "splitserve_kv_transfer_push_bytes_sum",
        "splitserve_kv_transfer_pushes_total",
        "splitserve_decode_prefill_fallbacks_total",
    ):
        assert needed in queried, needed
