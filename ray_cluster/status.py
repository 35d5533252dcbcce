"""What `splitserve ray status` reports: each server's place and state (the controller
builds it, ray_cluster/controller.py), and its text form, one line per server. Ray-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["prefill", "decode", "router", "redis"]


@dataclass(frozen=True)
class ServerInfo:
    name: str  # the actor's name
    kind: Kind
    server_id: str  # node id (prefill/decode), else the kind
    address: str  # gRPC host:port, the router's URL, or the Redis URL
    pid: int  # the server process
    actor_pid: int  # the actor's process, the server's parent
    hostname: str
    ip: str
    ray_node_id: str
    gpu_ids: tuple[str, ...]
    num_starts: int  # 1 + restarts so far


@dataclass(frozen=True)
class MemberStatus:
    name: str
    kind: Kind
    state: str  # serving | not answering | dead
    info: ServerInfo | None
    error: str = ""


@dataclass(frozen=True)
class ClusterStatus:
    cluster: str
    router_url: str
    redis_url: str
    num_prefill: int
    num_decode: int
    members: tuple[MemberStatus, ...] = field(default_factory=tuple)


COLUMNS = ("NAME", "STATE", "HOST", "IP", "RAY NODE", "GPU", "PID", "RESTARTS", "ADDRESS")


def format_status(status: ClusterStatus) -> str:
    rows = [COLUMNS, *(_row(m) for m in status.members)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    head = (
        f"cluster {status.cluster!r}: {status.num_prefill} prefill + {status.num_decode} decode "
        f"node(s), Redis {status.redis_url or '(none)'}"
    )
    api = f"OpenAI API: {status.router_url}/v1" if status.router_url else "no router answers"
    errors = [f"{m.name}: {m.error}" for m in status.members if m.error]
    return "\n".join([head, api, *(line.rstrip() for line in lines), *errors])


def _row(member: MemberStatus) -> tuple[str, ...]:
    info = member.info
    if info is None:
        return (member.name, member.state, *("-",) * (len(COLUMNS) - 2))
    return (
        member.name,
        member.state,
        info.hostname,
        info.ip,
        info.ray_node_id[:8],
        ",".join(info.gpu_ids) or "-",
        str(info.pid),
        str(info.num_starts - 1),
        info.address if info.kind != "prefill" and info.kind != "decode" else info.server_id,
    )
