"""`splitserve up`'s printed example, the router flags it passes through, and the CPU
threads it gives each node."""

from __future__ import annotations

import json
import os
import shlex

from splitserve.launch.cli import _build_parser
from splitserve.launch.local_cluster import ClusterConfig, LocalCluster
from splitserve.launch.up_cmd import EXAMPLE_MAX_TOKENS, example_curl, router_args


def parse_up(*argv: str):
    return _build_parser(["up"]).parse_args(["up", *argv])


def test_example_curl_is_bounded_and_authenticated() -> None:
    words = shlex.split(example_curl("http://127.0.0.1:8000", "tiny-llama", "k3y"))
    body = json.loads(words[words.index("-d") + 1])
    assert body["max_tokens"] == EXAMPLE_MAX_TOKENS and body["model"] == "tiny-llama"
    assert "Authorization: Bearer k3y" in words
    assert "Authorization" not in example_curl("http://h:1", "m", "")


def test_router_flags_pass_through() -> None:
    args = parse_up("--api-key", "k", "--disagg-min-tokens", "64", "--router-arg=--strict-fields")
    assert router_args(args) == (
        "--routing-policy",
        "cache_aware",
        "--api-key",
        "k",
        "--disagg-min-tokens",
        "64",
        "--strict-fields",
    )
    assert router_args(parse_up()) == ("--routing-policy", "cache_aware")


def test_cpu_nodes_share_the_cores() -> None:
    """Every node on the CPU: each takes its share of the cores (torch's default of one
    thread per core in every node oversubscribes them); flags that set it win."""
    cores = len(os.sched_getaffinity(0))

    def node_flags(**config: object) -> list[str]:
        cluster = LocalCluster(ClusterConfig(model="tiny-llama", **config))  # type: ignore[arg-type]
        return cluster._node_process("decode", 0, None).args

    args = node_flags(num_prefill=1, num_decode=1)
    assert args[args.index("--cpu-threads") + 1] == str(max(1, cores // 2))
    args = node_flags(num_prefill=0, num_decode=1)
    assert args[args.index("--cpu-threads") + 1] == str(cores)
    assert node_flags(node_args=("--cpu-threads=3",)).count("--cpu-threads=3") == 1
    assert "--cpu-threads" not in node_flags(node_args=("--cpu-threads=3",))
    assert "--cpu-threads" not in node_flags(devices=("cuda:0", "cuda:1"))
