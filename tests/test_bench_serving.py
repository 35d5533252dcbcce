"""benchmarks/serving.py against a real `splitserve up` (tiny llama on CPU): rows with every
field, per-request files compressed beside them, rows merged across calls, rates that would
not fit the deadline left out; and the parts that decide what runs."""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from splitserve.benchmarks import serving, serving_report
from splitserve.launch.processes import ManagedProcess

pytestmark = pytest.mark.slow  # starts `splitserve up` and the serving benchmark


@pytest.fixture(scope="module")
def up(tiny_llama):
    proc = ManagedProcess.splitserve(
        "up", "up", "--model", str(tiny_llama), "--served-model-name", "tiny",
        "--num-prefill", "0", "--num-decode", "1", "--port", "0", "--cpu",
        "--node-arg=--dtype=float32", "--node-arg=--no-prefix-caching",
        "--router-arg=--trace-stream-timing",
        ready_pattern=re.compile(r"OpenAI API: (\S+)/v1"),
    ).start(timeout_s=240)  # fmt: skip
    yield proc.address
    assert proc.stop(timeout_s=60) == 0


def _serve(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "splitserve.benchmarks.serving", "--cpu", *args]
    command += ["--workloads", "32x4", "--num-requests", "6", "--out-dir", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)


def test_two_calls_merge_into_one_summary(up, tmp_path: Path) -> None:
    _serve(tmp_path, "--system", "one", "--url", up, "--rates", "4,8")
    _serve(tmp_path, "--system", "two", "--url", up, "--rates", "4,1000", "--warm-server")
    rows = json.loads((tmp_path / "summary.json").read_text())
    points = [(r["system"], r["rate"]) for r in rows]
    assert points == [("one", 4), ("one", 8), ("two", 4), ("two", 1000)]
    assert [r["is_first_after_start"] for r in rows] == [True, False, False, False]
    for row in rows:
        assert set(serving_report.ROW_KEYS) <= set(row)
        assert row["num_requests"] == 6 and row["num_failed"] == 0
        assert row["cached_prompt_fraction"] == 0.0
        # TPOT may be 0: on a starved CPU a request's 4 tokens can reach the client in one
        # coalesced SSE frame, so its first and last token arrive together.
        assert row["ttft_p50_ms"] > 0 and row["tpot_p50_ms"] >= 0 and row["output_tok_s"] > 0
        assert row["commit"] and row["device"] and row["date"] and "bench run" in row["command"]
        assert set(row["stream_stage_mean_ms"]) == {"engine_step", "node", "grpc", "router"}
        # The node's own counters, through the router: at least the prompts' and tokens'
        # steps, each carrying at least one token.
        assert row["engine_steps"] >= 4 and row["tokens_per_step"] >= 1
        name = serving_report.run_name(row["system"], row["workload"], row["rate"])
        with gzip.open(tmp_path / "runs" / name / "requests.jsonl.gz", "rt") as f:
            archived = [json.loads(line) for line in f.read().splitlines()]
        assert len(archived) == 6
        for record in archived:
            assert "chunk_times_s" not in record and "generated_text" not in record
            assert record["chunk_gaps_us"] and record["generated_text_chars"] >= 0
            gaps = record["chunk_gaps_us"]
            assert min(gaps) >= 0 and gaps[0] / 1e6 >= record["first_event_s"] - 1e-6
            assert sum(gaps) / 1e6 <= record["last_event_s"] + 1e-6
    table = (tmp_path / "summary.md").read_text()
    assert "one TTFT p50 / p90 / p99 ms" in table and "two TPOT p50 / p90 ms" in table
    assert table.count("not run") == 6  # one@1000 and two@8, three cells each
    assert "- one: engine steps over each run (tokens a step): 4 req/s " in table


def test_a_rate_that_cannot_fit_the_deadline_is_left_out(up, tmp_path: Path) -> None:
    done = _serve(
        tmp_path, "--system", "one", "--url", up, "--rates", "8,0.01", "--deadline-s", "120"
    )
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["rate"] for r in rows] == [8]
    assert "left out for --deadline-s 120: 32x4@0.01" in done.stdout


def _args(**kw: object) -> argparse.Namespace:
    args = serving.build_parser().parse_args(["--system", "s", "--out-dir", "x"])
    for key, value in kw.items():
        setattr(args, key, value)
    return args


