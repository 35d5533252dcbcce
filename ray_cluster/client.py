"""The driver side of `splitserve ray ...`: connect to a running Ray cluster and call the
cluster's controller (ray_cluster/controller.py), found by its name.

Who calls what: ray_cluster/cli.py -> `connect(address)` once -> `up(config, redis_port)`
(creates the detached controller, then `ClusterController.up`), `scale`, `status` or
`down` (`ClusterController.down`, then kills the controller). The driver exits afterwards;
the detached controller and the actors it owns keep running in the Ray cluster.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from splitserve.ray_cluster.config import (
    HEAD_RESOURCE,
    NAMESPACE,
    RayClusterConfig,
    actor_name,
)
from splitserve.ray_cluster.controller import MAX_CONCURRENCY, ClusterController
from splitserve.ray_cluster.status import ClusterStatus

logger = logging.getLogger(__name__)

# Longest `up`/`scale` may wait for the controller beyond the servers' own start timeout (s).
CALL_MARGIN_S = 120.0


class ClusterCallFailed(RuntimeError):
    """The controller raised: its message, without Ray's traceback around it."""


def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("auto": the one started on this host)."""
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except ConnectionError as exc:
        raise ValueError(
            f"no Ray cluster at {address!r} ({exc}): start one with `ray start --head`, "
            "or pass --address HOST:PORT of its head"
        ) from None


def find_controller(cluster: str) -> ray.actor.ActorHandle:
    try:
        return ray.get_actor(actor_name(cluster, "controller"), namespace=NAMESPACE)
    except ValueError:
        raise ValueError(
            f"no splitserve cluster {cluster!r} runs on this Ray cluster: start it with "
            "`splitserve ray up`, or pass the --cluster name it was started with"
        ) from None


def up(config: RayClusterConfig, redis_port: int) -> ClusterStatus:
    if config.cluster in running_clusters():
        raise ValueError(
            f"cluster {config.cluster!r} is already up: `splitserve ray down --cluster "
            f"{config.cluster}` first, or pick another --cluster name"
        )
    controller: Any = (
        ray.remote(ClusterController)
        .options(
            name=config.controller_name,
            namespace=NAMESPACE,
            lifetime="detached",
            max_concurrency=MAX_CONCURRENCY,
            num_cpus=0,
            resources={HEAD_RESOURCE: 0.001},
        )
        .remote(config)
    )
    timeout_s = config.start_timeout_s + CALL_MARGIN_S
    try:
        return _call(controller.up.remote(redis_port), timeout_s)
    except BaseException:
        ray.kill(controller, no_restart=True)
        raise


def scale(cluster: str, num_prefill: int, num_decode: int, timeout_s: float) -> ClusterStatus:
    controller = find_controller(cluster)
    return _call(controller.scale.remote(num_prefill, num_decode), timeout_s)


def status(cluster: str) -> ClusterStatus:
    return _call(find_controller(cluster).status.remote(), CALL_MARGIN_S)


def down(cluster: str, timeout_s: float) -> int:
    """Stop the cluster and its controller; how many leftover Redis keys were deleted."""
    controller = find_controller(cluster)
    deleted = int(_call(controller.down.remote(), timeout_s))
    ray.kill(controller, no_restart=True)
    return deleted


def running_clusters() -> list[str]:
    """Names of the splitserve clusters whose controller runs on this Ray cluster."""
    suffix = ":controller"
    return [
        a["name"][: -len(suffix)]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].endswith(suffix)
    ]


def _call(ref: Any, timeout_s: float) -> Any:
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, ValueError):
            raise ValueError(str(cause)) from None
        raise ClusterCallFailed(str(cause)) from None
    except ray.exceptions.GetTimeoutError:
        raise ClusterCallFailed(
            f"the controller did not answer within {timeout_s:.0f} s; "
            "`splitserve ray status` shows what runs"
        ) from None
