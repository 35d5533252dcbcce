"""`splitserve up`: a whole cluster on this host with one command.

Starts a redis-server on a free loopback port (unless --redis is given), N prefill and M
decode nodes (one per GPU when there are GPUs) serving --model (default: the built-in
SmolLM2-135M-Instruct, converted from its GGUF once before any node starts, so that every
process loads the same converted directory), and the router on --port; waits until the
router sees every node, prints the URL and a ready-to-paste curl, optionally sends a demo
request (a question with a known answer), then supervises: a child that dies is reported
with its last log lines and restarted (--no-restart: the cluster stops). SIGINT, SIGTERM
and SIGHUP (the terminal closing) stop every child in order; the children run in their own
process groups with a parent-death signal, so even a SIGKILL of `up` leaves nothing behind
(launch/processes.py).

Every process binds --host (loopback by default). `--tls self-signed` writes a fresh CA,
certificates and a random cluster token (launch/certs.py) into a temporary directory (or
--tls-dir) before anything starts: the router then serves HTTPS, router and nodes speak
mTLS gRPC with the token, and the readiness check, the printed curl and the demo trust
that CA (docs/operations.md#security).

Settings: `up` reads its own flags, SPLITSERVE_* variables and --config file like every
command; the keys among them that are node or router flags (max-num-seqs, num-blocks,
stream-idle-timeout-s, ...) and its --log-level/--log-format are passed to the children as
flags, and the children do not inherit the SPLITSERVE_* variables (launch/child_settings.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import ssl
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from splitserve.engine.model.source import (
    DEFAULT_MODEL,
    DUMMY_PREFIX,
    TINY_MODEL,
    default_cache_dir,
    resolve_model_source,
)
from splitserve.engine.model.writers import model_writers
from splitserve.launch.child_settings import child_settings
from splitserve.launch.config_sources import Resolved
from splitserve.launch.local_cluster import ChildFailed, ClusterConfig, LocalCluster
from splitserve.launch.tracing_args import add_tracing_argument

if TYPE_CHECKING:  # cryptography is imported only with --tls self-signed
    from splitserve.launch.certs import ClusterCredentials

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = TINY_MODEL
DEMO_PROMPT = "What is the capital of France?"
EXAMPLE_MAX_TOKENS = 64
SUPERVISE_INTERVAL_S = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TLS_MODES = ("off", "self-signed")
WILDCARDS = ("0.0.0.0", "::", "")
# launch/cli.py passes `run` the resolved settings too (what came from where).
TAKES_SETTINGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="HF directory, .gguf file, cached ORG/NAME repo id, built-in name or dummy:<preset> "
        f"(default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="name the API serves the model as"
    )
    parser.add_argument("--port", type=int, default=8000, help="router HTTP port")

    parser.add_argument("--num-prefill", type=int, default=1, help="prefill nodes to start")
    parser.add_argument("--num-decode", type=int, default=1, help="decode nodes to start")
    parser.add_argument("--redis", default=None, help="use this Redis instead of starting one")
    parser.add_argument("--cluster", default="default", help="cluster name (Redis key prefix)")
    parser.add_argument(
        "--routing-policy",
        default="cache_aware",
        choices=("cache_aware", "least_load", "round_robin"),
        help="router: how nodes are chosen per prompt",
    )
    parser.add_argument(
        "--api-key", default="", help="router: require 'Authorization: Bearer <key>'"
    )
    parser.add_argument(
        "--disagg-min-tokens",
        type=int,
        default=None,
        help="router: uncached prompt tokens below which the decode node prefills itself",
    )
    parser.add_argument(
        "--router-arg",
        action="append",
        default=[],
        help="extra flag for the router, e.g. --router-arg=--strict-fields",
    )
    add_tracing_argument(parser)
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
        "--ready-timeout-s",
        type=float,
        default=300.0,
        help="how long the router may take to see every node",
    )
    parser.add_argument(
        "--no-restart",
        action="store_true",
        help="stop the whole cluster when a child dies instead of restarting it",
    )
    _add_security_arguments(parser)


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the router and the nodes bind (default loopback: this host only)",
    )
    parser.add_argument(
        "--tls",
        default="off",
        choices=TLS_MODES,
        help="self-signed: generate a local CA and certificates, serve HTTPS, run gRPC over "
        "mTLS with a random cluster token; off: plain HTTP and gRPC",
    )
    parser.add_argument(
        "--tls-dir",
        default=None,
        help="with --tls self-signed: write the credentials here (kept) instead of a "
        "temporary directory (removed at exit)",
    )


def router_args(args: argparse.Namespace) -> tuple[str, ...]:
    out = ["--routing-policy", args.routing_policy]
    if args.api_key:
        out += ["--api-key", args.api_key]
    if args.disagg_min_tokens is not None:
        out += ["--disagg-min-tokens", str(args.disagg_min_tokens)]
    return (*out, *args.router_arg)


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """ValueError (a one-line message) when the router's port is taken."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(
                f"port {port} on {host} is in use ({exc.strerror}): pass --port with a free "
                "one, or stop what listens there"
            ) from None


