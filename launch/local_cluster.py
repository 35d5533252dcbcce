"""A one-host cluster: redis-server, prefill and decode nodes, and optionally a router,
each its own process. `splitserve up` runs one; the end-to-end tests use it too.

Start order: Redis (unless a URL is given) -> prefill nodes -> decode nodes -> router;
each start waits for the child's ready line. Stop runs in reverse. On GPUs, nodes are
placed one per device in the order prefill, decode.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from splitserve.launch.processes import ManagedProcess
from splitserve.launch.redis_server import RedisServer

logger = logging.getLogger(__name__)

NODE_READY = re.compile(r"node (\S+) listening on (\S+)")


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
    # Extra flags for every node / each role / the router.
    node_args: tuple[str, ...] = ()
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    # torch devices, one per node in the order prefill..., decode...; empty: all on CPU.
    devices: tuple[str, ...] = field(default_factory=tuple)
    start_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        if self.num_decode < 1:
            raise ValueError(f"a cluster needs at least one decode node, got {self.num_decode}")
        if not self.use_redis and self.router_port is not None:
            raise ValueError("a router needs Redis: drop router_port or keep use_redis")
        if self.num_prefill < 0:
            raise ValueError(f"num_prefill must be >= 0, got {self.num_prefill}")
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

    def _match(self) -> re.Match[str]:
        if self.process.match is None:
            raise RuntimeError(f"{self.process.name} is not ready")
        return self.process.match


class LocalCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.redis: RedisServer | None = None
        self.redis_url = config.redis_url or ""
        self.prefill: list[NodeProcess] = []
        self.decode: list[NodeProcess] = []
        self.router: ManagedProcess | None = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def router_url(self) -> str:
        if self.router is None:
            raise RuntimeError("this cluster runs no router")
        return f"http://{self.router.address}"

    def start(self) -> LocalCluster:
        try:
            if not self.redis_url and self.config.use_redis:
                self.redis = RedisServer().start()
                self.redis_url = self.redis.url
            devices = list(self.config.devices)
            for i in range(self.config.num_prefill):
                self.prefill.append(
                    self.start_node("prefill", i, devices.pop(0) if devices else None)
                )
            for i in range(self.config.num_decode):
                self.decode.append(
                    self.start_node("decode", i, devices.pop(0) if devices else None)
                )
            if self.config.router_port is not None:
                self.router = self._start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(
        self, role: str, index: int, device: str | None = None, extra_args: tuple[str, ...] = ()
    ) -> NodeProcess:
        cfg = self.config
        args = [
            role,
            "--model",
            cfg.model,
            *(["--redis", self.redis_url] if self.redis_url else []),
            "--cluster",
            cfg.cluster,
            *cfg.node_args,
            *(cfg.prefill_args if role == "prefill" else cfg.decode_args),
            *extra_args,
        ]
        if cfg.served_model_name:
            args += ["--served-model-name", cfg.served_model_name]
        if device is not None:
            args += ["--device", device]
        proc = ManagedProcess.splitserve(f"{role}-{index}", *args, ready_pattern=NODE_READY)
        node = NodeProcess(role, proc.start(cfg.start_timeout_s))
        logger.info("%s node %s on %s", role, node.node_id, node.address)
        return node

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
            *cfg.router_args,
        ]
        return ManagedProcess.splitserve("router", *args).start(cfg.start_timeout_s)

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for node in [*self.decode, *self.prefill]:
            node.process.stop()
        if self.redis is not None:
            self.redis.stop()
