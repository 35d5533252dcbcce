"""`splitserve up`'s printed example and the router flags it passes through."""

from __future__ import annotations

import json
import shlex

from splitserve.launch.cli import _build_parser
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