def tiny_model_dir() -> Path:
    """The built-in tiny model (`--model tiny-llama`), written once into the user's cache."""
    return resolve_model_source(TINY_MODEL, default_cache_dir(), model_writers())


def gpu_devices(args: argparse.Namespace) -> tuple[str, ...]:
    if args.cpu:
        return ()
    import torch

    count = torch.cuda.device_count()
    return tuple(f"cuda:{i}" for i in range(count))


def wait_until_ready(
    url: str,
    num_prefill: int,
    num_decode: int,
    timeout_s: float,
    stop: threading.Event | None = None,
    verify: ssl.SSLContext | bool = True,
) -> dict:
    """The router's /health once it sees every node; early (as it is) when `stop` is set."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline and not stop.is_set():
        try:
            body = httpx.get(f"{url}/health", timeout=2, verify=verify).json()
        except (httpx.HTTPError, json.JSONDecodeError):
            body = {}
        if (
            body.get("num_decode_nodes") == num_decode
            and body.get("num_prefill_nodes") == num_prefill
        ):
            return body
        time.sleep(0.3)
    if stop.is_set():
        return body
    raise RuntimeError(f"the router did not see every node within {timeout_s:.0f} s: {body}")


def demo_request(url: str, model: str, api_key: str, verify: ssl.SSLContext | bool = True) -> str:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": DEMO_PROMPT}],
        "max_tokens": 64,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reply = httpx.post(
        f"{url}/v1/chat/completions", json=payload, headers=headers, timeout=120, verify=verify
    )
    reply.raise_for_status()
    body = reply.json()
    return body["choices"][0]["message"]["content"]


def example_curl(url: str, model: str, api_key: str, ca_certs: str = "") -> str:
    """The ready-to-paste request `up` prints (bounded: max_tokens)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": EXAMPLE_MAX_TOKENS,
    }
    auth = f" -H {shlex.quote('Authorization: Bearer ' + api_key)}" if api_key else ""
    cacert = f" --cacert {shlex.quote(ca_certs)}" if ca_certs else ""
    return (
        f"curl{cacert} {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(json.dumps(body))}"
    )


def supervise(cluster: LocalCluster, stop: threading.Event, restart: bool) -> int:
    """Until a stop signal: report dead children and restart them (or stop: exit code 1)."""
    while not stop.wait(SUPERVISE_INTERVAL_S):
        if restart:
            for death in cluster.restart_dead():
                print(f"{death.name} died (exit code {death.returncode}): restarted", flush=True)
            continue
        dead = cluster.dead_children()
        if dead:
            for death in dead:
                print(
                    f"{death.name} died (exit code {death.returncode}); its last lines:\n"
                    f"{death.tail}",
                    flush=True,
                )
            return 1
    return 0


def resolve_served_model(model: str, served_model_name: str | None) -> tuple[str, str | None]:
    """(the directory to load, the name to serve it under). A named model keeps its name in
    the API; a directory or file is served as given (None: its path)."""
    resolved = resolve_model(model)
    return resolved, served_model_name or (model if resolved != model else None)


def resolve_model(model: str) -> str:
    """`model` as a directory every node and the router load; converts a GGUF source once."""
    if model.startswith(DUMMY_PREFIX) or Path(model).expanduser().is_dir():
        return model
    start = time.monotonic()
    print(f"resolving model {model!r}", flush=True)
    model_dir = resolve_model_source(model, writers=model_writers())
    print(f"model {model!r} ready in {time.monotonic() - start:.1f} s: {model_dir}", flush=True)
    return str(model_dir)