def test_up_command_turns_prefix_caching_off_and_traces_streams() -> None:
    command = serving.up_command(_args(model="dummy:llama-3.1-8b", node_arg=["--dtype=bfloat16"]))
    assert command[:7] == ["up", "--num-prefill", "0", "--num-decode", "1", "--port", "0"]
    assert "--node-arg=--no-prefix-caching" in command
    assert "--router-arg=--trace-stream-timing" in command
    assert "--node-arg=--dtype=bfloat16" in command


def test_seeds_are_fresh_per_rate_and_shared_between_systems() -> None:
    w = serving.Workload(1024, 256)
    seeds = {serving.rate_seed(0, w, r) for r in (2, 4, 8, 16, 24, 32)}
    assert len(seeds) == 6
    assert serving.rate_seed(0, w, 8) != serving.rate_seed(0, serving.Workload(4096, 256), 8)
    assert serving.num_requests(_args(seconds_per_rate=30.0, num_requests=50), 2) == 60
    assert serving.num_requests(_args(seconds_per_rate=30.0, num_requests=50), 1) == 50


def test_capacity_reads_the_highest_rate_meeting_both_p90s() -> None:
    rows = [
        {"rate": 2, "ttft_p90_ms": 100.0, "tpot_p90_ms": 10.0},
        {"rate": 8, "ttft_p90_ms": 900.0, "tpot_p90_ms": 49.0},
        {"rate": 16, "ttft_p90_ms": 2000.0, "tpot_p90_ms": 30.0},
    ]
    assert serving_report.capacity(rows, 1000.0, 50.0) == 8
    assert serving_report.capacity(rows[2:], 1000.0, 50.0) is None


def test_bad_workloads_and_rates_are_one_line_errors() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"e\.g\. 1024x256"):
        serving.parse_workloads("1024-256")
    with pytest.raises(argparse.ArgumentTypeError, match="positive"):
        serving.parse_rates("2,0")


def test_gpu_script_dry_run_on_the_cpu(tmp_path: Path) -> None:
    """scripts/gpu_serving.sh's splitserve call end to end, on the CPU with the tiny model:
    what a device call runs, up to the archive it brings back."""
    root = Path(serving.__file__).resolve().parents[1]
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "CPU_DRY_RUN": "1",
        "NO_WHEELS": "1",
        "PKG": str(tmp_path / "pkg"),
        "PYTHON": sys.executable,
        "WORKLOADS": "32x4",
        "RATES": "4",
        "MIN_REQUESTS": "6",
        "SECONDS_PER_RATE": "1",
        "RESULTS": str(tmp_path / "serving_cpu"),
        "OUT": str(out),
        "SPLITSERVE_GIT_COMMIT": "0123abc",
        "THREAD_CPU": "1",
        "THREAD_CPU_INTERVAL_S": "1",
        # A variant of the node, named apart from the default's runs.
        "SYSTEM_NAME": "splitserve-b",
        "NODE_ARGS": "--node-arg=--short-rest-rows=8",
    }
    done = subprocess.run(
        ["bash", "scripts/gpu_serving.sh", "splitserve"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "serving_cpu" / "summary.json").read_text())
    assert [(r["system"], r["workload"], r["rate"]) for r in rows] == [("splitserve-b", "32x4", 4)]
    assert rows[0]["commit"] == "0123abc" and rows[0]["is_first_after_start"]
    assert "--no-prefix-caching" in rows[0]["server"]
    assert "--node-arg=--short-rest-rows=8" in rows[0]["server"]
    # Named after the results folder, so that runs with other RESULTS in one call keep apart.
    with tarfile.open(out / "serving_cpu.tgz") as tar:
        names = tar.getnames()
    assert "serving_cpu/summary.json" in names and (out / "serving_cpu.summary.md").exists()
    # THREAD_CPU=1: the router's and the node's threads sampled beside the bench.
    assert "serving_cpu/threads/splitserve-b.jsonl" in names
    samples = (tmp_path / "serving_cpu" / "threads" / "splitserve-b.jsonl").read_text()
    roles = {json.loads(line)["role"] for line in samples.splitlines()}
    assert {"router", "decode"} <= roles, roles


