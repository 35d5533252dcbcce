"""RouterService: the router's state and its routing step, shared by every HTTP handler.

Per prompt, `route()` reads the cached node list, hashes the prompt's full blocks the way the
nodes do (engine/hashing.py, seeded with the node's served model name and block size), asks
Redis once for every live node's cached prefix, and applies the policy (router/policy.py).
Load reported by nodes is up to a heartbeat old, so the router adds the requests it has
itself sent and not yet seen answered (`track`/`untrack`), which keeps a burst from herding
onto the node that looked best a second ago. With Redis down, routing is by load only.
A decode node whose stream went silent or whose connection failed is `suspect()`: left out
of routing (and of /health) for `suspect_s`, since Redis lists it until its TTL runs out.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import NamedTuple, TypeVar

from splitserve.engine.hashing import hash_blocks, seed_hash
from splitserve.node.registry import NodeId, NodeLoad, NodeRecord
from splitserve.protocol.tracing import NO_TRACER, Tracer
from splitserve.router.cluster import ClusterView
from splitserve.router.config import RouterConfig
from splitserve.router.errors import APIError
from splitserve.router.metrics import RouterMetrics
from splitserve.router.node_clients import NodeClients
from splitserve.router.policy import RouteDecision, RoutingInputs, choose_route
from splitserve.router.tokenizer import RouterTokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ModelInfo(NamedTuple):
    name: str
    max_model_len: int  # 0: unknown
    created: int  # unix seconds: the oldest node serving it started then


def _no_decode_node(model: str | None) -> APIError:
    what = f"serves model {model!r}" if model else "is live"
    return APIError(503, f"no decode node {what}; try again shortly", code="no_decode_node")


class RouterService:
    def __init__(
        self,
        config: RouterConfig,
        tokenizer: RouterTokenizer,
        clients: NodeClients,
        cluster: ClusterView,
        metrics: RouterMetrics,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.config = config
        self.tracer = tracer
        self.tokenizer = tokenizer
        self.clients = clients
        self.cluster = cluster
        self.metrics = metrics
        self._load_only = replace(config.policy, name="least_load")
        self._rotation = itertools.count()
        self._inflight: Counter[NodeId] = Counter()
        self._suspect_until: dict[NodeId, float] = {}
        num_threads = config.num_tokenizer_threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="router-tokenize")

    async def offload(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the tokenizer threads: parsing, chat templates and tokenization of a
        large request never hold the event loop (the Rust tokenizer releases the GIL)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def body_limit(self) -> int:
        """The request body limit now: configured, or from the smallest context served."""
        snap = self.cluster.last_snapshot
        lens = [d.max_model_len for d in snap.decode if d.max_model_len > 0] if snap else []
        return self.config.body_limit_for(min(lens, default=0))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def suspect(self, node_id: NodeId) -> None:
        """Leave `node_id` out of routing for `suspect_s` (it failed a liveness check)."""
        if node_id not in self.suspects():
            logger.warning(
                "decode node %s failed a liveness check: not routed to for %.0f s",
                node_id,
                self.config.suspect_s,
            )
        self._suspect_until[node_id] = time.monotonic() + self.config.suspect_s

    def suspects(self) -> frozenset[NodeId]:
        now = time.monotonic()
        for node_id in [n for n, until in self._suspect_until.items() if until <= now]:
            del self._suspect_until[node_id]
        return frozenset(self._suspect_until)

    async def models(self) -> list[ModelInfo]:
        """Models served by live decode nodes (only the expected one when --model is set)."""
        snap = await self.cluster.nodes()
        by_model: dict[str, list[NodeRecord]] = {}
        for node in snap.decode:
            if not self.config.model or node.model == self.config.model:
                by_model.setdefault(node.model, []).append(node)
        return [
            ModelInfo(
                name,
                min((n.max_model_len for n in nodes if n.max_model_len > 0), default=0),
                int(min(n.started_at for n in nodes)),
            )
            for name, nodes in sorted(by_model.items())
        ]

    async def resolve_model(self, requested: str | None) -> ModelInfo:
        """The model a request names (None: the only one); 404 unknown, 503 none live."""
        models = await self.models()
        if not models:
            raise _no_decode_node(requested)
        if requested is None:
            return models[0]
        for info in models:
            if info.name == requested:
                return info
        names = ", ".join(repr(m.name) for m in models)
        raise APIError(
            404,
            f"the model {requested!r} does not exist: this cluster serves {names}",
            param="model",
            code="model_not_found",
        )

    async def route(
        self, model: str, prompt: Sequence[int], n: int, exclude: frozenset[NodeId] = frozenset()
    ) -> RouteDecision:
        start = time.perf_counter()
        snap = await self.cluster.nodes()
        exclude = exclude | self.suspects()
        decode = [d for d in snap.decode if d.model == model and d.node_id not in exclude]
        if not decode:
            raise _no_decode_node(model)
        block_size = decode[0].block_size
        decode = [d for d in decode if d.block_size == block_size]
        prefill = [p for p in snap.prefill if p.model == model and p.block_size == block_size]
        policy = self.config.policy
        cached: dict[NodeId, int] = {}
        if policy.name == "cache_aware":
            hashes = hash_blocks(prompt[:-1], block_size, seed_hash(model, block_size))
            prefixes = await self.cluster.longest_prefixes(hashes) if hashes else {}
            if prefixes is None:
                policy = self._load_only
            else:
                cached = prefixes
        inputs = RoutingInputs(
            prompt_len=len(prompt),
            n=n,
            decode_nodes=[self._with_inflight(d) for d in decode],
            prefill_nodes=[self._with_inflight(p) for p in prefill],
            cached_blocks=cached,
            rotation=next(self._rotation),
        )
        decision = choose_route(inputs, policy)
        self.metrics.routing.observe(time.perf_counter() - start)
        placement = "local" if decision.prefill is None else "remote"
        self.metrics.decisions.labels(policy.name, placement).inc()
        logger.debug(
            "route %d tokens -> decode %s (cached %d), prefill %s (cached %d): %s",
            len(prompt),
            decision.decode.node_id,
            decision.decode_cached_tokens,
            decision.prefill.node_id if decision.prefill else "local",
            decision.prefill_cached_tokens,
            decision.reason,
        )
        return decision

    def _with_inflight(self, node: NodeRecord) -> NodeRecord:
        """The record with the router's own unanswered requests counted as waiting."""
        reported = node.load.num_running + node.load.num_waiting
        extra = self._inflight[node.node_id] - reported
        if extra <= 0:
            return node
        load = NodeLoad(node.load.num_running, node.load.num_waiting + extra, node.load.kv_usage)
        return replace(node, load=load)

    def track(self, node: NodeRecord) -> None:
        self._inflight[node.node_id] += 1

    def untrack(self, node: NodeRecord) -> None:
        self._inflight[node.node_id] -= 1
        if self._inflight[node.node_id] <= 0:
            del self._inflight[node.node_id]

    async def scrape(self) -> bytes:
        """Prometheus exposition, with per-node gauges refreshed from Stats."""
        snap = await self.cluster.nodes()
        nodes = [*snap.decode, *snap.prefill]
        stats = await self.clients.stats_many(nodes)
        self.metrics.set_nodes(nodes, stats)
        self.metrics.redis_up.set(1.0 if self.cluster.is_redis_up else 0.0)
        return self.metrics.exposition()