def tls_credentials(args: argparse.Namespace, stack: ExitStack) -> ClusterCredentials | None:
    """With --tls self-signed: fresh credentials in --tls-dir (or a temporary directory,
    removed when `stack` closes); None with --tls off."""
    if args.tls == "off":
        if args.tls_dir:
            raise ValueError("--tls-dir needs --tls self-signed")
        return None
    from splitserve.launch.certs import DEFAULT_HOSTS, write_self_signed

    if args.tls_dir:
        directory = Path(args.tls_dir).expanduser()
    else:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="splitserve-")))
    hosts = [*DEFAULT_HOSTS, *([] if args.host in (*DEFAULT_HOSTS, *WILDCARDS) else [args.host])]
    if args.host in WILDCARDS:
        hosts.append(socket.gethostname())
    credentials = write_self_signed(directory, hosts)
    print(f"TLS credentials (CA, certificates, cluster token) in {directory}", flush=True)
    return credentials


def cluster_config(
    args: argparse.Namespace,
    model: str,
    served: str | None,
    tls: ClusterCredentials | None,
    resolved: Resolved | None,
) -> ClusterConfig:
    """The cluster `up` starts: its flags, and the node and router settings it forwards."""
    from splitserve.launch.cli import command_actions

    devices = gpu_devices(args)
    forwarded = child_settings(resolved, command_actions, os.environ) if resolved else None
    return ClusterConfig(
        model=model,
        served_model_name=served,
        num_prefill=args.num_prefill,
        num_decode=args.num_decode,
        router_port=args.port,
        redis_url=args.redis,
        cluster=args.cluster,
        host=args.host,
        tls=tls,
        node_args=(*(forwarded.node_args if forwarded else ()), *args.node_arg),
        router_args=(*(forwarded.router_args if forwarded else ()), *router_args(args)),
        drop_env=forwarded.drop_env if forwarded else (),
        devices=devices[: args.num_prefill + args.num_decode],
        otlp_traces_endpoint=args.otlp_traces_endpoint,
    )


def run(args: argparse.Namespace, resolved: Resolved | None = None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    check_port_free(args.port, args.host)
    model, served = resolve_served_model(args.model, args.served_model_name)
    stop = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    with ExitStack() as stack:
        tls = tls_credentials(args, stack)
        config = cluster_config(args, model, served, tls, resolved)
        cluster = stack.enter_context(LocalCluster(config))
        return serve(cluster, args, served or model, stop)
    raise RuntimeError("unreachable: the cluster's context returned")


def metrics_urls(cluster: LocalCluster) -> str:
    """Every /metrics of the cluster: the router's, then each node's."""
    nodes = [*cluster.prefill, *cluster.decode]
    urls = [f"router {cluster.router_url}/metrics"]
    urls += [f"{n.process.name} {n.metrics_url}" for n in nodes if n.metrics_url]
    return ", ".join(urls)


def serve(cluster: LocalCluster, args: argparse.Namespace, name: str, stop: threading.Event) -> int:
    """Wait for every node, print how to reach the cluster, run the demo, supervise."""
    cfg = cluster.config
    url = cluster.router_url
    ca = str(cfg.tls.ca_certs) if cfg.tls is not None else ""
    verify = ssl.create_default_context(cafile=ca) if ca else True
    wait_until_ready(url, args.num_prefill, args.num_decode, args.ready_timeout_s, stop, verify)
    where = ", ".join(cfg.devices) or "CPU"
    print(
        f"splitserve cluster ready: {args.num_prefill} prefill + {args.num_decode} decode "
        f"node(s) on {where}, model {name!r}, Redis {cluster.redis_url}\n"
        f"  metrics: {metrics_urls(cluster)}\n"
        f"  OpenAI API: {url}/v1\n"
        f"  try: {example_curl(url, name, args.api_key, ca)}",
        flush=True,
    )
    if args.demo:
        reply = demo_request(url, name, args.api_key, verify)
        print(f"demo request: {DEMO_PROMPT!r}\nreply: {reply!r}", flush=True)
        if args.once:
            return 0
    print("Press Ctrl-C to stop.", flush=True)
    try:
        code = supervise(cluster, stop, restart=not args.no_restart)
    except ChildFailed as exc:
        print(f"splitserve up: {exc}", flush=True)
        code = 1
    print("stopping the cluster", flush=True)
    return code
