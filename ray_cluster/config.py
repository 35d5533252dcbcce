"""The settings of a cluster on Ray, built once by `splitserve ray up` and handed to the
controller actor, which passes them down to every actor it starts. Torch- and Ray-free."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

Role = Literal["prefill", "decode"]
# pack: fill the Ray node that already holds the most of this cluster's servers first;
# spread: put each new node where the fewest of its role run.
Placement = Literal["pack", "spread"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)
# Ray namespace of every named actor of every splitserve cluster.
NAMESPACE = "splitserve"
# The Ray resource only the head node has: the default home of the router and Redis.
HEAD_RESOURCE = "node:__internal_head__"
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class RayClusterConfig:
    # Model directory (the same path on every host), or dummy:<preset>.
    model: str
    # Name the API serves the model under; None: `model`.
    served_model_name: str | None = None
    # Cluster name: the Redis key prefix and the prefix of every actor's name.
    cluster: str = "default"
    num_prefill: int = 1
    num_decode: int = 1
    # Router HTTP port; fixed (not 0) so that a restarted router comes back on it.
    router_port: int = 8000
    # Use this Redis; None: start one as an actor beside the router.
    redis_url: str | None = None
    # Address every server binds; None: the IP address of the Ray node it runs on.
    host: str | None = None
    # False: nodes run on the CPU and ask Ray for `cpus_per_node` CPUs instead of a GPU.
    use_gpu: bool = True
    cpus_per_node: float = 1.0
    # A custom Ray resource each prefill and decode node needs one unit of ("": none).
    node_resource: str = ""
    # A custom Ray resource the router (and the Redis it starts) needs ("": the head node).
    router_resource: str = ""
    prefill_placement: Placement = "spread"
    decode_placement: Placement = "spread"
    # Extra flags for every node / each role / the router.
    node_args: tuple[str, ...] = ()
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    # Environment variables the servers do not inherit (settings passed down as flags).
    drop_env: tuple[str, ...] = ()
    # Nodes' --drain-timeout-s (s); None: the nodes' own default.
    drain_timeout_s: float | None = None
    # Longest a stopping server may take after its drain before it is killed (s).
    stop_grace_s: float = 30.0
    # Longest a server may take to print its ready line (s): a CPU node loads torch first.
    start_timeout_s: float = 300.0
    # Ray restarts a dead actor at most this many times; each restart waits
    # restart_backoff_s, doubled per restart, at most max_restart_backoff_s.
    max_restarts: int = 5
    restart_backoff_s: float = 1.0
    max_restart_backoff_s: float = 30.0
    # The router's --stream-idle-timeout-s on CPU clusters (s) unless router_args set it:
    # a CPU step of a full token budget takes seconds on a small host.
    cpu_stream_idle_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        check_counts(self.num_prefill, self.num_decode)
        if not _CLUSTER_NAME.match(self.cluster):
            raise ValueError(
                f"--cluster {self.cluster!r}: use letters, digits, '.', '_' or '-' only"
            )
        for name in ("prefill_placement", "decode_placement"):
            if getattr(self, name) not in PLACEMENTS:
                raise ValueError(f"{name} must be one of {PLACEMENTS}, got {getattr(self, name)!r}")
        if not 0 < self.router_port < 65536:
            raise ValueError(f"--port must be a fixed port in [1, 65535], got {self.router_port}")
        if self.max_restarts < 0 or self.restart_backoff_s < 0:
            raise ValueError("--max-restarts and --restart-backoff-s must be >= 0")
        if self.cpus_per_node < 0:
            raise ValueError(f"--cpus-per-node must be >= 0, got {self.cpus_per_node}")

    def placement(self, role: Role) -> Placement:
        return self.prefill_placement if role == "prefill" else self.decode_placement

    def role_args(self, role: Role) -> tuple[str, ...]:
        return (*self.node_args, *(self.prefill_args if role == "prefill" else self.decode_args))

    def restart_delay_s(self, num_restarts: int) -> float:
        """Wait before the `num_restarts`-th restart (1, 2, ...) of one actor."""
        if num_restarts < 1:
            return 0.0
        return min(self.restart_backoff_s * 2 ** (num_restarts - 1), self.max_restart_backoff_s)

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def controller_name(self) -> str:
        return actor_name(self.cluster, "controller")


def actor_name(cluster: str, member: str) -> str:
    """Name of one actor of `cluster` in the Ray namespace NAMESPACE."""
    return f"{cluster}:{member}"


def check_counts(num_prefill: int, num_decode: int) -> None:
    if num_decode < 1:
        raise ValueError(f"a cluster needs at least one decode node, got --num-decode {num_decode}")
    if num_prefill < 0:
        raise ValueError(f"--num-prefill must be >= 0, got {num_prefill}")
