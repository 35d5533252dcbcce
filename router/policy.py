"""Routing policy: which decode node serves a request and, when it pays, which prefill node
computes its prompt. Pure functions over plain data (docs/router.md has the derivation).

Inputs are snapshots of the live node records (load: running, waiting, kv_usage) and the
per-node leading cached blocks of the prompt from ONE `AsyncPrefixIndex.longest_prefixes`
call. Costs are in prompt-token equivalents (the work of computing one prompt token):

    cached(x)   = min(blocks held by x × block_size, prompt_len − 1)  # last token never cached
    queue(x)    = waiting_request_tokens × num_waiting + running_request_tokens × num_running
    kv(x)       = kv_pressure_tokens × max(0, kv_usage − start) / (1 − start)
                  with start = kv_pressure_start
    cost(x)     = (prompt_len − cached(x)) + queue(x) + kv(x)

`cache_aware` picks the decode node of least cost among the un-herded ones: a node whose
load (running + waiting) exceeds the least-loaded node's by more than `herd_abs_margin`
requests AND by a factor `herd_rel_margin` is skipped, whatever prefix it holds. Then
conditional disaggregation: the decode node prefills itself when n > 1, when no prefill node
is live and un-busy (waiting ≤ max_prefill_waiting), or when its own uncached part is
shorter than `disagg_min_tokens` (unless more than `local_prefill_max_waiting` requests
already wait for their first token on it and a prefill node has a shorter queue);
otherwise the prefill node of least cost (same formula, same herding cap) computes the
prompt. `least_load` ignores prefixes (load, then KV usage); `round_robin` rotates. Ties
rotate with `RoutingInputs.rotation` so equal nodes share the traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

from splitserve.node.registry import NodeId, NodeRecord

PolicyName = Literal["cache_aware", "least_load", "round_robin"]
POLICIES: tuple[str, ...] = get_args(PolicyName)


@dataclass(frozen=True)
class PolicyConfig:
    name: PolicyName = "cache_aware"
    # Uncached prompt tokens on the chosen decode node below which it prefills itself: short
    # prefills cost less than a transfer round trip and barely disturb the decode batch.
    disagg_min_tokens: int = 256
    # A queued request costs about one typical prompt of work ahead of ours (tokens).
    waiting_request_tokens: float = 512.0
    # A running request slows every step a little (tokens of equivalent work).
    running_request_tokens: float = 32.0
    # KV pressure: 0 up to kv_pressure_start, rising linearly to kv_pressure_tokens at 100 %
    # (a nearly full pool means preemptions and recomputation).
    kv_pressure_tokens: float = 4096.0
    kv_pressure_start: float = 0.7
    # Herding cap (requests; factor): both margins exceeded -> the node is skipped.
    herd_abs_margin: int = 8
    herd_rel_margin: float = 1.5
    # Prefill nodes with more queued requests than this are treated as busy.
    max_prefill_waiting: int = 32
    # A short uncached prompt still goes to a prefill node when the decode node has more
    # requests waiting for their first token than this and a prefill node has fewer: its
    # own queue is then the bottleneck, and an idle prefill node takes the work off it.
    local_prefill_max_waiting: int = 2

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, got {self.name!r}")
        if self.disagg_min_tokens < 0:
            raise ValueError(f"disagg_min_tokens must be >= 0, got {self.disagg_min_tokens}")
        if not 0 <= self.kv_pressure_start < 1:
            raise ValueError(f"kv_pressure_start must be in [0, 1), got {self.kv_pressure_start}")
        if self.herd_rel_margin < 1:
            raise ValueError(f"herd_rel_margin must be >= 1, got {self.herd_rel_margin}")


@dataclass(frozen=True)
class RoutingInputs:
    prompt_len: int
    n: int
    decode_nodes: Sequence[NodeRecord]
    prefill_nodes: Sequence[NodeRecord]
    # Leading blocks of the prompt each live node holds (absent: 0).
    cached_blocks: Mapping[NodeId, int]
    # Round-robin position and tie-break rotation; the caller increments it per decision.
    rotation: int = 0


class RouteDecision(NamedTuple):
    decode: NodeRecord
    prefill: NodeRecord | None  # None: the decode node prefills the prompt itself
    decode_cached_tokens: int
    prefill_cached_tokens: int
    reason: str  # why prefill is local or remote (logs, metrics)


def cached_tokens(node: NodeRecord, inputs: RoutingInputs) -> int:
    blocks = inputs.cached_blocks.get(node.node_id, 0)
    return max(0, min(blocks * node.block_size, inputs.prompt_len - 1))


def node_load(node: NodeRecord) -> int:
    return node.load.num_running + node.load.num_waiting


def queue_cost(node: NodeRecord, config: PolicyConfig) -> float:
    load = node.load
    return (
        config.waiting_request_tokens * load.num_waiting
        + config.running_request_tokens * load.num_running
    )


def kv_cost(node: NodeRecord, config: PolicyConfig) -> float:
    excess = max(0.0, node.load.kv_usage - config.kv_pressure_start)
    return config.kv_pressure_tokens * excess / (1.0 - config.kv_pressure_start)


def node_cost(node: NodeRecord, inputs: RoutingInputs, config: PolicyConfig) -> float:
    uncached = inputs.prompt_len - cached_tokens(node, inputs)
    return uncached + queue_cost(node, config) + kv_cost(node, config)


def unherded(nodes: Sequence[NodeRecord], config: PolicyConfig) -> list[NodeRecord]:
    """Nodes whose load is within the herding margins of the least-loaded one."""
    least = min(node_load(n) for n in nodes)
    return [
        n
        for n in nodes
        if node_load(n) - least <= config.herd_abs_margin
        or node_load(n) <= config.herd_rel_margin * least
    ]


def _pick(
    nodes: Sequence[NodeRecord], rotation: int, key: Callable[[NodeRecord], tuple[float, ...]]
) -> NodeRecord:
    """The node of least key; ties go to the next node after `rotation` in node-id order."""
    ordered = sorted(nodes, key=lambda n: n.node_id)
    size = len(ordered)
    best = min(range(size), key=lambda i: (*key(ordered[i]), (i - rotation) % size))
    return ordered[best]


def _choose_node(
    nodes: Sequence[NodeRecord], inputs: RoutingInputs, config: PolicyConfig
) -> NodeRecord:
    if config.name == "round_robin":
        ordered = sorted(nodes, key=lambda n: n.node_id)
        return ordered[inputs.rotation % len(ordered)]
    if config.name == "least_load":
        return _pick(nodes, inputs.rotation, lambda n: (node_load(n), n.load.kv_usage))
    return _pick(
        unherded(nodes, config),
        inputs.rotation,
        lambda n: (node_cost(n, inputs, config), node_load(n)),
    )


def choose_route(inputs: RoutingInputs, config: PolicyConfig) -> RouteDecision:
    """Decode node, and prefill node when disaggregation pays (see module docstring)."""
    if not inputs.decode_nodes:
        raise ValueError("choose_route: no decode node to choose from")
    decode = _choose_node(inputs.decode_nodes, inputs, config)
    decode_cached = cached_tokens(decode, inputs)
    uncached = inputs.prompt_len - decode_cached

    def local(reason: str) -> RouteDecision:
        return RouteDecision(decode, None, decode_cached, 0, reason)

    if inputs.n > 1:
        return local("n>1")
    if not inputs.prefill_nodes:
        return local("no prefill node")
    ready = [p for p in inputs.prefill_nodes if p.load.num_waiting <= config.max_prefill_waiting]
    if uncached < config.disagg_min_tokens:
        backlog = decode.load.num_waiting
        ready = [p for p in ready if p.load.num_waiting < backlog]
        if backlog <= config.local_prefill_max_waiting or not ready:
            return local("short uncached prompt")
    if not ready:
        return local("prefill nodes busy")
    prefill = _choose_node(ready, inputs, config)
    return RouteDecision(decode, prefill, decode_cached, cached_tokens(prefill, inputs), "disagg")
