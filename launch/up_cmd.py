"""`splitserve up`: a whole cluster on this host with one command.

Starts a redis-server on a free loopback port (unless --redis is given), N prefill and M
decode nodes (one per GPU when there are GPUs) serving --model (default: the built-in
SmolLM2-135M-Instruct, converted from its GGUF once before any node starts, so that every
process loads the same converted directory), and the router on --port; waits until the
router sees every node, prints the URL and a ready-to-paste curl, optionally sends a demo
request (a question with a known answer), and stops everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from pathlib import Path

import httpx

from splitserve.engine.model.source import (
    DEFAULT_MODEL,
    DUMMY_PREFIX,
    TINY_MODEL,
    default_cache_dir,
    resolve_model_source,
)
from splitserve.launch.local_cluster import ClusterConfig, LocalCluster

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = TINY_MODEL
DEMO_PROMPT = "What is the capital of France?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="HF directory, .gguf file, cached ORG/NAME repo id, built-in name or dummy:<preset> "
        f"(default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--port", type=int, default=8000, help="router HTTP port")
    parser.add_argument("--num-prefill", type=int, default=1)
    parser.add_argument("--num-decode", type=int, default=1)
    parser.add_argument("--redis", default=None, help="use this Redis instead of starting one")
    parser.add_argument("--cluster", default="default")
    parser.add_argument(
        "--routing-policy",
        default="cache_aware",
        choices=("cache_aware", "least_load", "round_robin"),
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with GPUs")
    parser.add_argument("--demo", action="store_true", help="send one chat request when ready")
    parser.add_argument("--once", action="store_true", help="with --demo: stop after it")
    parser.add_argument(
        "--node-arg",
        action="append",
        default=[],
        help="extra flag for every node, e.g. --node-arg=--num-blocks=512",
    )
    parser.add_argument(
        "--router-arg",
        action="append",
        default=[],
        help="extra flag for the router, e.g. --router-arg=--disagg-min-tokens=0",
    )
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)


def tiny_model_dir() -> Path:
    """The built-in tiny model (`--model tiny-llama`), written once into the user's cache."""
    return resolve_model_source(TINY_MODEL, default_cache_dir())


def gpu_devices(args: argparse.Namespace) -> tuple[str, ...]:
    if args.cpu:
        return ()
    import torch

    count = torch.cuda.device_count()
    return tuple(f"cuda:{i}" for i in range(count))


def wait_until_ready(url: str, num_prefill: int, num_decode: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{url}/health", timeout=2).json()
        except (httpx.HTTPError, json.JSONDecodeError):
            body = {}
        if (
            body.get("num_decode_nodes") == num_decode
            and body.get("num_prefill_nodes") == num_prefill
        ):
            return body
        time.sleep(0.3)
    raise RuntimeError(f"the router did not see every node within {timeout_s:.0f} s: {body}")


def demo_request(url: str, model: str) -> str:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": DEMO_PROMPT}],
        "max_tokens": 64,
        "temperature": 0,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=120)
    reply.raise_for_status()
    body = reply.json()
    return body["choices"][0]["message"]["content"]


def resolve_model(model: str) -> str:
    """`model` as a directory every node and the router load; converts a GGUF source once."""
    if model.startswith(DUMMY_PREFIX) or Path(model).expanduser().is_dir():
        return model
    start = time.monotonic()
    print(f"resolving model {model!r}", flush=True)
    model_dir = resolve_model_source(model)
    print(f"model {model!r} ready in {time.monotonic() - start:.1f} s: {model_dir}", flush=True)
    return str(model_dir)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model = resolve_model(args.model)
    # A named model keeps its name in the API; a directory or file is served as given.
    served = args.served_model_name or (args.model if model != args.model else None)
    devices = gpu_devices(args)
    config = ClusterConfig(
        model=model,
        served_model_name=served,
        num_prefill=args.num_prefill,
        num_decode=args.num_decode,
        router_port=args.port,
        redis_url=args.redis,
        cluster=args.cluster,
        node_args=tuple(args.node_arg),
        router_args=("--routing-policy", args.routing_policy, *args.router_arg),
        devices=devices[: args.num_prefill + args.num_decode],
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalCluster(config) as cluster:
        url = cluster.router_url
        wait_until_ready(url, args.num_prefill, args.num_decode, args.ready_timeout_s)
        name = served or model
        where = ", ".join(devices[: args.num_prefill + args.num_decode]) or "CPU"
        example = {"model": name, "messages": [{"role": "user", "content": "Hello!"}]}
        print(
            f"splitserve cluster ready: {args.num_prefill} prefill + {args.num_decode} decode "
            f"node(s) on {where}, model {name!r}, Redis {cluster.redis_url}\n"
            f"  OpenAI API: {url}/v1\n"
            f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{json.dumps(example)}'",
            flush=True,
        )
        if args.demo:
            print(f"demo request: {DEMO_PROMPT!r}\nreply: {demo_request(url, name)!r}", flush=True)
            if args.once:
                return 0
        print("Press Ctrl-C to stop.", flush=True)
        stop.wait()
        print("stopping the cluster", flush=True)
    return 0
