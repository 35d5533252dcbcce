"""Where a new prefill or decode node goes: one Ray node chosen per actor, by role.

The controller (ray_cluster/controller.py) calls `choose_node` with the live Ray nodes'
total resources and where this cluster's nodes already run; the actor is then created with
a soft node-affinity strategy on the chosen node (Ray falls back to any node with room, e.g.
after that host died). None: no live node has room left, and Ray queues the actor until one
has (an autoscaler may add a host). Pure functions: no Ray import.

- pack: the node that already runs the most of this cluster's servers (fill hosts one by one);
- spread: the node that runs the fewest of this role, then the fewest servers overall.
Ties go to the earlier node in the order given (the controller sorts them by address).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from splitserve.ray_cluster.config import Placement, RayClusterConfig, Role


@dataclass(frozen=True)
class RayNode:
    node_id: str
    address: str  # IP address of the host
    resources: Mapping[str, float]  # the node's total Ray resources


@dataclass(frozen=True)
class Placed:
    ray_node_id: str
    role: Role


def node_demand(config: RayClusterConfig) -> dict[str, float]:
    """The Ray resources one prefill or decode node asks for."""
    demand: dict[str, float] = {"GPU": 1.0} if config.use_gpu else {}
    if not config.use_gpu and config.cpus_per_node > 0:
        demand["CPU"] = config.cpus_per_node
    if config.node_resource:
        demand[config.node_resource] = 1.0
    return demand


def num_slots(resources: Mapping[str, float], demand: Mapping[str, float]) -> int:
    """How many servers of `demand` fit into `resources` at once."""
    if not demand:
        return 1 << 30
    return min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in demand.items())


def choose_node(
    nodes: Sequence[RayNode],
    placed: Sequence[Placed],
    role: Role,
    strategy: Placement,
    demand: Mapping[str, float],
) -> RayNode | None:
    """The node the next `role` server goes to; None when no node has room."""
    total = {n.node_id: sum(1 for p in placed if p.ray_node_id == n.node_id) for n in nodes}
    same = {
        n.node_id: sum(1 for p in placed if p.ray_node_id == n.node_id and p.role == role)
        for n in nodes
    }
    free = [
        (i, n) for i, n in enumerate(nodes) if num_slots(n.resources, demand) > total[n.node_id]
    ]
    if not free:
        return None
    if strategy == "pack":
        return min(free, key=lambda f: (-total[f[1].node_id], f[0]))[1]
    return min(free, key=lambda f: (same[f[1].node_id], total[f[1].node_id], f[0]))[1]
