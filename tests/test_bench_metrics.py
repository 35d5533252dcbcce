"""Metric computation on hand-built streams with known answers, statistics, SLOs, sweeps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from splitserve.benchmarks.client import RequestRecord, StreamParser, apply_event
from splitserve.benchmarks.metrics import (
    fill_output_counts,
    latency_summary,
    metric_samples,
    request_metrics,
    throughput_summary,
)
from splitserve.benchmarks.prefix_cache import prefix_cache_summary
from splitserve.benchmarks.server_metrics import diff, parse_prometheus
from splitserve.benchmarks.slo import (
    Slo,
    bootstrap_meets,
    evaluate,
    parse_duration_s,
    parse_slos,
)
from splitserve.benchmarks.stats import (
    estimate_percentile,
    is_tail_supported,
    t_interval,
    wilson_interval,
)
from splitserve.benchmarks.sweep import capacity_section, interpolate_capacity, search_max_rate
from splitserve.benchmarks.tokenizer import WhitespaceTokenizer


def sse(obj: object) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def chat(content: str | None = None, role: str | None = None, finish: str | None = None) -> bytes:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return sse({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def record(send_s: float = 0.0) -> RequestRecord:
    rec = RequestRecord("r0", "s0", 0, max_tokens=5, num_expected_prompt_tokens=10)
    rec.send_s = send_s
    return rec


def feed_all(rec: RequestRecord, reads: list[tuple[float, bytes]], is_chat: bool) -> bool:
    parser = StreamParser(rec, is_chat)
    return any(parser.feed(data, t) for t, data in reads)


CHAT_READS = [
    (1.05, chat(role="assistant", content="")),  # role only: not TTFT
    (1.10, chat(content="")),  # empty chunk
    (1.30, chat(content="Hel")),
    (1.32, chat(content="lo")),
    (1.35, chat(content=" wor")),
    (1.41, chat(content="ld") + chat(content="!", finish="stop")),  # two events, one read
    (1.90, sse({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}})),
    (1.95, b"data: [DONE]\n\n"),
]


def test_chat_stream_with_role_chunk_empty_chunk_and_usage() -> None:
    rec = record(send_s=1.0)
    assert feed_all(rec, CHAT_READS, is_chat=True)
    assert rec.first_event_s == 1.05 and rec.is_success
    assert rec.generated_text == "Hello world!" and rec.finish_reason == "stop"
    assert (rec.num_prompt_tokens, rec.num_output_tokens, rec.output_tokens_source) == (
        12,
        5,
        "usage",
    )
    m = request_metrics(rec)
    assert m is not None
    assert m.ttft_s == pytest.approx(0.30)
    assert m.e2e_s == pytest.approx(0.41)  # last content chunk, not the usage chunk
    assert m.tpot_s == pytest.approx((1.41 - 1.30) / 4)
    assert m.itls_s == pytest.approx((0.02, 0.03, 0.06, 0.0))
    assert m.max_itl_s == pytest.approx(0.06)


def test_completions_stream_split_across_reads_with_comments_and_crlf() -> None:
    body = (
        b": ping\r\n\r\n"
        + b"".join(
            sse({"choices": [{"index": 0, "text": t}]}).replace(b"\n", b"\r\n")
            for t in ("a", "b", "c")
        )
        + b"data: [DONE]\r\n\r\n"
    )
    cuts = [5, 23, 40, 41, 70, len(body)]
    reads, prev = [], 0
    for i, cut in enumerate(cuts):
        reads.append((0.1 * (i + 1), body[prev:cut]))
        prev = cut
    rec = record()
    assert feed_all(rec, reads, is_chat=False)
    events = [t for t, _ in reads]
    assert rec.generated_text == "abc" and len(rec.chunk_times_s) == 3
    assert set(rec.chunk_times_s) <= set(events)
    assert rec.num_output_tokens is None  # no usage: counted later by the tokenizer
    fill_output_counts([rec], WhitespaceTokenizer())
    assert (rec.num_output_tokens, rec.output_tokens_source) == (1, "approx")
    assert request_metrics(rec).tpot_s is None  # type: ignore[union-attr]


def test_error_event_and_role_only_stream_are_failures() -> None:
    rec = record()
    reads = [(0.1, chat(role="assistant")), (0.2, sse({"error": {"message": "boom"}}))]
    assert feed_all(rec, reads, is_chat=True)
    assert rec.error == "stream error: boom" and not rec.is_success
    assert request_metrics(rec) is None
    rec = record()
    assert feed_all(rec, [(0.1, chat(role="assistant")), (0.2, b"data: [DONE]\n\n")], True)
    assert rec.error is None and not rec.is_success  # send_request then marks "no content"


def test_non_streamed_body_gives_ttft_equal_e2e_and_no_tpot() -> None:
    rec = record(send_s=2.0)
    rec.is_streamed = False
    body = {"choices": [{"message": {"content": "hi there"}}], "usage": {"completion_tokens": 2}}
    apply_event(rec, body, 2.5, is_chat=True)
    m = request_metrics(rec)
    assert m is not None and m.ttft_s == m.e2e_s == pytest.approx(0.5)
    assert m.tpot_s is None and m.itls_s == ()


def make_record(
    i: int, send: float, times: list[float], n_out: int, error: str | None = None
) -> RequestRecord:
    rec = record(send)
    rec.request_id = f"r{i}"
    rec.chunk_times_s = list(times)
    rec.num_output_tokens = n_out
    rec.error = error
    return rec


def test_aggregates_pool_itl_and_count_throughput() -> None:
    recs = [
        make_record(0, 0.0, [0.1, 0.2, 0.3], 3),  # ttft 100 ms, tpot 100 ms
        make_record(1, 1.0, [1.2, 1.25], 2),  # ttft 200 ms, tpot 50 ms
        make_record(2, 2.0, [], 0, error="HTTP 500: x"),
    ]
    metrics = [request_metrics(r) for r in recs]
    samples = metric_samples(metrics)
    assert samples["ttft"] == pytest.approx([0.1, 0.2])
    assert samples["itl"] == pytest.approx([0.1, 0.1, 0.05])  # pooled
    assert samples["tpot"] == pytest.approx([0.1, 0.05])
    summary, warnings = latency_summary(samples, (50.0, 99.0), seed=0)
    assert summary["ttft_ms"]["p50"]["value"] == pytest.approx(150.0)  # type: ignore[index]
    assert summary["itl_ms"]["mean"] == pytest.approx(250 / 3)  # type: ignore[index]
    assert "thin tails" in warnings[0]
    thr = throughput_summary(recs, metrics, duration_s=2.0)
    assert thr["request_per_s"] == 1.0 and thr["num_output_tokens"] == 5
    assert thr["output_tokens_per_s"] == 2.5 and thr["num_input_tokens"] == 20


def test_percentile_ci_matches_resampling_bootstrap() -> None:
    rng = np.random.default_rng(0)
    x = rng.lognormal(0.0, 1.0, size=400)
    for q in (50.0, 90.0, 99.0):
        est = estimate_percentile(x, q, np.random.default_rng(1), num_boot=4000)
        assert est is not None and est.value == pytest.approx(np.percentile(x, q))
        boots = [np.percentile(rng.choice(x, size=len(x)), q) for _ in range(2000)]
        low, high = np.quantile(boots, [0.025, 0.975])
        width = high - low
        assert est.ci_low == pytest.approx(low, abs=0.15 * width)
        assert est.ci_high == pytest.approx(high, abs=0.15 * width)
    assert is_tail_supported(1000, 99) and not is_tail_supported(999, 99)
    one = estimate_percentile([3.0], 99, rng)
    assert one is not None and (one.value, one.ci_low, one.ci_high) == (3.0, 3.0, 3.0)
    assert estimate_percentile([], 50, rng) is None


def test_percentile_ci_covers_the_true_quantile() -> None:
    true_p90 = -math.log(0.1)  # exponential(1)
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(200):
        est = estimate_percentile(rng.exponential(1.0, 300), 90, rng, num_boot=500)
        hits += est is not None and est.ci_low <= true_p90 <= est.ci_high
    assert 0.88 <= hits / 200 <= 0.99


def test_parse_slos_and_durations() -> None:
    assert parse_duration_s("500ms") == 0.5 and parse_duration_s("2s") == 2.0
    assert parse_duration_s("800us") == pytest.approx(8e-4) and parse_duration_s("50") == 0.05
    slos = parse_slos("ttft=500ms, tpot:p90=50ms,e2e=1.5s")
    assert slos == (Slo("ttft", 0.5), Slo("tpot", 0.05, 90.0), Slo("e2e", 1.5))
    for bad in ("latency=1s", "ttft", "ttft=fast", "ttft:p0=1s"):
        with pytest.raises(ValueError, match=r"slo|duration|percentile"):
            parse_slos(bad)


def test_goodput_attainment_percentile_checks_and_scale_curve() -> None:
    recs = [
        make_record(0, 0.0, [0.1, 0.2, 0.3], 3),  # ttft 0.1, tpot 0.1, max itl 0.1
        make_record(1, 0.0, [0.4, 0.42], 2),  # ttft 0.4, tpot 0.02
        make_record(2, 0.0, [0.2], 1),  # ttft 0.2, tpot undefined: passes tpot
        make_record(3, 0.0, [], 0, error="timeout after 1 s"),
    ]
    metrics = [request_metrics(r) for r in recs]
    slos = parse_slos("ttft=300ms,tpot=50ms")
    out = evaluate(metrics, slos, duration_s=2.0, target=0.5)
    assert out["num_good"] == 1  # only request 2 (request 0 misses tpot, 1 misses ttft)
    assert out["attainment"] == 0.25 and out["goodput_rps"] == 0.5 and not out["meets"]
    assert out["per_objective_attainment"] == {"ttft<=300ms": 0.5, "tpot<=50ms": 0.5}
    curve = {c["scale"]: c["attainment"] for c in out["scale_curve"]}  # type: ignore[union-attr]
    assert (curve[0.4], curve[1.0], curve[1.6]) == (0.0, 0.25, 0.5)  # 120/300/480 ms TTFT
    loose = evaluate(metrics, parse_slos("ttft=2s,tpot=1s"), 2.0, target=0.75)
    assert loose["attainment"] == 0.75 and loose["meets"]
    dist = evaluate(metrics, parse_slos("ttft:p50=350ms,ttft:p99=1s"), 2.0, 0.5)
    checks = dist["percentile_checks"]
    assert checks[0]["passed"] and checks[0]["value_ms"] == pytest.approx(300.0)  # type: ignore[index]
    assert not checks[1]["passed"] and checks[1]["value_ms"] == math.inf  # type: ignore[index]


def test_prometheus_scrape_diff() -> None:
    before = parse_prometheus(
        '# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{model_name="m"} 100\n'
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 3\n"
        '# TYPE vllm:ttft_seconds histogram\nvllm:ttft_seconds_bucket{le="0.1"} 4\n'
        "vllm:ttft_seconds_sum 1.0\nvllm:ttft_seconds_count 4\n"
    )
    after = parse_prometheus(
        '# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{model_name="m"} 350\n'
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
        '# TYPE vllm:ttft_seconds histogram\nvllm:ttft_seconds_bucket{le="0.1"} 9\n'
        "vllm:ttft_seconds_sum 3.0\nvllm:ttft_seconds_count 14\n"
    )
    out = diff(before, after)
    assert out["deltas"]['vllm:prompt_tokens_total{model_name="m"}'] == 250  # type: ignore[index]
    assert out["gauges_after"] == {"vllm:num_requests_running": 0.0}
    assert out["histogram_means"] == {"vllm:ttft_seconds": pytest.approx(0.2)}
    assert diff(None, after) == {"available": False}


def fake_point(rate: float, capacity: float) -> dict[str, object]:
    att = 1.0 if rate <= capacity else max(0.0, 1.0 - (rate - capacity) / capacity)
    return {"load": rate, "attainment": att, "meets": att >= 0.9}


def test_search_brackets_and_bisects_the_capacity() -> None:
    probed: list[float] = []

    def run_at(rate: float) -> dict[str, object]:
        probed.append(rate)
        return fake_point(rate, capacity=10.0)

    search = search_max_rate(run_at, start_rate=1.0, max_rate=None, tolerance=0.05, max_probes=12)
    assert search.is_converged
    points = search.points
    assert probed[:5] == [1, 2, 4, 8, 16]
    cap = interpolate_capacity(points, target=0.9)
    assert cap["status"] == "found"
    assert 10.0 <= cap["highest_passing"] <= 11.0 < cap["lowest_failing"] <= 11.6
    assert cap["interpolated_rate"] == pytest.approx(11.0, abs=0.6)
    down = search_max_rate(lambda r: fake_point(r, 0.3), 4.0, None, 0.1, 4)
    assert [p["load"] for p in down.points] == [4.0, 2.0, 1.0, 0.5]
    assert not down.is_converged and "no rate met the SLOs" in down.reason
    assert interpolate_capacity(down.points, 0.9)["status"] == "none_pass"
    capped = search_max_rate(lambda r: fake_point(r, 100.0), 1.0, 3.0, 0.1, 10)
    assert [p["load"] for p in capped.points] == [1.0, 2.0, 3.0] and capped.is_converged
    assert interpolate_capacity(capped.points, 0.9)["status"] == "all_pass"
    short = search_max_rate(lambda r: fake_point(r, 10.0), 1.0, None, 0.01, 6)
    assert not short.is_converged and "raise --max-probes" in short.reason


def test_wilson_and_t_intervals() -> None:
    low, high = wilson_interval(9, 10)
    assert low == pytest.approx(0.5958, abs=1e-3) and high == pytest.approx(0.9821, abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(10, 10)[1] == 1.0  # exactly, not 1 - 1e-16 (plots take the gap)
    low, high = t_interval([10.0, 12.0, 14.0])  # type: ignore[misc]
    assert (low + high) / 2 == pytest.approx(12.0)
    assert high - low == pytest.approx(2 * 4.303 * 2.0 / math.sqrt(3), rel=1e-3)
    assert t_interval([5.0]) is None


def test_bootstrap_meets_redoes_attainment_and_percentile_checks() -> None:
    fast = [make_record(i, 0.0, [0.1, 0.2], 2) for i in range(90)]
    slow = [make_record(90 + i, 0.0, [2.0, 2.1], 2) for i in range(10)]
    metrics = [request_metrics(r) for r in fast + slow]
    rng = np.random.default_rng(0)
    att, ok = bootstrap_meets(metrics, parse_slos("ttft=1s"), 0.85, rng, 2000)
    assert att.mean() == pytest.approx(0.9, abs=0.01)
    assert ok.mean() == pytest.approx(0.95, abs=0.03)  # P(Binomial(100, 0.9) >= 85)
    _, ok = bootstrap_meets(metrics, parse_slos("ttft:p95=1s"), 0.5, rng, 2000)
    assert 0.0 < ok.mean() < 0.1  # p95 lands in the slow tenth in nearly every resample


def sweep_point(load: float, achieved: float, att: float, target: float = 0.9) -> dict:
    return {
        "load": load,
        "achieved_rate": achieved,
        "attainment": att,
        "meets": att >= target,
        "repeats": [{"attainment": att, "meets": att >= target, "achieved_rate": achieved}],
    }


def test_capacity_section_intervals_and_achieved_axis() -> None:
    points = [sweep_point(2, 1.8, 1.0), sweep_point(4, 3.6, 0.95), sweep_point(8, 7.2, 0.5)]
    rng = np.random.default_rng(0)
    n = 200
    boots = [
        (rng.binomial(n, p["attainment"], 1000) / n, rng.binomial(n, p["attainment"], 1000) / n)
        for p in points
    ]
    boots = [(att, att >= 0.9) for att, _ in boots]
    cap = capacity_section(points, boots, 0.9, is_rate_axis=True)
    assert cap["status"] == "found"
    assert cap["interpolated_rate"] == pytest.approx(4 + 4 * 0.05 / 0.45)
    low, high = cap["ci95"]
    assert cap["ci95_method"] == "bootstrap" and 2 <= low < cap["interpolated_rate"] < high <= 8
    assert cap["achieved"]["interpolated_rate"] == pytest.approx(0.9 * cap["interpolated_rate"])
    for p in points:  # repeat 1 passes up to 2 req/s, repeat 2 up to 4
        p["repeats"] = [
            {"attainment": a, "meets": a >= 0.9, "achieved_rate": p["achieved_rate"]}
            for a in (1.0 if p["load"] <= top else 0.5 for top in (2, 4))
        ]
    cap = capacity_section(points, boots, 0.9, is_rate_axis=True)
    assert cap["ci95_method"] == "repeats"
    assert cap["per_repeat"] == pytest.approx([2.4, 4.8])  # 0.2 of the way to the failing load
    low, high = cap["ci95"]
    assert (low + high) / 2 == pytest.approx(3.6)
    assert high - low == pytest.approx(2 * 12.706 * 1.2, rel=1e-3)  # std 1.2 x sqrt 2


def test_prefix_cache_fraction_against_the_workload() -> None:
    recs = [make_record(i, 0.0, [0.1, 0.2], 2) for i in range(4)]
    for r in recs:
        r.num_prompt_tokens, r.num_cached_tokens = 100, 90
    section, warnings = prefix_cache_summary(recs, {})
    assert section["source"] == "usage" and section["cached_fraction"] == pytest.approx(0.9)
    assert section["is_above_workload"] and "prefix cache" in warnings[0]
    for r in recs[1:]:
        r.num_shared_prefix_tokens = 96  # a shared system prompt, sent first by recs[0]
        r.num_cached_tokens = 80  # whole 16-token blocks of it
    recs[0].num_cached_tokens = 0
    section, warnings = prefix_cache_summary(recs, {})
    assert section["workload_fraction"] == pytest.approx(0.72) and not warnings
    for r in recs:
        r.num_cached_tokens = None
    deltas = {
        "vllm:prefix_cache_hits_total": 30.0,
        'vllm:prefix_cache_queries_total{model_name="m"}': 400.0,
    }
    section, _ = prefix_cache_summary(recs, {"available": True, "deltas": deltas})
    assert section["source"] == "server_metrics" and section["cached_fraction"] == 0.075
    section, warnings = prefix_cache_summary(recs, {"available": False})
    assert section["cached_fraction"] is None and not warnings
