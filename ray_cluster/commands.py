"""The command lines of a Ray cluster's servers, built inside their actors (once the actor
knows the address of the host it landed on). Pure functions: no Ray import.

A node gets port 0 (a free one at every start), so a restarted node has a new gRPC address
and with it a new node id, which names its NIXL agent (node/registry.py make_node_id): it
never inherits its previous life's Redis entries or NIXL peers. The router gets the fixed
--port, so that clients find it again after a restart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from splitserve.launch.local_cluster import LOOPBACK_HOSTS
from splitserve.ray_cluster.config import RayClusterConfig, Role


def node_command(
    config: RayClusterConfig, role: Role, host: str, redis_url: str
) -> tuple[str, ...]:
    """`splitserve prefill|decode ...` for one node of `config` on `host`."""
    args = [
        role,
        *("--model", config.model, "--redis", redis_url, "--cluster", config.cluster),
        *("--host", host, "--port", "0", "--metrics-host", host),
        *("--device", "cuda:0" if config.use_gpu else "cpu"),
    ]
    if config.served_model_name:
        args += ["--served-model-name", config.served_model_name]
    if config.drain_timeout_s is not None:
        args += ["--drain-timeout-s", str(config.drain_timeout_s)]
    given = config.role_args(role)
    if not config.use_gpu and not any(a.startswith("--cpu-threads") for a in given):
        # As many torch threads as CPUs the actor holds: more would contend with its neighbours.
        args += ["--cpu-threads", str(max(1, int(config.cpus_per_node)))]
    return (*args, *given)


def router_command(config: RayClusterConfig, host: str, redis_url: str) -> tuple[str, ...]:
    """`splitserve router ...` of `config` on `host`."""
    args = [
        "router",
        *("--port", str(config.router_port), "--host", host),
        *("--redis", redis_url, "--cluster", config.cluster),
        *("--model", config.served_name, "--tokenizer", config.model),
    ]
    is_set = any(a.startswith("--stream-idle-timeout-s") for a in config.router_args)
    if not config.use_gpu and not is_set:
        args += ["--stream-idle-timeout-s", str(config.cpu_stream_idle_timeout_s)]
    return (*args, *config.router_args)


def node_env(host: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """UCX's TCP transport listens on every network device it uses: with servers bound to
    loopback (one host), only on `lo`. An explicit UCX_NET_DEVICES wins."""
    if host in LOOPBACK_HOSTS and "UCX_NET_DEVICES" not in environ:
        return {"UCX_NET_DEVICES": "lo"}
    return {}
