"""The Ray actors that own one server each: a prefill node, a decode node or the router
(`ServerActor`), or Redis (`RedisActor`), run as a child process of the actor.

Who calls what, in order:
1. The controller (ray_cluster/controller.py) creates the actor with its resources, its
   placement and `max_restarts`. Its constructor asks the controller how long to wait
   (`ClusterController.server_starting(name)`: 0 at the first start, a doubling backoff at
   each restart), then starts the server on this host's address (launch/processes.py: the
   child dies with the actor's process) and waits for its ready line.
2. The controller calls `info()` (where it runs: host, Ray node, GPUs, pid, address).
3. A watcher thread checks the child twice a second. When it died on its own, the actor's
   process exits with code 1, so Ray restarts the actor (at most `max_restarts` times), which
   starts the server again: a node under a new port, node id and NIXL agent name.
4. `stop()` (scale down, `down`): SIGTERM, which makes a node drain (deregister, finish
   in-flight requests within --drain-timeout-s, then abort the rest); SIGKILL after the
   drain time plus `stop_grace_s`. The controller then kills the actor without restart.
Both classes are plain classes: the controller wraps them with `ray.remote`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import ray

from splitserve.launch.local_cluster import NODE_READY
from splitserve.launch.processes import READY_PATTERN, ManagedProcess
from splitserve.launch.redis_server import RedisServer
from splitserve.ray_cluster.commands import node_command, node_env, router_command
from splitserve.ray_cluster.config import NAMESPACE, RayClusterConfig
from splitserve.ray_cluster.status import Kind, ServerInfo

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5
# Exit code of an actor process whose server died: Ray restarts the actor.
SERVER_DIED_EXIT_CODE = 1


def wait_before_start(config: RayClusterConfig, name: str) -> int:
    """Ask the controller how often this actor started; sleep its backoff. Returns the count."""
    controller = ray.get_actor(config.controller_name, namespace=NAMESPACE)
    num_starts = int(ray.get(controller.server_starting.remote(name)))
    delay_s = config.restart_delay_s(num_starts - 1)
    if delay_s > 0:
        logger.warning("%s: restart %d, starting in %.1f s", name, num_starts - 1, delay_s)
        time.sleep(delay_s)
    return num_starts


def host_address(config: RayClusterConfig) -> str:
    return config.host or ray.util.get_node_ip_address()


def watch(
    name: str, is_alive: Callable[[], bool], stopping: threading.Event, tail: Callable[[], str]
) -> None:
    """Exit this process (Ray restarts the actor) once the server died unless stopping."""

    def loop() -> None:
        while not stopping.wait(WATCH_INTERVAL_S):
            if not is_alive():
                if stopping.is_set():
                    return
                logger.error("%s died; exiting so that Ray restarts it:\n%s", name, tail())
                os._exit(SERVER_DIED_EXIT_CODE)

    threading.Thread(target=loop, name=f"{name}-watch", daemon=True).start()


class ServerActor:
    """One prefill node, decode node or router (kind), started in the constructor."""

    def __init__(self, config: RayClusterConfig, name: str, kind: Kind, redis_url: str) -> None:
        self.name = name
        self.kind = kind
        self.config = config
        self.num_starts = wait_before_start(config, name)
        host = host_address(config)
        if kind == "router":
            args, ready, env = router_command(config, host, redis_url), READY_PATTERN, {}
        elif kind in ("prefill", "decode"):
            args, ready = node_command(config, kind, host, redis_url), NODE_READY
            env = node_env(host)
        else:
            raise ValueError(f"ServerActor runs prefill, decode or router, not {kind!r}")
        self.process = ManagedProcess.splitserve(
            name, *args, ready_pattern=ready, env=env, drop_env=config.drop_env
        )
        self.process.start(config.start_timeout_s)
        self._stopping = threading.Event()
        watch(name, self.process.is_alive, self._stopping, self.process.tail)
        logger.info("%s serving: %s", name, self.process.address)

    def info(self) -> ServerInfo:
        match = self.process.match
        is_node = self.kind in ("prefill", "decode")
        server_id = match.group(1) if is_node and match is not None else self.kind
        address = match.group(2) if is_node and match is not None else self.process.address
        if self.kind == "router" and not address.startswith("http"):
            address = f"http://{address}"
        return _info(self.name, self.kind, server_id, address, self.process.pid, self.num_starts)

    def stop(self) -> int | None:
        """Drain and stop the server; its exit code."""
        self._stopping.set()
        drain_s = self.config.drain_timeout_s or 0.0
        return self.process.stop(timeout_s=drain_s + self.config.stop_grace_s)

    def tail(self, num_lines: int = 20) -> str:
        return self.process.tail(num_lines)


class RedisActor:
    """A private redis-server on this host's address and the fixed `port`."""

    def __init__(self, config: RayClusterConfig, name: str, port: int) -> None:
        self.name = name
        self.num_starts = wait_before_start(config, name)
        self.server = RedisServer(port=port, host=host_address(config)).start()
        self._stopping = threading.Event()
        watch(name, lambda: self.server.is_running, self._stopping, self.server.log_tail)

    def info(self) -> ServerInfo:
        url = self.server.url
        return _info(self.name, "redis", "redis", url, self.server.pid, self.num_starts)

    def stop(self) -> int | None:
        self._stopping.set()
        self.server.close()
        return 0


def _info(name: str, kind: Kind, server_id: str, address: str, pid: int, starts: int) -> ServerInfo:
    context = ray.get_runtime_context()
    gpu_ids = tuple(str(g) for g in context.get_accelerator_ids().get("GPU", []))
    return ServerInfo(
        name=name,
        kind=kind,
        server_id=server_id,
        address=address,
        pid=pid,
        actor_pid=os.getpid(),
        hostname=socket.gethostname(),
        ip=ray.util.get_node_ip_address(),
        ray_node_id=context.get_node_id(),
        gpu_ids=gpu_ids,
        num_starts=starts,
    )
