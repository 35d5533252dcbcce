"""A one-host cluster: redis-server, prefill and decode nodes, and optionally a router,
each its own process. `splitserve up` runs one; the end-to-end tests use it too.

Start order: Redis (unless a URL is given) -> every prefill and decode node at once (their
start-ups overlap; each must print its ready line) -> router. Stop runs in reverse: the
router, then every node at once, then Redis. Every child binds
`host` (loopback by default; the nodes' UCX transports then use only `lo`); with `tls`
credentials the router serves HTTPS and the nodes and router speak mTLS gRPC with the
cluster token (protocol/security.py). On GPUs, nodes are placed one per device in the
order prefill, decode.

Supervision (`splitserve up` calls it every half second, from the thread that started the
cluster): `restart_dead()` reports every child that exited (its exit code and last log
lines) and starts it again with the same command; Redis comes back on its port (the nodes
re-register and republish), the router on its port. A child that dies more than
`max_restarts` times within `restart_window_s` is not restarted again: ChildFailed.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from splitserve.launch.processes import ManagedProcess
from splitserve.launch.redis_server import RedisServer
from splitserve.launch.tracing_args import FLAG as TRACING_FLAG
from splitserve.protocol.tracing import check_endpoint

if TYPE_CHECKING:  # cryptography is imported only with --tls self-signed
    from splitserve.launch.certs import ClusterCredentials

logger = logging.getLogger(__name__)

WILDCARD_PREFIXES = ("0.0.0.0:", "[::]:")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
NODE_READY = re.compile(r"node (\S+) listening on (\S+)")
NODE_METRICS = re.compile(r"node \S+ metrics at (\S+)")


@dataclass(frozen=True)
class ClusterConfig:
    model: str
    # Name the API serves the model under (nodes' --served-model-name); None: `model`.
    served_model_name: str | None = None
    num_prefill: int = 1
    num_decode: int = 1
    # Router port; None starts no router.
    router_port: int | None = 8000
    # Use this Redis instead of starting one.
    redis_url: str | None = None
    # False: no Redis at all (nodes unregistered; only direct gRPC use, no router).
    use_redis: bool = True
    cluster: str = "default"
    # Address the router and the nodes bind (loopback: nothing outside this host reaches them).
    host: str = "127.0.0.1"
    # Credentials (launch/certs.py): the router serves HTTPS, gRPC runs over mTLS and every
    # RPC carries the cluster token. None: plain HTTP and gRPC, as before.
    tls: ClusterCredentials | None = None
    # Extra flags for every node / each role / the router.
    node_args: tuple[str, ...] = ()
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    # Environment variables the children do not inherit (`up`: its SPLITSERVE_* settings,
    # which it passes down as flags instead, launch/child_settings.py).
    drop_env: tuple[str, ...] = ()
    # torch devices, one per node in the order prefill..., decode...; empty: all on CPU.
    devices: tuple[str, ...] = field(default_factory=tuple)
    start_timeout_s: float = 180.0
    # The router's --stream-idle-timeout-s when every node is on the CPU (s), unless
    # router_args set it: a CPU engine step of a full token budget takes seconds on a small
    # machine, far past the GPU-sized default. Frozen processes are still caught in seconds
    # by gRPC keepalive (docs/reliability.md).
    cpu_stream_idle_timeout_s: float = 120.0
    # OTLP/gRPC collector every node and the router send spans to; empty: tracing off.
    otlp_traces_endpoint: str = ""
    # Supervision: at most this many restarts of one child within the window (s).
    max_restarts: int = 5
    restart_window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.num_decode < 1:
            raise ValueError(f"a cluster needs at least one decode node, got {self.num_decode}")
        if not self.use_redis and self.router_port is not None:
            raise ValueError("a router needs Redis: drop router_port or keep use_redis")
        if self.num_prefill < 0:
            raise ValueError(f"num_prefill must be >= 0, got {self.num_prefill}")
        if self.otlp_traces_endpoint:
            check_endpoint(self.otlp_traces_endpoint)
        num_nodes = self.num_prefill + self.num_decode
        if self.devices and len(self.devices) < num_nodes:
            raise ValueError(
                f"{num_nodes} nodes need {num_nodes} devices, got {len(self.devices)}: "
                "lower --num-prefill/--num-decode or free more GPUs"
            )


@dataclass
class NodeProcess:
    role: str
    process: ManagedProcess

    @property
    def node_id(self) -> str:
        return self._match().group(1)

    @property
    def address(self) -> str:
        return self._match().group(2)

    @property
    def metrics_url(self) -> str:
        """Where the node serves /metrics, from the line it prints beside its ready line;
        "" before that line arrived."""
        found = (NODE_METRICS.search(line) for line in list(self.process.lines))
        return next((m.group(1) for m in found if m is not None), "")

    def _match(self) -> re.Match[str]:
        if self.process.match is None:
            raise RuntimeError(f"{self.process.name} is not ready")
        return self.process.match


class ChildFailed(RuntimeError):
    """A child keeps dying: restarting it again would not help."""


@dataclass(frozen=True)
class ChildDeath:
    name: str
    returncode: int | None
    tail: str  # its last log lines


class LocalCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.redis: RedisServer | None = None
        self.redis_url = config.redis_url or ""
        self.prefill: list[NodeProcess] = []
        self.decode: list[NodeProcess] = []
        self.router: ManagedProcess | None = None
        self._restarts: dict[str, deque[float]] = {}

    def dead_children(self) -> list[ChildDeath]:
        dead = [
            ChildDeath(p.name, p.returncode, p.tail())
            for p in self._processes()
            if p.returncode is not None
        ]
        if self.redis is not None and not self.redis.is_running:
            dead.append(ChildDeath("redis", None, self.redis.log_tail()))
        return dead

    def restart_dead(self) -> list[ChildDeath]:
        """Restart every child that exited; the deaths, for the caller to report."""
        dead = self.dead_children()
        for death in dead:
            self._count_restart(death)
            logger.error(
                "%s exited (code %s); restarting it. Its last lines:\n%s",
                death.name,
                death.returncode,
                death.tail or "(no output)",
            )
            self._restart(death.name)
        return dead

    def _count_restart(self, death: ChildDeath) -> None:
        now = time.monotonic()
        times = self._restarts.setdefault(death.name, deque())
        while times and now - times[0] > self.config.restart_window_s:
            times.popleft()
        if len(times) >= self.config.max_restarts:
            raise ChildFailed(
                f"{death.name} died {len(times) + 1} times within "
                f"{self.config.restart_window_s:.0f} s (last exit code {death.returncode}); "
                f"its last lines:\n{death.tail}"
            )
        times.append(now)

    def _restart(self, name: str) -> None:
        if name == "redis" and self.redis is not None:
            self.redis.stop()
            self.redis.start()
            return
        if self.router is not None and name == self.router.name:
            self.router = self.router.fresh_copy().start(self.config.start_timeout_s)
            return
        for node in [*self.prefill, *self.decode]:
            if node.process.name == name:
                node.process = node.process.fresh_copy().start(self.config.start_timeout_s)
                logger.info("%s is back as %s on %s", name, node.node_id, node.address)

    def _processes(self) -> list[ManagedProcess]:
        nodes = [n.process for n in [*self.prefill, *self.decode]]
        return [*nodes, *([self.router] if self.router is not None else [])]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def router_url(self) -> str:
        if self.router is None:
            raise RuntimeError("this cluster runs no router")
        scheme = "https" if self.config.tls is not None else "http"
        address = self.router.address
        if address.startswith(WILDCARD_PREFIXES):  # bound to every interface: use loopback
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return f"{scheme}://{address}"

    def start(self) -> LocalCluster:
        try:
            if not self.redis_url and self.config.use_redis:
                self.redis = RedisServer().start()
                self.redis_url = self.redis.url
            self._start_nodes()
            if self.config.router_port is not None:
                self.router = self._start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes(self) -> None:
        """Every node at once (their start-ups overlap), then wait for each to serve."""
        devices = list(self.config.devices)
        roles = ["prefill"] * self.config.num_prefill + ["decode"] * self.config.num_decode
        launched: list[tuple[str, ManagedProcess]] = []
        try:
            for i, role in enumerate(roles):
                index = i if role == "prefill" else i - self.config.num_prefill
                device = devices.pop(0) if devices else None
                launched.append((role, self._node_process(role, index, device).launch()))
            for role, proc in launched:
                node = NodeProcess(role, proc.wait_ready(self.config.start_timeout_s))
                (self.prefill if role == "prefill" else self.decode).append(node)
                logger.info("%s node %s on %s", role, node.node_id, node.address)
        except BaseException:
            for _, proc in launched:
                proc.terminate()
            for _, proc in launched:
                proc.wait_stopped()
            raise

    def start_node(
        self, role: str, index: int, device: str | None = None, extra_args: tuple[str, ...] = ()
    ) -> NodeProcess:
        proc = self._node_process(role, index, device, extra_args)
        node = NodeProcess(role, proc.start(self.config.start_timeout_s))
        logger.info("%s node %s on %s", role, node.node_id, node.address)
        return node

    def _node_process(
        self, role: str, index: int, device: str | None, extra_args: tuple[str, ...] = ()
    ) -> ManagedProcess:
        cfg = self.config
        args = [
            role,
            "--model",
            cfg.model,
            *(["--redis", self.redis_url] if self.redis_url else []),
            "--cluster",
            cfg.cluster,
            *self._tracing_args(),
            "--host",
            cfg.host,
            *self._node_tls_args(),
            *self._cpu_thread_args(role),
            *cfg.node_args,
            *(cfg.prefill_args if role == "prefill" else cfg.decode_args),
            *extra_args,
        ]
        if cfg.served_model_name:
            args += ["--served-model-name", cfg.served_model_name]
        if device is not None:
            args += ["--device", device]
        return ManagedProcess.splitserve(
            f"{role}-{index}",
            *args,
            ready_pattern=NODE_READY,
            env=self._node_env(),
            drop_env=cfg.drop_env,
        )

    def _start_router(self) -> ManagedProcess:
        cfg = self.config
        args = [
            "router",
            "--port",
            str(cfg.router_port),
            "--redis",
            self.redis_url,
            "--cluster",
            cfg.cluster,
            "--model",
            cfg.served_model_name or cfg.model,
            "--tokenizer",
            cfg.model,
            "--host",
            cfg.host,
            *self._router_tls_args(),
            *self._cpu_router_args(),
            *self._tracing_args(),
            *cfg.router_args,
        ]
        router = ManagedProcess.splitserve("router", *args, drop_env=cfg.drop_env)
        return router.start(cfg.start_timeout_s)

    def _tracing_args(self) -> tuple[str, ...]:
        endpoint = self.config.otlp_traces_endpoint
        return (TRACING_FLAG, endpoint) if endpoint else ()

    def _cpu_thread_args(self, role: str) -> tuple[str, ...]:
        """With every node on the CPU, each gets an equal share of this process's cores
        (at least one), unless the flags already set --cpu-threads: torch's default of one
        thread per core in every node oversubscribes the machine."""
        cfg = self.config
        given = (*cfg.node_args, *(cfg.prefill_args if role == "prefill" else cfg.decode_args))
        if cfg.devices or any(a.startswith("--cpu-threads") for a in given):
            return ()
        cores = len(os.sched_getaffinity(0))
        return ("--cpu-threads", str(max(1, cores // (cfg.num_prefill + cfg.num_decode))))

    def _node_env(self) -> dict[str, str]:
        """UCX's TCP transport listens on every network device it uses: on a loopback
        cluster, only on `lo` (shared memory, CMA and CUDA IPC are not network devices and
        stay available). An explicit UCX_NET_DEVICES in the environment wins."""
        if self.config.host in LOOPBACK_HOSTS and "UCX_NET_DEVICES" not in os.environ:
            return {"UCX_NET_DEVICES": "lo"}
        return {}

    def _node_tls_args(self) -> tuple[str, ...]:
        tls = self.config.tls
        if tls is None:
            return ()
        return (
            *("--grpc-ca-certs", str(tls.ca_certs), "--grpc-require-client-cert"),
            *("--grpc-certfile", str(tls.server_cert), "--grpc-keyfile", str(tls.server_key)),
            *("--cluster-token-file", str(tls.token_file)),
        )

    def _router_tls_args(self) -> tuple[str, ...]:
        tls = self.config.tls
        if tls is None:
            return ()
        return (
            *("--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key)),
            *("--grpc-ca-certs", str(tls.ca_certs)),
            *("--grpc-certfile", str(tls.client_cert), "--grpc-keyfile", str(tls.client_key)),
            *("--cluster-token-file", str(tls.token_file)),
        )

    def _cpu_router_args(self) -> tuple[str, ...]:
        cfg = self.config
        is_set = any(a.startswith("--stream-idle-timeout-s") for a in cfg.router_args)
        if cfg.devices or is_set:
            return ()
        return ("--stream-idle-timeout-s", str(cfg.cpu_stream_idle_timeout_s))

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        nodes = [*self.decode, *self.prefill]
        for node in nodes:  # together: each drains and deregisters on its own
            node.process.terminate()
        for node in nodes:
            node.process.wait_stopped()
        if self.redis is not None:
            self.redis.stop()