def test_pairs_script_refuses_one_name_for_two_systems() -> None:
    root = Path(serving.__file__).resolve().parents[1]
    env = {**os.environ, "SYSTEM_NAME": "splitserve-b", "PAIRS": "1024x256:2"}
    done = subprocess.run(
        ["bash", "scripts/gpu_serving_pairs.sh"], cwd=root, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "set SYSTEMS to one system" in done.stderr


def test_merge_command_joins_calls_unpacked_apart(tmp_path: Path) -> None:
    def row(system: str, rate: float, ttft: float) -> dict[str, object]:
        keys = dict.fromkeys(serving_report.ROW_KEYS, 1.0)
        return {**keys, "system": system, "workload": "1024x256", "rate": rate, "ttft_p90_ms": ttft}

    for name, rows in (("a", [row("splitserve", 2, 10.0)]), ("b", [row("vllm", 2, 20.0)])):
        (tmp_path / name / "runs" / name).mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps(rows))
    out = tmp_path / "merged"
    assert serving_report.main(["merge", str(out), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    merged = json.loads((out / "summary.json").read_text())
    assert [r["system"] for r in merged] == ["splitserve", "vllm"]
    assert (out / "runs" / "a").is_dir() and (out / "runs" / "b").is_dir()
    assert "vllm TTFT p50 / p90 / p99 ms" in (out / "summary.md").read_text()
    with pytest.raises(SystemExit):
        serving_report.main(["merge", str(out), str(tmp_path / "missing")])


def test_an_archived_request_keeps_its_chunk_times_to_the_microsecond() -> None:
    record = {
        "request_id": "r1",
        "first_event_s": 0.0123456789,
        "chunk_times_s": [0.0123456789, 0.0201, 0.0201004, 0.5],
        "generated_text": "four tokens here",
        "ttft_ms": 12.3,
    }
    archived = serving_report.archived_request(record)
    assert archived == {
        "request_id": "r1",
        "first_event_s": 0.0123456789,
        "chunk_gaps_us": [12346, 7754, 0, 479900],
        "generated_text_chars": 16,
        "ttft_ms": 12.3,
    }
    times = itertools.accumulate(archived["chunk_gaps_us"])
    for rebuilt, original in zip(times, record["chunk_times_s"], strict=True):
        assert abs(rebuilt / 1e6 - original) <= 0.5e-6


def test_engine_steps_read_either_servers_counters() -> None:
    vllm = {"server_metrics": {"deltas": {
        'vllm:iteration_tokens_total_count{engine="0"}': 1876.0,
        'vllm:iteration_tokens_total_sum{engine="0"}': 1305600.0,
        "vllm:num_preemptions_total": 0.0,
    }}}  # fmt: skip
    assert serving_report.engine_steps(vllm) == (1876.0, 1305600.0 / 1876.0)
    p = "splitserve_router_node_"
    ours = {"server_metrics": {"deltas": {
        p + 'engine_steps_total{node_id="a",role="decode"}': 100.0,
        p + 'engine_steps_total{node_id="b",role="decode"}': 50.0,
        p + 'prompt_tokens_computed_total{node_id="a",role="decode"}': 2048.0,
        p + 'generation_tokens_total{node_id="a",role="decode"}': 352.0,
        p + 'generation_tokens_total{node_id="b",role="decode"}': 600.0,
    }}}  # fmt: skip
    assert serving_report.engine_steps(ours) == (150.0, 3000.0 / 150.0)
    assert serving_report.engine_steps({"server_metrics": {"available": False}}) is None
    assert serving_report.engine_steps({}) is None


def test_prefill_attention_runs_add_up_every_nodes_paths() -> None:
    key = "splitserve_router_node_prefill_attention_runs_total"
    summary = {"server_metrics": {"deltas": {
        key + '{node_id="a",role="decode",path="cudnn"}': 30.0,
        key + '{node_id="b",role="decode",path="cudnn"}': 12.0,
        key + '{node_id="a",role="decode",path="context"}': 7.0,
        'vllm:num_preemptions_total{engine="0"}': 1.0,
    }}}  # fmt: skip
    assert serving_report.prefill_attention_runs(summary) == {"cudnn": 42.0, "context": 7.0}
    assert serving_report.prefill_attention_runs({}) == {}


def test_forward_passes_give_mean_device_time_and_the_devices_busy_share() -> None:
    p = "splitserve_router_node_"
    node = '{node_id="a",role="decode",kind="%s"}'
    summary = {"server_metrics": {"interval_s": 10.0, "deltas": {
        p + "forwards_total" + node % "decode": 400.0,
        p + "forwards_total" + node % "prefill": 50.0,
        p + "forward_device_seconds_total" + node % "decode": 3.2,
        p + "forward_device_seconds_total" + node % "prefill": 5.0,
        p + "forward_rows_total" + node % "decode": 4_800.0,
        p + "forward_rows_total" + node % "prefill": 100.0,
    }}}  # fmt: skip
    out = serving_report.forward_passes(summary)
    assert out["forwards"]["decode"] == {"num": 400.0, "mean_device_ms": 8.0, "mean_rows": 12.0}
    assert out["forwards"]["prefill"]["mean_device_ms"] == pytest.approx(100.0)
    assert out["device_busy"] == pytest.approx(0.82)
    assert serving_report.forward_passes({}) == {}
    del summary["server_metrics"]["interval_s"]
    assert "device_busy" not in serving_report.forward_passes(summary)


def test_node_gc_pauses_add_up_every_nodes_generations() -> None:
    p = "splitserve_router_node_"
    summary = {"server_metrics": {"deltas": {
        p + 'gc_collections_total{node_id="a",role="decode",generation="0"}': 30.0,
        p + 'gc_collections_total{node_id="b",role="decode",generation="0"}': 10.0,
        p + 'gc_pause_seconds_total{node_id="a",role="decode",generation="0"}': 0.03,
        p + 'gc_pause_seconds_total{node_id="b",role="decode",generation="0"}': 0.01,
        p + 'gc_collections_total{node_id="a",role="decode",generation="2"}': 1.0,
        p + 'gc_pause_seconds_total{node_id="a",role="decode",generation="2"}': 0.1,
    }}}  # fmt: skip
    pauses = serving_report.node_gc_pauses(summary)
    assert pauses["gen0"]["num"] == 40 and pauses["gen0"]["total_ms"] == pytest.approx(40.0)
    assert pauses["gen2"] == {"num": 1.0, "total_ms": pytest.approx(100.0)}
    assert serving_report.node_gc_pauses({}) == {}


def test_server_metrics_keep_the_time_between_their_scrapes() -> None:
    from splitserve.benchmarks import server_metrics

    before = {"x_total": ("counter", 1.0)}
    after = {"x_total": ("counter", 4.0)}
    out = server_metrics.diff(before, after, 12.5)
    assert out["deltas"] == {"x_total": 3.0} and out["interval_s"] == 12.5
    assert "interval_s" not in server_metrics.diff(before, after)


def test_kv_pool_and_preemptions_read_either_servers_metrics() -> None:
    info = (
        'vllm:cache_config_info{block_size="16",gpu_memory_utilization="0.92",'
        'kv_cache_size_tokens="462944",num_gpu_blocks="28934"}'
    )
    vllm = {"server_metrics": {
        "deltas": {'vllm:num_preemptions_total{engine="0"}': 37.0},
        "gauges_after": {info: 1.0, 'vllm:num_requests_running{engine="0"}': 0.0},
    }}  # fmt: skip
    assert serving_report.kv_pool(vllm) == {"preemptions": 37.0, "kv_cache_tokens": 462944.0}
    p = "splitserve_router_node_"
    ours = {"server_metrics": {
        "deltas": {
            p + 'preemptions_total{node_id="a",role="decode"}': 19.0,
            p + 'preemptions_total{node_id="b",role="prefill"}': 2.0,
        },
        "gauges_after": {
            p + 'kv_cache_tokens{node_id="a",role="decode"}': 450000.0,
            p + 'kv_cache_tokens{node_id="b",role="prefill"}': 90000.0,
        },
    }}  # fmt: skip
    # Preemptions of every node; the pool of the decode nodes, which hold the decoding KV.
    assert serving_report.kv_pool(ours) == {"preemptions": 21.0, "kv_cache_tokens": 450000.0}
    assert serving_report.kv_pool({"server_metrics": {"available": False}}) == {}
    rows = [
        {"system": "vllm", "rate": 6.0, "preemptions": 4.0, "kv_cache_tokens": 462944.0},
        {"system": "vllm", "rate": 4.0, "preemptions": 0.0, "kv_cache_tokens": 462944.0},
        {"system": "splitserve", "rate": 4.0},
    ]
    assert serving_report._pool_line("vllm", rows) == (
        "- vllm: preemptions over each run: 4 req/s 0, 6 req/s 4; KV pool 462,944 tokens"
    )
    assert serving_report._pool_line("splitserve", rows) is None
